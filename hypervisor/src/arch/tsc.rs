//! The TSC as Vireo's clock: its frequency, calibrated once at boot against PIT channel 2
//! (the 8254's gate and output are readable through port 0x61; Intel 8254 datasheet,
//! mode 0 "interrupt on terminal count"), the same method Linux uses when nothing better
//! is known. In Bochs both the PIT and the TSC run on emulated time, so the figure is
//! consistent there too.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::instructions::port::Port;

const PIT_HZ: u64 = 1_193_182;
const PIT_CH2_DATA: u16 = 0x42;
const PIT_COMMAND: u16 = 0x43;
const PORT_B: u16 = 0x61;
/// Channel 2, lobyte/hibyte access, mode 0, binary.
const PIT_CH2_MODE0: u8 = 0b1011_0000;
const GATE2: u8 = 1 << 0;
const SPEAKER: u8 = 1 << 1;
const OUT2: u8 = 1 << 5;
/// Calibration interval: 10 ms.
const CAL_DIVISOR: u64 = 100;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged here (CR4.TSD clear) and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Measures the TSC frequency; returns it in Hz (0 if the PIT never counted down).
pub fn calibrate() -> u64 {
    let count = PIT_HZ / CAL_DIVISOR;
    let mut port_b = Port::<u8>::new(PORT_B);
    let mut command = Port::<u8>::new(PIT_COMMAND);
    let mut data = Port::<u8>::new(PIT_CH2_DATA);
    // SAFETY: the PC's 8254 and port B; Vireo owns them (guests reach only emulated ones).
    let hz = unsafe {
        let b = port_b.read();
        port_b.write((b & !SPEAKER) | GATE2);
        command.write(PIT_CH2_MODE0);
        data.write(count as u8);
        data.write((count >> 8) as u8);
        let t0 = rdtsc();
        // Bounded: an absent PIT must not hang the boot (about 2^32 TSC ticks).
        let mut t1 = t0;
        while port_b.read() & OUT2 == 0 {
            t1 = rdtsc();
            if t1 - t0 > 1 << 32 {
                return 0;
            }
        }
        port_b.write(b);
        (t1 - t0) * CAL_DIVISOR
    };
    TSC_HZ.store(hz, Ordering::Relaxed);
    hz
}

pub fn hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// TSC ticks in `ns` nanoseconds (saturating).
pub fn from_nanos(ns: u64) -> u64 {
    scale(ns, hz(), 1_000_000_000)
}

/// Nanoseconds in `ticks` TSC ticks.
pub fn to_nanos(ticks: u64) -> u64 {
    match hz() {
        0 => 0,
        hz => scale(ticks, 1_000_000_000, hz),
    }
}

/// `floor(v * mul / div)`, saturated to u64 (`div` > 0). Split as
/// `(v / div) * mul + (v % div) * mul / div`, which is exact, in 64-bit arithmetic when
/// `(div - 1) * mul` fits: a 128-bit division is a library call on the exit path (vm.now()
/// runs at every exit), while these are single instructions.
fn scale(v: u64, mul: u64, div: u64) -> u64 {
    match (div - 1).checked_mul(mul) {
        Some(_) => {
            let (q, r) = (v / div, v % div);
            q.saturating_mul(mul).saturating_add(r * mul / div)
        }
        None => ((v as u128 * mul as u128) / div as u128).min(u64::MAX as u128) as u64,
    }
}

/// TSC readings seen going backwards between two CPUs (a "warp") during the boot checks.
static WARPS: AtomicU64 = AtomicU64::new(0);
/// The latest TSC reading any CPU published during a check.
static LAST: AtomicU64 = AtomicU64::new(0);
/// CPUs that arrived at / finished the current pairwise check.
static ARRIVED: AtomicU64 = AtomicU64::new(0);
static FINISHED: AtomicU64 = AtomicU64::new(0);
/// Pairwise checks that ran (both CPUs took part).
static CHECKS: AtomicU64 = AtomicU64::new(0);

