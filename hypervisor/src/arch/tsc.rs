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
    ((ns as u128 * hz() as u128) / 1_000_000_000).min(u64::MAX as u128) as u64
}

/// Nanoseconds in `ticks` TSC ticks.
pub fn to_nanos(ticks: u64) -> u64 {
    match hz() {
        0 => 0,
        hz => ((ticks as u128 * 1_000_000_000) / hz as u128).min(u64::MAX as u128) as u64,
    }
}
