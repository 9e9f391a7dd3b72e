//! The KVM paravirtual interface, as Vireo serves it to a stock Linux (`pv=kvm` on the VM
//! line). Facts from Linux 6.1: Documentation/virt/kvm/x86/{cpuid,msr,hypercalls}.rst,
//! arch/x86/include/uapi/asm/kvm_para.h, arch/x86/include/asm/pvclock-abi.h.

/// CPUID base of the KVM leaves: EAX = [`LEAF_FEATURES`], EBX ECX EDX = "KVMKVMKVM\0\0\0".
pub const LEAF_SIGNATURE: u32 = 0x4000_0000;
/// EAX = [`features`] bits, EDX = [`hints`] bits.
pub const LEAF_FEATURES: u32 = 0x4000_0001;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
pub const SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// CPUID 0x4000_0001 EAX.
pub mod features {
    pub const CLOCKSOURCE: u32 = 1 << 0;
    pub const NOP_IO_DELAY: u32 = 1 << 1;
    pub const MMU_OP: u32 = 1 << 2;
    pub const CLOCKSOURCE2: u32 = 1 << 3;
    pub const ASYNC_PF: u32 = 1 << 4;
    pub const STEAL_TIME: u32 = 1 << 5;
    pub const PV_EOI: u32 = 1 << 6;
    pub const PV_UNHALT: u32 = 1 << 7;
    pub const PV_TLB_FLUSH: u32 = 1 << 9;
    pub const ASYNC_PF_VMEXIT: u32 = 1 << 10;
    pub const PV_SEND_IPI: u32 = 1 << 11;
    pub const POLL_CONTROL: u32 = 1 << 12;
    pub const PV_SCHED_YIELD: u32 = 1 << 13;
    pub const ASYNC_PF_INT: u32 = 1 << 14;
    pub const MSI_EXT_DEST_ID: u32 = 1 << 15;
    pub const CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
}

/// CPUID 0x4000_0001 EDX.
pub mod hints {
    /// vCPUs are never preempted (Linux then skips PV spinlocks and the like).
    pub const REALTIME: u32 = 1 << 0;
}

/// MSRs (range 0x4b56_4d00-0x4b56_4dff).
pub mod msr {
    pub const WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
    pub const SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    pub const ASYNC_PF_EN: u32 = 0x4b56_4d02;
    pub const STEAL_TIME: u32 = 0x4b56_4d03;
    pub const PV_EOI_EN: u32 = 0x4b56_4d04;
    pub const POLL_CONTROL: u32 = 0x4b56_4d05;
    /// The old clocksource MSRs (feature bit 0), not offered.
    pub const WALL_CLOCK: u32 = 0x11;
    pub const SYSTEM_TIME: u32 = 0x12;
    /// Bit 0 of SYSTEM_TIME_NEW, STEAL_TIME and PV_EOI_EN (KVM_MSR_ENABLED).
    pub const ENABLED: u64 = 1;
    /// STEAL_TIME bits 5:1 are reserved (the area is 64-byte aligned).
    pub const STEAL_RESERVED: u64 = 0x3E;
    /// PV_EOI_EN bit 1 is reserved (the word is 4-byte aligned).
    pub const PV_EOI_RESERVED: u64 = 0x2;
}

/// Hypercall numbers (RAX) and errors (negated in RAX).
pub mod hc {
    pub const VAPIC_POLL_IRQ: u64 = 1;
    pub const MMU_OP: u64 = 2;
    pub const FEATURES: u64 = 3;
    pub const PPC_MAP_MAGIC_PAGE: u64 = 4;
    /// RBX = flags (0), RCX = APIC ID of the vCPU to wake.
    pub const KICK_CPU: u64 = 5;
    pub const MIPS_GET_CLOCK_FREQ: u64 = 6;
    pub const MIPS_EXIT_VM: u64 = 7;
    pub const MIPS_CONSOLE_OUTPUT: u64 = 8;
    pub const CLOCK_PAIRING: u64 = 9;
    /// RBX/RCX = bitmap of destinations (low/high 64 bits), RDX = APIC ID of bit 0,
    /// RSI = ICR low (vector and delivery mode). Returns the number of vCPUs reached.
    pub const SEND_IPI: u64 = 10;
    /// RBX = APIC ID of a preempted vCPU the caller waits for.
    pub const SCHED_YIELD: u64 = 11;
    pub const MAP_GPA_RANGE: u64 = 12;

    pub const ENOSYS: i64 = 1000;
    pub const EFAULT: i64 = 14;
    pub const EINVAL: i64 = 22;
    pub const E2BIG: i64 = 7;
    pub const EPERM: i64 = 1;
    pub const EOPNOTSUPP: i64 = 95;
}

