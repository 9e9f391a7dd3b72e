//! Host interrupts. Vireo runs with interrupts off, except idle APs (`sched::ap_main`, in
//! HLT with IF = 1, woken by [`lapic::WAKE_VECTOR`]); otherwise physical interrupts reach it
//! only as exits from guests (VMX external-interrupt exiting with acknowledge-on-exit; the SVM INTR
//! intercept, after which the interrupt is still pending in the APIC) and are dispatched
//! here, once, whichever way they arrived.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{lapic, percpu};

/// Per CPU: the one-shot host timer fired since [`take_timer_fired`] last looked.
static TIMER_FIRED: [AtomicBool; percpu::MAX_CPUS] = [const { AtomicBool::new(false) }; percpu::MAX_CPUS];

/// Whether this CPU's one-shot timer fired since the last call (clears it): whoever keeps
/// the timer armed must arm it again.
pub fn take_timer_fired() -> bool {
    match percpu::try_current() {
        Some(cpu) => TIMER_FIRED[cpu.index() % percpu::MAX_CPUS].swap(false, Ordering::Relaxed),
        None => false,
    }
}

/// Whether this CPU's one-shot timer fired since [`take_timer_fired`] last looked, without
/// clearing it (a plain load: the exit fast path's check).
#[inline]
pub fn timer_fired() -> bool {
    match percpu::try_current() {
        Some(cpu) => TIMER_FIRED[cpu.index() % percpu::MAX_CPUS].load(Ordering::Relaxed),
        None => false,
    }
}

static TIMER_INTERRUPTS: AtomicU64 = AtomicU64::new(0);
static OTHER_INTERRUPTS: AtomicU64 = AtomicU64::new(0);
static WAKE_INTERRUPTS: AtomicU64 = AtomicU64::new(0);

/// Handles host interrupt `vector` (already acknowledged by the CPU).
pub fn handle(vector: u8) {
    match vector {
        lapic::TIMER_VECTOR => {
            TIMER_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
            if let Some(cpu) = percpu::try_current() {
                TIMER_FIRED[cpu.index() % percpu::MAX_CPUS].store(true, Ordering::Relaxed);
            }
            lapic::eoi();
        }
        // The wake-up IPI only ends a HLT or a guest's run; the woken CPU looks for work.
        lapic::WAKE_VECTOR => {
            WAKE_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
            if let Some(cpu) = super::percpu::try_current() {
                cpu.note_wake();
            }
            lapic::eoi();
        }
        // Only there to make a guest exit (`svm::event::exit_after_delivery`).
        lapic::EXIT_VECTOR => lapic::eoi(),
        // Spurious interrupts need no EOI (SDM Vol. 3A §12.9).
        lapic::SPURIOUS_VECTOR => {}
        _ => {
            OTHER_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
            lapic::eoi();
        }
    }
}

/// Lets an interrupt that is pending in the APIC be delivered through the IDT (one
/// instruction with IF=1: STI's shadow covers the NOP, the interrupt is taken after it).
pub fn deliver_pending() {
    // SAFETY: Vireo's IDT handles every vector; interrupts are off again right after.
    #[cfg(target_os = "none")]
    unsafe {
        core::arch::asm!("sti", "nop", "cli", options(nomem, nostack))
    };
}

/// Wake-up IPIs handled so far (all CPUs).
pub fn wakes() -> u64 {
    WAKE_INTERRUPTS.load(Ordering::Relaxed)
}

/// (timer interrupts, other interrupts) handled so far.
pub fn counts() -> (u64, u64) {
    (TIMER_INTERRUPTS.load(Ordering::Relaxed), OTHER_INTERRUPTS.load(Ordering::Relaxed))
}
