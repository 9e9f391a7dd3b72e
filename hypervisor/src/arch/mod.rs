//! x86-64 platform code: descriptor tables, exceptions, CPU feature detection, MSRs.
//!
//! Privileged instructions are wrapped here, once, so `unsafe` stays in this folder.

pub mod cpu;
pub mod fpu;
pub mod gdt;
pub mod idt;
pub mod interrupts;
pub mod lapic;
pub mod msr;
pub mod paging;
pub mod percpu;
pub mod smp;
pub mod tsc;

/// Stops this CPU for good: interrupts off, `hlt` in a loop (an NMI returns into the loop).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli/hlt only stop this CPU; nothing is left to run on it.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Masks every line of both legacy i8259 PICs so no stray IRQ reaches Vireo's IDT
/// (the PICs' power-on vectors 8-15 would collide with CPU exceptions).
pub fn mask_legacy_pic() {
    use x86_64::instructions::port::Port;
    const PIC1_DATA: u16 = 0x21;
    const PIC2_DATA: u16 = 0xA1;
    // SAFETY: writing the interrupt mask registers of the PC's standard PICs only masks
    // IRQ lines; Vireo owns the platform.
    unsafe {
        Port::<u8>::new(PIC1_DATA).write(0xFF);
        Port::<u8>::new(PIC2_DATA).write(0xFF);
    }
}