/// `struct pvclock_vcpu_time_info` (32 bytes, packed).
pub mod pvclock {
    pub const SIZE: usize = 32;
    pub const VERSION: usize = 0;
    pub const TSC_TIMESTAMP: usize = 8;
    pub const SYSTEM_TIME: usize = 16;
    pub const TSC_TO_SYSTEM_MUL: usize = 24;
    pub const TSC_SHIFT: usize = 28;
    pub const FLAGS: usize = 29;
    /// flags bit 0: the TSC is synchronized across vCPUs (readers need no global maximum).
    pub const TSC_STABLE: u8 = 1 << 0;
    /// flags bit 1: the VM was paused (watchdogs should not fire).
    pub const GUEST_STOPPED: u8 = 1 << 1;
    /// `struct pvclock_wall_clock` (12 bytes): version, sec, nsec (u32 each).
    pub const WALL_CLOCK_SIZE: usize = 12;
}

/// `struct kvm_steal_time` (64 bytes).
pub mod steal {
    pub const SIZE: usize = 64;
    pub const STEAL: usize = 0;
    pub const VERSION: usize = 8;
    pub const FLAGS: usize = 12;
    pub const PREEMPTED: usize = 16;
    /// `preempted` bit 0: the vCPU is not running on a host CPU now.
    pub const PREEMPTED_YES: u8 = 1 << 0;
    /// `preempted` bit 1: flush this vCPU's TLB before it runs again (set by a guest that
    /// skipped a TLB-shootdown IPI to it).
    pub const FLUSH_TLB: u8 = 1 << 1;
}

/// `mul` and `shift` for pvclock: `ns = ((delta << shift, or >> -shift) * mul) >> 32` for
/// a clock of `hz` ticks per second. The tick rate is brought, by powers of two counted in
/// `shift`, to within (ns rate, 2 * ns rate], so that ns/tick, a fraction below 1, is a
/// 32-bit binary fraction `mul`. `None` for 0 Hz.
pub fn time_scale(hz: u64) -> Option<(u32, i8)> {
    const NS_PER_S: u64 = 1_000_000_000;
    if hz == 0 {
        return None;
    }
    let mut target = NS_PER_S;
    let mut ticks = hz;
    let mut shift: i8 = 0;
    while ticks > 2 * target || ticks >> 32 != 0 {
        ticks >>= 1;
        shift -= 1;
    }
    while ticks <= target || target >> 32 != 0 {
        if target >> 32 != 0 || ticks & 0x8000_0000 != 0 {
            target >>= 1;
        } else {
            ticks <<= 1;
        }
        shift += 1;
    }
    u32::try_from((target << 32) / ticks).ok().map(|mul| (mul, shift))
}

/// Nanoseconds for `delta` ticks at (`mul`, `shift`), as the guest computes them.
pub fn scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let d = if shift < 0 { delta >> (-shift as u32) } else { delta << shift as u32 };
    ((d as u128 * mul as u128) >> 32) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_spells_kvm() {
        let mut b = [0u8; 12];
        for (i, r) in SIGNATURE.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&b, b"KVMKVMKVM\0\0\0");
    }

    #[test]
    fn time_scale_matches_known_values() {
        assert_eq!(time_scale(1_000_000_000), Some((0x8000_0000, 1)));
        // 2.5 GHz and 3 GHz (Documentation examples): within one unit of the exact value.
        let (m, s) = time_scale(2_500_000_000).unwrap();
        assert_eq!(s, -1);
        assert!((m as i64 - 0xCCCC_CCCC_i64).abs() <= 1, "{m:#x}");
        let (m, s) = time_scale(3_000_000_000).unwrap();
        assert_eq!(s, -1);
        assert!((m as i64 - 0xAAAA_AAAA_i64).abs() <= 1, "{m:#x}");
        assert_eq!(time_scale(0), None);
    }

    #[test]
    fn scaled_time_is_accurate() {
        for hz in [1_000_000u64, 33_333_333, 1_000_000_000, 2_100_000_000, 3_700_000_000, 5_000_000_000] {
            let (mul, shift) = time_scale(hz).unwrap();
            let one_second = scale_delta(hz, mul, shift);
            assert!(one_second.abs_diff(1_000_000_000) < 1_000, "{hz} Hz: {one_second} ns");
            let ten = scale_delta(hz * 10, mul, shift);
            assert!(ten.abs_diff(10_000_000_000) < 10_000, "{hz} Hz: {ten} ns");
        }
    }
}
