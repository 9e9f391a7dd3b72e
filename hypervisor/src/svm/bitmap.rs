//! The I/O and MSR permission maps (APM Vol. 2 §15.10.1 and §15.11).
//!
//! * IOPM: 12 KiB, one bit per port (plus the bits an access crossing port 0xFFFF reads);
//!   a set bit intercepts. Vireo intercepts every port.
//! * MSRPM: 8 KiB, two bits per MSR (bit 2n read, bit 2n+1 write) in three 2 KiB blocks:
//!   MSRs 0000_0000-0000_1FFF at byte 0x000, C000_0000-C000_1FFF at 0x800,
//!   C001_0000-C001_1FFF at 0x1000; the last 2 KiB are reserved. MSRs outside these
//!   ranges always exit. Vireo intercepts every MSR except [`PASS_THROUGH_MSRS`].

/// Size of the I/O permission map.
pub const IOPM_SIZE: usize = 3 * 4096;
/// Size of the MSR permission map.
pub const MSRPM_SIZE: usize = 2 * 4096;

pub const MSR_SYSENTER_CS: u32 = 0x174;
pub const MSR_SYSENTER_ESP: u32 = 0x175;
pub const MSR_SYSENTER_EIP: u32 = 0x176;
pub const MSR_STAR: u32 = 0xC000_0081;
pub const MSR_LSTAR: u32 = 0xC000_0082;
pub const MSR_CSTAR: u32 = 0xC000_0083;
pub const MSR_SFMASK: u32 = 0xC000_0084;
pub const MSR_FS_BASE: u32 = 0xC000_0100;
pub const MSR_GS_BASE: u32 = 0xC000_0101;
pub const MSR_KERNEL_GS_BASE: u32 = 0xC000_0102;

/// MSRs the guest reads and writes directly: their guest values live in the VMCB and
/// VMLOAD/VMSAVE switch them with the host's (APM Vol. 2 §15.5.2), so the guest can own
/// the hardware registers while it runs. Everything else (EFER and PAT included) exits to
/// the core.
pub const PASS_THROUGH_MSRS: [u32; 10] = [
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_KERNEL_GS_BASE,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SFMASK,
    MSR_SYSENTER_CS,
    MSR_SYSENTER_ESP,
    MSR_SYSENTER_EIP,
];

/// Where `msr`'s read bit is: (byte offset in the MSRPM, bit in that byte). The write bit
/// is the next one (same byte: the read bit is always even). `None` for MSRs the map does
/// not cover (they always exit).
pub fn msrpm_position(msr: u32) -> Option<(usize, u32)> {
    let block = match msr {
        0x0000_0000..=0x0000_1FFF => 0x000,
        0xC000_0000..=0xC000_1FFF => 0x800,
        0xC001_0000..=0xC001_1FFF => 0x1000,
        _ => return None,
    };
    let bit = (msr & 0x1FFF) as usize * 2;
    Some((block + bit / 8, (bit % 8) as u32))
}

/// Fills `map` (the MSRPM) with Vireo's policy: all ones, then [`PASS_THROUGH_MSRS`] clear.
pub fn fill_msrpm(map: &mut [u8; MSRPM_SIZE]) {
    map.fill(0xFF);
    for msr in PASS_THROUGH_MSRS {
        if let Some((byte, bit)) = msrpm_position(msr) {
            map[byte] &= !(0b11 << bit);
        }
    }
}

/// Whether `map` intercepts a read (`write` false) or write of `msr`.
pub fn msr_intercepted(map: &[u8; MSRPM_SIZE], msr: u32, write: bool) -> bool {
    match msrpm_position(msr) {
        Some((byte, bit)) => map[byte] & (1 << (bit + write as u32)) != 0,
        None => true,
    }
}

/// Fills `map` (the IOPM) with Vireo's policy: every port intercepted.
pub fn fill_iopm(map: &mut [u8; IOPM_SIZE]) {
    map.fill(0xFF);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        assert_eq!(msrpm_position(0), Some((0, 0)));
        assert_eq!(msrpm_position(0x174), Some((0x5D, 0)));
        assert_eq!(msrpm_position(0x175), Some((0x5D, 2)));
        assert_eq!(msrpm_position(0x1FFF), Some((0x7FF, 6)));
        assert_eq!(msrpm_position(0xC000_0080), Some((0x800 + 0x20, 0)));
        assert_eq!(msrpm_position(0xC000_0102), Some((0x800 + 0x40, 4)));
        assert_eq!(msrpm_position(0xC001_0117), Some((0x1000 + 0x45, 6)));
        assert_eq!(msrpm_position(0x2000), None);
        assert_eq!(msrpm_position(0x4000_0000), None);
        assert_eq!(msrpm_position(0xC000_2000), None);
    }

    #[test]
    fn msrpm_policy() {
        let mut map = [0u8; MSRPM_SIZE];
        fill_msrpm(&mut map);
        for msr in PASS_THROUGH_MSRS {
            assert!(!msr_intercepted(&map, msr, false) && !msr_intercepted(&map, msr, true), "{msr:#x}");
        }
        // EFER, PAT, APIC base, TSC, VM_HSAVE_PA, VM_CR, an uncovered MSR: intercepted both ways.
        for msr in [0xC000_0080, 0x277, 0x1B, 0x10, 0xC001_0117, 0xC001_0114, 0x4000_0000, 0xC000_0103] {
            assert!(msr_intercepted(&map, msr, false) && msr_intercepted(&map, msr, true), "{msr:#x}");
        }
        // Exactly 10 MSRs x 2 bits are clear.
        let clear: u32 = map.iter().map(|b| b.count_zeros()).sum();
        assert_eq!(clear, 20);
    }

    #[test]
    fn iopm_policy() {
        let mut map = [0u8; IOPM_SIZE];
        fill_iopm(&mut map);
        assert!(map.iter().all(|&b| b == 0xFF));
    }
}
