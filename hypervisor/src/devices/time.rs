//! Shared conventions of the emulated platform devices (uart, pic, pit, rtc, pci, pm).
//!
//! Guest time: every device access and every `tick` carries `now`, the guest time in
//! nanoseconds since the VM started ([`Nanos`]). Devices hold no clock of their own; all of
//! their time-dependent state (counter values, status flags, wall-clock time) is a pure
//! function of the `now` values they were given, computed exactly (no accumulated rounding).
//! `now` must never go backwards; a smaller value is treated as the last one seen.
//!
//! Timers: a device with timers exposes `fn next_deadline(&self) -> Option<Nanos>` (the
//! earliest guest time at which its interrupt output may change without a port access; `None`
//! when nothing is scheduled) and `fn tick(&mut self, now: Nanos)` (advance to `now`). A
//! deadline may be conservative: ticking at it and finding nothing to do is harmless.
//!
//! Interrupts: each device reports the level of its output line(s) through a method
//! (`irq_level`, `sci_level`) or returns edges from `tick` (the PIT). The caller wires them to
//! the interrupt controllers after every access and tick.
//!
//! Port accesses: `size` is 1, 2 or 4 bytes; any other value is treated as 4. A multi-byte
//! access to byte-wide registers is split into byte accesses at consecutive ports, low byte
//! first, as the ISA bus does ([`split_read`], [`split_write`]). Devices never panic on any
//! port, size or value.

