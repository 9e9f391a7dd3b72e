//! Vireo's CPUID leaves.
//!
//! A guest first checks CPUID.1:ECX[31] (hypervisor present), then reads the signature
//! leaf. Vireo's own leaves sit at 0x4000_0100 so that 0x4000_0000 stays free for the
//! KVM-compatible leaves a stock Linux looks for (Linux scans 0x4000_0000..0x4000_FF00 in
//! steps of 0x100 for any signature it knows).

/// CPUID.1:ECX bit 31: "a hypervisor is present" (reserved as 0 on real CPUs).
pub const HYPERVISOR_PRESENT_ECX_BIT: u32 = 1 << 31;

/// Base of Vireo's leaves.
pub const VIREO_BASE: u32 = 0x4000_0100;
/// EAX = highest Vireo leaf; EBX, ECX, EDX = [`SIGNATURE`] (in that order, little-endian).
pub const LEAF_SIGNATURE: u32 = VIREO_BASE;
/// EAX = [`crate::ABI_VERSION`]; EBX = [`features`] bits; ECX = the hypercall instruction
/// this CPU executes natively ([`HYPERCALL_INSN_VMCALL`] or [`HYPERCALL_INSN_VMMCALL`]);
/// EDX = 0 (reserved).
pub const LEAF_VERSION: u32 = VIREO_BASE + 1;
/// The hypercall page (ABI version 2): EAX = the MSR a guest writes the page's
/// guest-physical address to ([`crate::hypercall::page::MSR`]), EBX = the size of one stub
/// in bytes, ECX = the number of stubs, EDX = 0 (reserved). All zero when the VM offers no
/// hypercall page (feature bit [`features::HYPERCALL_PAGE`] clear).
pub const LEAF_HYPERCALL_PAGE: u32 = VIREO_BASE + 2;
/// The highest leaf Vireo defines today.
pub const LEAF_MAX: u32 = LEAF_HYPERCALL_PAGE;

/// The 12-byte signature returned in EBX, ECX, EDX of [`LEAF_SIGNATURE`].
pub const SIGNATURE: [u8; 12] = *b"VireoVireoHV";

/// Intel's VMCALL (0F 01 C1) is native on this CPU.
pub const HYPERCALL_INSN_VMCALL: u32 = 1;
/// AMD's VMMCALL (0F 01 D9) is native on this CPU.
pub const HYPERCALL_INSN_VMMCALL: u32 = 2;

/// Feature bits in EBX of [`LEAF_VERSION`].
pub mod features {
    /// The hypercalls of [`crate::hypercall`] are available.
    pub const HYPERCALLS: u32 = 1 << 0;
    /// The test device ports of [`crate::hypercall::TEST_DEVICE_PORT`] are present.
    pub const TEST_DEVICE: u32 = 1 << 1;
    /// The hypercall page of [`crate::hypercall::page`] (ABI version 2).
    pub const HYPERCALL_PAGE: u32 = 1 << 2;
    /// The statistics calls of ABI version 2 ([`crate::hypercall::nr::STATS`] and after).
    pub const STATS: u32 = 1 << 3;
    /// The VM offers the KVM paravirtual interface at CPUID 0x4000_0000 (`pv=kvm`).
    pub const KVM_PV: u32 = 1 << 4;
}

/// The signature as the three registers EBX, ECX, EDX.
pub const fn signature_registers() -> [u32; 3] {
    let s = SIGNATURE;
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}

/// Whether EBX, ECX, EDX of a signature leaf spell Vireo's signature.
pub const fn is_vireo(ebx: u32, ecx: u32, edx: u32) -> bool {
    let [b, c, d] = signature_registers();
    ebx == b && ecx == c && edx == d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trip() {
        let [b, c, d] = signature_registers();
        assert!(is_vireo(b, c, d));
        assert!(!is_vireo(c, b, d));
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&b.to_le_bytes());
        bytes[4..8].copy_from_slice(&c.to_le_bytes());
        bytes[8..].copy_from_slice(&d.to_le_bytes());
        assert_eq!(&bytes, b"VireoVireoHV");
    }
}
