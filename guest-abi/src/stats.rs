//! Exit statistics as a guest reads them (ABI version 2, [`crate::hypercall::nr::STATS`]).
//!
//! The buffer holds a [`StatsHeader`] and then one [`ExitRecord`] per exit kind, in the order
//! of [`KIND_NAMES`]. Everything is little-endian. Cycles are TSC cycles Vireo spent
//! handling exits of that kind (from the exit to the next entry); divide by
//! `tsc_khz * 1000` for seconds.

/// "VSTA", the first four bytes of a [`StatsHeader`].
pub const MAGIC: u32 = u32::from_le_bytes(*b"VSTA");
/// Version of the header layout.
pub const LAYOUT_VERSION: u32 = 1;

/// The exit kinds, in record order. New kinds are only ever appended.
pub const KIND_NAMES: [&str; KINDS] = [
    "cpuid",
    "rdmsr",
    "wrmsr",
    "io",
    "hypercall",
    "hlt",
    "xsetbv",
    "npf",
    "exception",
    "triple_fault",
    "external_interrupt",
    "interrupt_window",
    "nmi",
    "init",
    "sipi",
    "pause",
    "entry_failed",
    "unhandled",
    "cr_access",
    "rdpmc",
];
/// Number of exit kinds Vireo counts today.
pub const KINDS: usize = 20;
/// The exit kinds of ABI versions 1-3 (before `rdpmc`): the least buffer version 1's
/// EXIT_STATS accepts, so a guest built then keeps working.
pub const KINDS_V1: usize = 19;

/// The start of a [`crate::hypercall::nr::STATS`] buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsHeader {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`LAYOUT_VERSION`].
    pub version: u32,
    /// Number of [`ExitRecord`]s Vireo has (it wrote as many as fit in the buffer).
    pub kinds: u32,
    /// How many vCPUs the figures sum (1 for a vCPU scope).
    pub vcpus: u32,
    /// The TSC frequency in kHz.
    pub tsc_khz: u64,
    /// The TSC when the figures were taken.
    pub now_tsc: u64,
    /// The TSC the figures count from: the VM's start, or the mark (the earliest one for a
    /// VM scope).
    pub since_tsc: u64,
    /// Steal time over the same period, in nanoseconds.
    pub steal_ns: u64,
}

/// One exit kind's figures.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitRecord {
    pub count: u64,
    pub cycles: u64,
}

pub const HEADER_SIZE: usize = 48;
pub const RECORD_SIZE: usize = 16;
const _: () = assert!(core::mem::size_of::<StatsHeader>() == HEADER_SIZE);
const _: () = assert!(core::mem::size_of::<ExitRecord>() == RECORD_SIZE);

/// A buffer big enough for every record.
pub const FULL_SIZE: usize = HEADER_SIZE + KINDS * RECORD_SIZE;

impl StatsHeader {
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.kinds.to_le_bytes());
        b[12..16].copy_from_slice(&self.vcpus.to_le_bytes());
        b[16..24].copy_from_slice(&self.tsc_khz.to_le_bytes());
        b[24..32].copy_from_slice(&self.now_tsc.to_le_bytes());
        b[32..40].copy_from_slice(&self.since_tsc.to_le_bytes());
        b[40..48].copy_from_slice(&self.steal_ns.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        Self {
            magic: u32_at(0),
            version: u32_at(4),
            kinds: u32_at(8),
            vcpus: u32_at(12),
            tsc_khz: u64_at(16),
            now_tsc: u64_at(24),
            since_tsc: u64_at(32),
            steal_ns: u64_at(40),
        }
    }
}

impl ExitRecord {
    pub fn to_bytes(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..].copy_from_slice(&self.cycles.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; RECORD_SIZE]) -> Self {
        let mut c = [0u8; 8];
        c.copy_from_slice(&b[..8]);
        let mut y = [0u8; 8];
        y.copy_from_slice(&b[8..]);
        Self { count: u64::from_le_bytes(c), cycles: u64::from_le_bytes(y) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() {
        let h = StatsHeader {
            magic: MAGIC,
            version: LAYOUT_VERSION,
            kinds: KINDS as u32,
            vcpus: 2,
            tsc_khz: 2_500_000,
            now_tsc: 0x1122_3344_5566_7788,
            since_tsc: 7,
            steal_ns: 9,
        };
        let b = h.to_bytes();
        assert_eq!(&b[..4], b"VSTA");
        assert_eq!(b[16..24], 2_500_000u64.to_le_bytes());
        assert_eq!(StatsHeader::from_bytes(&b), h);
        let r = ExitRecord { count: 3, cycles: 0xAB };
        assert_eq!(ExitRecord::from_bytes(&r.to_bytes()), r);
        assert_eq!(FULL_SIZE, 48 + 20 * 16);
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in KIND_NAMES.iter().enumerate() {
            assert!(!a.is_empty() && a.bytes().all(|c| c.is_ascii_lowercase() || c == b'_'));
            assert!(!KIND_NAMES[i + 1..].contains(a), "{a}");
        }
    }
}