/// Nanoseconds per second.
pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Guest time: nanoseconds since the VM started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nanos(pub u64);

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);
    pub const MAX: Nanos = Nanos(u64::MAX);

    pub const fn from_secs(secs: u64) -> Self {
        Nanos(secs.saturating_mul(NANOS_PER_SEC))
    }

    pub const fn from_millis(ms: u64) -> Self {
        Nanos(ms.saturating_mul(1_000_000))
    }

    pub const fn from_micros(us: u64) -> Self {
        Nanos(us.saturating_mul(1_000))
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// `self + ns`, saturating at [`Nanos::MAX`].
    pub const fn saturating_add(self, ns: u64) -> Self {
        Nanos(self.0.saturating_add(ns))
    }

    /// Nanoseconds from `earlier` to `self` (0 if `earlier` is later).
    pub const fn since(self, earlier: Nanos) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Whole cycles a clock of `hz` (started at guest time 0) has completed by `now`:
/// `floor(now * hz / 1e9)`, exact.
pub const fn cycles_at(now: Nanos, hz: u64) -> u64 {
    let c = now.0 as u128 * hz as u128 / NANOS_PER_SEC as u128;
    if c > u64::MAX as u128 {
        u64::MAX
    } else {
        c as u64
    }
}

/// The earliest guest time `t` with `cycles_at(t, hz) >= cycles`: `ceil(cycles * 1e9 / hz)`,
/// saturating at [`Nanos::MAX`]. `hz` must not be 0 (0 gives [`Nanos::MAX`]).
pub const fn time_of_cycle(cycles: u64, hz: u64) -> Nanos {
    if hz == 0 {
        return Nanos::MAX;
    }
    let hz = hz as u128;
    let t = (cycles as u128 * NANOS_PER_SEC as u128).div_ceil(hz);
    if t > u64::MAX as u128 {
        Nanos::MAX
    } else {
        Nanos(t as u64)
    }
}

/// The earlier of two optional deadlines.
pub fn earliest(a: Option<Nanos>, b: Option<Nanos>) -> Option<Nanos> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// The number of bytes a port access of `size` moves: 1, 2, or 4 for anything else.
pub const fn access_len(size: u8) -> u8 {
    match size {
        1 => 1,
        2 => 2,
        _ => 4,
    }
}

/// What an access of `size` bytes reads from an empty bus: all ones.
pub const fn all_ones(size: u8) -> u32 {
    match access_len(size) {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    }
}

/// Performs an IN of `size` bytes at `port` as byte reads of `port`, `port + 1`, ...; the
/// byte read at `port + i` lands in bits `8i..8i+8`.
pub fn split_read(port: u16, size: u8, mut read_byte: impl FnMut(u16) -> u8) -> u32 {
    (0..access_len(size)).fold(0, |acc, i| acc | (read_byte(port.wrapping_add(i as u16)) as u32) << (8 * i))
}

/// Performs an OUT of `size` bytes at `port` as byte writes to `port`, `port + 1`, ..., low
/// byte first.
pub fn split_write(port: u16, size: u8, value: u32, mut write_byte: impl FnMut(u16, u8)) {
    for i in 0..access_len(size) {
        write_byte(port.wrapping_add(i as u16), (value >> (8 * i)) as u8);
    }
}

/// Reads the bytes `offset..offset + size` of a little-endian register `reg` that is `width`
/// bytes wide; bytes beyond the register read as all ones.
pub const fn read_lanes(reg: u32, width: u8, offset: u16, size: u8) -> u32 {
    let mut out = 0u32;
    let mut i = 0;
    while i < access_len(size) {
        let at = offset as u32 + i as u32;
        let byte = if at < width as u32 { (reg >> (8 * at)) & 0xFF } else { 0xFF };
        out |= byte << (8 * i);
        i += 1;
    }
    out
}

/// Merges an access of `size` bytes at byte `offset` of a `width`-byte register: returns the
/// written value shifted into place and the mask of register bits the access covers.
pub const fn write_lanes(width: u8, offset: u16, size: u8, value: u32) -> (u32, u32) {
    let mut bits = 0u32;
    let mut mask = 0u32;
    let mut i = 0;
    while i < access_len(size) {
        let at = offset as u32 + i as u32;
        if at < width as u32 {
            bits |= ((value >> (8 * i)) & 0xFF) << (8 * at);
            mask |= 0xFF << (8 * at);
        }
        i += 1;
    }
    (bits, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_conversions_are_exact_inverses() {
        const HZ: u64 = 1_193_182;
        assert_eq!(cycles_at(Nanos::from_secs(1), HZ), HZ);
        assert_eq!(cycles_at(Nanos(837), HZ), 0);
        assert_eq!(cycles_at(Nanos(839), HZ), 1);
        for c in [0u64, 1, 2, 1000, 65_536, HZ, 123_456_789] {
            let t = time_of_cycle(c, HZ);
            assert!(cycles_at(t, HZ) >= c);
            assert!(t.0 == 0 || cycles_at(Nanos(t.0 - 1), HZ) < c, "{c}: {t:?} is the earliest");
        }
        assert_eq!(cycles_at(Nanos::MAX, 3_579_545), (u64::MAX as u128 * 3_579_545 / 1_000_000_000) as u64);
        assert_eq!(time_of_cycle(u64::MAX, 1), Nanos::MAX);
        assert_eq!(time_of_cycle(5, 0), Nanos::MAX);
        assert_eq!(earliest(Some(Nanos(3)), Some(Nanos(2))), Some(Nanos(2)));
        assert_eq!(earliest(None, Some(Nanos(2))), Some(Nanos(2)));
        assert_eq!(earliest(None, None), None);
    }

    #[test]
    fn access_splitting_and_lanes() {
        let mut seen = Vec::new();
        assert_eq!(
            split_read(0x3F8, 2, |p| {
                seen.push(p);
                p as u8
            }),
            0xF9F8
        );
        assert_eq!(split_read(0xFFFF, 4, |p| p as u8), 0x0201_00FF, "port numbers wrap");
        assert_eq!(all_ones(1), 0xFF);
        assert_eq!(all_ones(3), 0xFFFF_FFFF);
        let mut writes = Vec::new();
        split_write(0x20, 2, 0x1234, |p, v| writes.push((p, v)));
        assert_eq!(writes, [(0x20, 0x34), (0x21, 0x12)]);
        assert_eq!(read_lanes(0x00AB_CDEF, 3, 1, 4), 0xFFFF_ABCD);
        assert_eq!(read_lanes(0x1234, 2, 1, 1), 0x12);
        assert_eq!(write_lanes(2, 1, 2, 0xAA55), (0x5500, 0xFF00));
        assert_eq!(write_lanes(4, 0, 4, 0xDEAD_BEEF), (0xDEAD_BEEF, 0xFFFF_FFFF));
        assert_eq!(write_lanes(2, 7, 1, 0xFF), (0, 0));
    }
}
