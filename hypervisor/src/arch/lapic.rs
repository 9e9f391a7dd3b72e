//! The host's local APIC: Vireo's one-shot timer, end-of-interrupt and inter-processor
//! interrupts (SDM Vol. 3A ch. 12; §12.6 "Issuing Interprocessor Interrupts").
//! xAPIC through its MMIO page (mapped uncached by Vireo's page tables), or x2APIC through
//! MSRs 0x800+ when the firmware left x2APIC mode on.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use super::{msr, tsc};

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ADDR: u64 = 0x000F_FFFF_FFFF_F000;

const REG_ID: u32 = 0x020;
const REG_EOI: u32 = 0x0B0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_SVR: u32 = 0x0F0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3E0;
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
/// LVT performance monitoring counters register (SDM Vol. 3A §12.5.1 Table 12-1).
const REG_LVT_PERF: u32 = 0x340;
/// Divide configuration 1011b: divide by 1.
const DIVIDE_BY_1: u32 = 0xB;

/// Vireo's timer interrupt vector and the APIC's spurious vector.
pub const TIMER_VECTOR: u8 = 0xEF;
/// The wake-up IPI: its handler only EOIs. It ends a HLT, or makes a CPU that runs a guest
/// exit (external-interrupt exit), so the CPU looks at its work again.
pub const WAKE_VECTOR: u8 = 0xF0;
/// A self-IPI whose only purpose is the exit it causes when it is pending at VMRUN (see
/// `svm::event::exit_after_delivery`); its handler only EOIs.
pub const EXIT_VECTOR: u8 = 0xF1;
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

