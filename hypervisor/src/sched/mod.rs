//! What host CPUs do when Vireo has nothing for them. Today the BSP runs the VMs one after
//! another (`start::kernel_main`) and every AP idles here; a scheduler that hands vCPUs to
//! APs replaces [`ap_main`] (wake an AP with `arch::lapic::send_wake`).

/// An AP's life after its initialization (per-CPU block, GDT/TSS/IDT, FPU, local APIC,
/// VMX/SVM): idle with interrupts on, in HLT, never spinning. Any interrupt (the wake-up
/// IPI `arch::lapic::WAKE_VECTOR`) ends one HLT; with no work to find, it halts again.
pub fn ap_main(index: usize) -> ! {
    log::debug!("cpu {index}: idle");
    loop {
        // SAFETY: the IDT handles every vector (the wake IPI's handler only EOIs); STI's
        // one-instruction shadow makes STI;HLT atomic, so no wake-up is lost between them.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}