const SYNC_ROUNDS: u32 = 20_000;

/// RDTSC ordered after every earlier load (LFENCE; SDM Vol. 2B RDTSC: "if software requires
/// RDTSC to be executed only after all previous instructions have executed and all
/// previous loads are globally visible, it can execute LFENCE immediately before RDTSC").
#[inline]
fn rdtsc_ordered() -> u64 {
    // SAFETY: LFENCE and RDTSC have no side effects.
    unsafe {
        core::arch::x86_64::_mm_lfence();
        core::arch::x86_64::_rdtsc()
    }
}

/// One side of the boot-time check that two CPUs' TSCs agree: the BSP calls it for each AP
/// it starts (`bsp: true`), the AP once before it goes online. Both publish their readings
/// in one shared maximum and count a warp whenever a reading taken after seeing the other
/// CPU's is smaller (which real time forbids if the TSCs are synchronized). Each side
/// waits up to `wait_ticks` of its own TSC for the other.
pub fn check_sync_with_peer(bsp: bool, wait_ticks: u64) {
    ARRIVED.fetch_add(1, Ordering::AcqRel);
    let start = rdtsc();
    while ARRIVED.load(Ordering::Acquire) < 2 {
        if rdtsc().wrapping_sub(start) > wait_ticks {
            if bsp {
                ARRIVED.store(0, Ordering::Release);
            }
            return;
        }
        core::hint::spin_loop();
    }
    for _ in 0..SYNC_ROUNDS {
        let seen = LAST.load(Ordering::Acquire);
        let now = rdtsc_ordered();
        if now < seen {
            WARPS.fetch_add(1, Ordering::Relaxed);
        }
        LAST.fetch_max(now, Ordering::AcqRel);
    }
    FINISHED.fetch_add(1, Ordering::AcqRel);
    if bsp {
        let start = rdtsc();
        while FINISHED.load(Ordering::Acquire) < 2 && rdtsc().wrapping_sub(start) <= wait_ticks {
            core::hint::spin_loop();
        }
        CHECKS.fetch_add(1, Ordering::Relaxed);
        FINISHED.store(0, Ordering::Release);
        ARRIVED.store(0, Ordering::Release);
    }
}

/// Whether the TSCs of the CPUs Vireo uses are synchronized: no warp was seen (trivially
/// true on one CPU).
pub fn synchronized() -> bool {
    WARPS.load(Ordering::Relaxed) == 0
}

/// (pairwise checks run, warps seen), for the boot report.
pub fn sync_figures() -> (u64, u64) {
    (CHECKS.load(Ordering::Relaxed), WARPS.load(Ordering::Relaxed))
}

#[cfg(test)]
mod scale_tests {
    use super::scale;

    fn reference(v: u64, mul: u64, div: u64) -> u64 {
        ((v as u128 * mul as u128) / div as u128).min(u64::MAX as u128) as u64
    }

    #[test]
    fn scale_is_the_128_bit_formula() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let rates = [1, 999, 1_000_000_000, 1_000_000_007, 2_400_000_000, 3_000_000_000, 20_000_000_000, u64::MAX];
        for &hz in &rates {
            for v in [0, 1, hz.wrapping_sub(1), hz, hz.wrapping_add(1), u64::MAX, u64::MAX / 1_000_000_000] {
                assert_eq!(scale(v, 1_000_000_000, hz), reference(v, 1_000_000_000, hz), "to_nanos({v}) at {hz}");
                assert_eq!(scale(v, hz, 1_000_000_000), reference(v, hz, 1_000_000_000), "from_nanos({v}) at {hz}");
            }
            for _ in 0..2000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                for v in [x, x >> 20, x >> 40] {
                    assert_eq!(scale(v, 1_000_000_000, hz), reference(v, 1_000_000_000, hz));
                    assert_eq!(scale(v, hz, 1_000_000_000), reference(v, hz, 1_000_000_000));
                }
            }
        }
    }
}