/// Enables this CPU's local APIC in the mode the BSP found (xAPIC or x2APIC), sets the
/// spurious vector and masks the timer. `false` without an APIC.
fn enable_here(x2apic_wanted: bool) -> bool {
    let has_apic = crate::vmm::cpuid::host(1, 0).edx & (1 << 9) != 0;
    if !has_apic {
        return false;
    }
    // SAFETY: IA32_APIC_BASE exists when CPUID reports an APIC; enabling the APIC does not
    // move it. x2APIC mode is entered from xAPIC mode (EN then EXTD, SDM Vol. 3A §12.12.5)
    // only when the BSP runs in it, so every CPU uses the same register interface.
    let base = unsafe {
        let mut base = msr::read(IA32_APIC_BASE);
        if base & APIC_BASE_ENABLE == 0 {
            base |= APIC_BASE_ENABLE;
            msr::write(IA32_APIC_BASE, base);
        }
        if x2apic_wanted && base & APIC_BASE_X2APIC == 0 {
            base |= APIC_BASE_X2APIC;
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
    true
}

/// An AP's local APIC: the BSP's mode, spurious vector, timer masked. The timer calibration
/// is the BSP's (every local APIC timer counts the same bus/core crystal clock).
pub fn init_ap() -> bool {
    let mode = MODE.load(Ordering::Relaxed);
    mode != MODE_NONE && enable_here(mode == MODE_X2APIC)
}

/// Enables the local APIC (software-enable in SVR, spurious vector 0xFF), masks its timer
/// and calibrates the timer against the TSC. Returns the timer frequency in Hz, or `None`
/// without an APIC or a calibrated TSC (IPIs still work when only the timer is unusable).
pub fn init() -> Option<u64> {
    let has_apic = crate::vmm::cpuid::host(1, 0).edx & (1 << 9) != 0;
    if !has_apic {
        return None;
    }
    // SAFETY: IA32_APIC_BASE exists (CPUID above); reading it has no side effect.
    let x2apic_on = unsafe { msr::read(IA32_APIC_BASE) } & APIC_BASE_X2APIC != 0;
    enable_here(x2apic_on);
    if tsc::hz() == 0 {
        return None;
    }
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
        // The timer does not count: `available()` stays false (TICKS_PER_TSC_Q32 = 0); EOIs
        // and IPIs still go through the APIC.
        return None;
    }
    TICKS_PER_TSC_Q32.store(((elapsed_ticks as u128) << 32).div_ceil(elapsed_tsc as u128) as u64, Ordering::Relaxed);
    Some((elapsed_ticks as u64 * tsc::hz()) / elapsed_tsc.max(1))
}

/// The LVT performance counter entry (0 without a local APIC).
pub fn lvtpc() -> u32 {
    read(REG_LVT_PERF)
}

/// Writes the LVT performance counter entry (nothing without a local APIC).
pub fn set_lvtpc(value: u32) {
    write(REG_LVT_PERF, value)
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

/// This CPU's local APIC ID (xAPIC: ID register bits 31:24; x2APIC: the 32-bit ID,
/// SDM Vol. 3A §12.4.6, §12.12.5.1); `None` before the APIC is enabled.
pub fn id() -> Option<u32> {
    match MODE.load(Ordering::Relaxed) {
        MODE_X2APIC => Some(read(REG_ID)),
        MODE_XAPIC => Some(read(REG_ID) >> 24),
        _ => None,
    }
}

/// Whether the APIC runs in x2APIC mode (32-bit destinations).
pub fn x2apic() -> bool {
    MODE.load(Ordering::Relaxed) == MODE_X2APIC
}

/// ICR fields (SDM Vol. 3A §12.6.1, Figure 12-12).
pub mod icr {
    pub const FIXED: u32 = 0b000 << 8;
    pub const NMI: u32 = 0b100 << 8;
    pub const INIT: u32 = 0b101 << 8;
    pub const STARTUP: u32 = 0b110 << 8;
    /// Delivery status (xAPIC only): 1 while the IPI is being sent.
    pub const SEND_PENDING: u32 = 1 << 12;
    /// Level: 1 = assert (what every IPI but the obsolete INIT de-assert uses).
    pub const ASSERT: u32 = 1 << 14;
}

/// Why an IPI was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpiError {
    /// The local APIC is not enabled (no APIC, or `init` not called).
    NoApic,
    /// The destination does not fit xAPIC's 8-bit destination field.
    DestinationTooLarge,
    /// The xAPIC kept its delivery-status bit set (the previous IPI never left).
    Stuck,
}

impl IpiError {
    pub fn text(self) -> &'static str {
        match self {
            IpiError::NoApic => "the local APIC is not enabled",
            IpiError::DestinationTooLarge => "APIC ID above 255 needs x2APIC mode, and the APIC runs in xAPIC mode",
            IpiError::Stuck => "the local APIC did not send the IPI (delivery status stayed pending)",
        }
    }
}

impl core::fmt::Display for IpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.text())
    }
}

/// The 64-bit ICR value for `low` (mode, vector, level) to physical destination `apic_id`,
/// in the current mode's layout: xAPIC destination in bits 63:56, x2APIC in bits 63:32.
pub fn icr_value(low: u32, apic_id: u32, x2apic: bool) -> Result<u64, IpiError> {
    if x2apic {
        Ok(((apic_id as u64) << 32) | low as u64)
    } else if apic_id > 0xFF {
        Err(IpiError::DestinationTooLarge)
    } else {
        Ok(((apic_id as u64) << 56) | low as u64)
    }
}

/// Waits (bounded, about 1 ms of TSC time or 2^20 polls) for the xAPIC to clear the ICR's
/// delivery-status bit.
fn wait_icr_idle() -> bool {
    let t0 = tsc::rdtsc();
    let limit = (tsc::hz() / 1000).max(1 << 20);
    for _ in 0..(1u32 << 20) {
        if read(REG_ICR_LOW) & icr::SEND_PENDING == 0 {
            return true;
        }
        if tsc::rdtsc().wrapping_sub(t0) > limit {
            break;
        }
        core::hint::spin_loop();
    }
    read(REG_ICR_LOW) & icr::SEND_PENDING == 0
}

