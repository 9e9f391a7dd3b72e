//! The host's local APIC: Vireo's one-shot timer and end-of-interrupt (SDM Vol. 3A ch. 12).
//! xAPIC through its MMIO page (mapped uncached by Vireo's page tables), or x2APIC through
//! MSRs 0x800+ when the firmware left x2APIC mode on.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use super::{msr, tsc};

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ADDR: u64 = 0x000F_FFFF_FFFF_F000;

const REG_EOI: u32 = 0x0B0;
const REG_SVR: u32 = 0x0F0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3E0;
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
/// Divide configuration 1011b: divide by 1.
const DIVIDE_BY_1: u32 = 0xB;

/// Vireo's timer interrupt vector and the APIC's spurious vector.
pub const TIMER_VECTOR: u8 = 0xEF;
pub const SPURIOUS_VECTOR: u8 = 0xFF;

const MODE_NONE: u8 = 0;
const MODE_XAPIC: u8 = 1;
const MODE_X2APIC: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(MODE_NONE);
static XAPIC_BASE: AtomicU64 = AtomicU64::new(0);
/// LAPIC timer ticks per 2^32 TSC ticks (fixed point), from calibration.
static TICKS_PER_TSC_Q32: AtomicU64 = AtomicU64::new(0);

fn read(reg: u32) -> u32 {
    match MODE.load(Ordering::Relaxed) {
        // SAFETY: x2APIC mode is on (checked at init), so its MSRs exist.
        MODE_X2APIC => unsafe { msr::read(0x800 + (reg >> 4)) as u32 },
        // SAFETY: the xAPIC page is identity-mapped UC; registers are 32-bit, 16-byte aligned.
        MODE_XAPIC => unsafe {
            core::ptr::read_volatile((XAPIC_BASE.load(Ordering::Relaxed) + reg as u64) as *const u32)
        },
        _ => 0,
    }
}

fn write(reg: u32, value: u32) {
    match MODE.load(Ordering::Relaxed) {
        // SAFETY: as in `read`.
        MODE_X2APIC => unsafe { msr::write(0x800 + (reg >> 4), value as u64) },
        // SAFETY: as in `read`.
        MODE_XAPIC => unsafe {
            core::ptr::write_volatile((XAPIC_BASE.load(Ordering::Relaxed) + reg as u64) as *mut u32, value)
        },
        _ => {}
    }
}

/// Enables the local APIC (software-enable in SVR, spurious vector 0xFF), masks its timer
/// and calibrates the timer against the TSC. Returns the timer frequency in Hz, or `None`
/// without an APIC or a calibrated TSC.
pub fn init() -> Option<u64> {
    let has_apic = crate::vmm::cpuid::host(1, 0).edx & (1 << 9) != 0;
    if !has_apic || tsc::hz() == 0 {
        return None;
    }
    // SAFETY: IA32_APIC_BASE exists when CPUID reports an APIC; enabling the APIC does not
    // move it.
    let base = unsafe {
        let mut base = msr::read(IA32_APIC_BASE);
        if base & APIC_BASE_ENABLE == 0 {
            base |= APIC_BASE_ENABLE;
            msr::write(IA32_APIC_BASE, base);
        }
        base
    };
    if base & APIC_BASE_X2APIC != 0 {
        MODE.store(MODE_X2APIC, Ordering::Relaxed);
    } else {
        XAPIC_BASE.store(base & APIC_BASE_ADDR, Ordering::Relaxed);
        MODE.store(MODE_XAPIC, Ordering::Relaxed);
    }
    write(REG_SVR, SVR_ENABLE | SPURIOUS_VECTOR as u32);
    write(REG_TIMER_DIVIDE, DIVIDE_BY_1);
    write(REG_LVT_TIMER, LVT_MASKED | TIMER_VECTOR as u32);
    // Count down from the maximum for 10 ms of TSC time.
    write(REG_TIMER_INITIAL, u32::MAX);
    let t0 = tsc::rdtsc();
    let wait = tsc::hz() / 100;
    while tsc::rdtsc() - t0 < wait {
        core::hint::spin_loop();
    }
    let elapsed_ticks = u32::MAX - read(REG_TIMER_CURRENT);
    let elapsed_tsc = tsc::rdtsc() - t0;
    write(REG_TIMER_INITIAL, 0);
    if elapsed_ticks == 0 {
        MODE.store(MODE_NONE, Ordering::Relaxed);
        return None;
    }
    TICKS_PER_TSC_Q32.store(((elapsed_ticks as u128) << 32).div_ceil(elapsed_tsc as u128) as u64, Ordering::Relaxed);
    Some((elapsed_ticks as u64 * tsc::hz()) / elapsed_tsc.max(1))
}

/// Whether the timer is usable.
pub fn available() -> bool {
    MODE.load(Ordering::Relaxed) != MODE_NONE && TICKS_PER_TSC_Q32.load(Ordering::Relaxed) != 0
}

/// Arms a one-shot interrupt on [`TIMER_VECTOR`] at TSC `deadline` (at once if past).
pub fn arm(deadline: u64) {
    if !available() {
        return;
    }
    let delta = deadline.saturating_sub(tsc::rdtsc());
    let ticks = ((delta as u128 * TICKS_PER_TSC_Q32.load(Ordering::Relaxed) as u128) >> 32).clamp(1, u32::MAX as u128);
    write(REG_LVT_TIMER, TIMER_VECTOR as u32);
    write(REG_TIMER_INITIAL, ticks as u32);
}

/// Stops the timer.
pub fn disarm() {
    if available() {
        write(REG_TIMER_INITIAL, 0);
    }
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}
