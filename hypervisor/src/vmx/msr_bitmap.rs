//! The 4 KiB MSR bitmap (SDM Vol. 3C §25.6.9): four 1 KiB quarters, read-low
//! (MSRs 0-1FFFH), read-high (C0000000H-C0001FFFH), write-low, write-high. A set bit makes
//! the access exit; MSRs outside both ranges always exit.
//!
//! Vireo makes every MSR exit except those the guest owns outright: the ones the VMCS guest
//! area switches (FS/GS base, SYSENTER_CS/ESP/EIP) and the SYSCALL/SWAPGS ones the backend
//! switches itself between vCPUs (STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE).

use super::controls::msr;

/// MSRs the guest reads and writes without an exit.
pub const PASSTHROUGH: [u32; 10] = [
    msr::IA32_FS_BASE,
    msr::IA32_GS_BASE,
    msr::IA32_KERNEL_GS_BASE,
    msr::IA32_STAR,
    msr::IA32_LSTAR,
    msr::IA32_CSTAR,
    msr::IA32_FMASK,
    msr::IA32_SYSENTER_CS,
    msr::IA32_SYSENTER_ESP,
    msr::IA32_SYSENTER_EIP,
];

pub const BITMAP_SIZE: usize = 4096;

/// Byte and bit of `msr` in the read quarter, or `None` for MSRs no bitmap covers.
const fn read_position(msr: u32) -> Option<(usize, u8)> {
    let (quarter, index) = match msr {
        0..=0x1FFF => (0, msr),
        0xC000_0000..=0xC000_1FFF => (1024, msr - 0xC000_0000),
        _ => return None,
    };
    Some((quarter + (index / 8) as usize, (index % 8) as u8))
}

/// Lets `msr` through (reads and writes) in `bitmap`.
pub fn pass_through(bitmap: &mut [u8; BITMAP_SIZE], msr: u32) {
    if let Some((byte, bit)) = read_position(msr) {
        bitmap[byte] &= !(1 << bit);
        bitmap[byte + 2048] &= !(1 << bit);
    }
}

/// Whether a read (`write = false`) or write of `msr` exits under `bitmap`.
pub fn exits(bitmap: &[u8; BITMAP_SIZE], msr: u32, write: bool) -> bool {
    match read_position(msr) {
        Some((byte, bit)) => bitmap[byte + if write { 2048 } else { 0 }] & (1 << bit) != 0,
        None => true,
    }
}

/// Fills `bitmap`: everything exits except [`PASSTHROUGH`].
pub fn build(bitmap: &mut [u8; BITMAP_SIZE]) {
    bitmap.fill(0xFF);
    for m in PASSTHROUGH {
        pass_through(bitmap, m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_guest_owned_msrs_pass() {
        let mut b = [0u8; BITMAP_SIZE];
        build(&mut b);
        for m in PASSTHROUGH {
            assert!(!exits(&b, m, false) && !exits(&b, m, true), "{m:#x}");
        }
        for m in [
            0xC000_0080u32, /* EFER */
            0x277,          /* PAT */
            0x10,           /* TSC */
            0x1B,           /* APIC base */
            0xC000_0103,
            0x3A,
            0x480,
        ] {
            assert!(exits(&b, m, false) && exits(&b, m, true), "{m:#x}");
        }
        // Outside both ranges: always exits.
        assert!(exits(&b, 0x4000_0000, false));
        // Exactly 10 MSRs x 2 directions are clear.
        let clear: u32 = b.iter().map(|x| x.count_zeros()).sum();
        assert_eq!(clear, 20);
    }

    #[test]
    fn bit_positions_follow_the_sdm_layout() {
        let mut b = [0xFFu8; BITMAP_SIZE];
        pass_through(&mut b, 0x174); // SYSENTER_CS: byte 0x2E, bit 4
        assert_eq!(b[0x2E], !(1 << 4));
        assert_eq!(b[2048 + 0x2E], !(1 << 4));
        pass_through(&mut b, 0xC000_0082); // LSTAR: high quarter byte 0x10, bit 2
        assert_eq!(b[1024 + 0x10], !(1 << 2));
        assert_eq!(b[3072 + 0x10], !(1 << 2));
    }
}