/// Sends one IPI: `low` is the ICR's low half (mode, level, vector), physical destination
/// mode, no shorthand. Interrupts are off while the ICR is written: the xAPIC ICR is two
/// registers and an interrupt handler between the two writes could send its own IPI.
pub fn send_raw(low: u32, apic_id: u32) -> Result<(), IpiError> {
    let mode = MODE.load(Ordering::Relaxed);
    if mode == MODE_NONE {
        return Err(IpiError::NoApic);
    }
    let value = icr_value(low, apic_id, mode == MODE_X2APIC)?;
    without_interrupts(|| {
        if mode == MODE_X2APIC {
            // One 64-bit WRMSR to 0x830 sends it (SDM Vol. 3A §12.12.9); no delivery status.
            // SAFETY: x2APIC mode is on, so the ICR MSR exists; the value was built above.
            unsafe { msr::write(0x830, value) };
            return Ok(());
        }
        if !wait_icr_idle() {
            return Err(IpiError::Stuck);
        }
        // Writing the low half sends the IPI, so the destination goes first.
        write(REG_ICR_HIGH, (value >> 32) as u32);
        write(REG_ICR_LOW, value as u32);
        if wait_icr_idle() {
            Ok(())
        } else {
            Err(IpiError::Stuck)
        }
    })
}

/// Runs `f` with interrupts off, restoring IF afterwards.
fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_os = "none")]
    return x86_64::instructions::interrupts::without_interrupts(f);
    #[cfg(not(target_os = "none"))]
    f()
}

/// Sends a fixed interrupt with `vector` to the CPU with local APIC ID `apic_id`.
pub fn send_ipi(apic_id: u32, vector: u8) -> Result<(), IpiError> {
    send_raw(icr::FIXED | icr::ASSERT | vector as u32, apic_id)
}

/// Makes [`EXIT_VECTOR`] pending in this CPU's own APIC.
pub fn send_self(vector: u8) -> Result<(), IpiError> {
    let id = id().ok_or(IpiError::NoApic)?;
    send_ipi(id, vector)
}

/// Wakes the CPU with `apic_id` ([`WAKE_VECTOR`]).
pub fn send_wake(apic_id: u32) -> Result<(), IpiError> {
    send_ipi(apic_id, WAKE_VECTOR)
}

/// Sends an NMI. Vireo's NMI handler is its crash dump today: only for stopping a CPU.
pub fn send_nmi(apic_id: u32) -> Result<(), IpiError> {
    send_raw(icr::NMI | icr::ASSERT, apic_id)
}

/// Sends INIT (assert; SDM Vol. 3A §9.4.4.1 "Typical BSP Initialization Sequence"): the
/// target resets and waits for a STARTUP IPI.
pub fn send_init(apic_id: u32) -> Result<(), IpiError> {
    send_raw(icr::INIT | icr::ASSERT, apic_id)
}

/// Sends a STARTUP IPI: the target starts in real mode at `page << 12` (CS = page << 8,
/// IP = 0).
pub fn send_sipi(apic_id: u32, page: u8) -> Result<(), IpiError> {
    send_raw(icr::STARTUP | icr::ASSERT | page as u32, apic_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icr_layouts() {
        // SDM Vol. 3A §9.4.4.1: INIT = 0x4500, STARTUP = 0x46VV.
        assert_eq!(icr::INIT | icr::ASSERT, 0x4500);
        assert_eq!(icr::STARTUP | icr::ASSERT | 0x08, 0x4608);
        assert_eq!(icr_value(0x4500, 3, false), Ok(0x0300_0000_0000_4500));
        assert_eq!(icr_value(0x40F0, 0x1234, true), Ok(0x0000_1234_0000_40F0));
        assert_eq!(icr_value(0x4500, 256, false), Err(IpiError::DestinationTooLarge));
        assert_eq!(icr_value(0x4500, 255, false), Ok(0xFF00_0000_0000_4500));
    }
}
