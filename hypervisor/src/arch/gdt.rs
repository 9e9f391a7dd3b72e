//! GDT and TSS, one pair per CPU (the TSS descriptor's busy bit is set by LTR, so two CPUs
//! can never load the same TSS: SDM Vol. 3A §9.2.3 "TSS Descriptor"). The double fault, the
//! NMI and the machine check run on their own IST stacks (SDM Vol. 3A §7.14.5 "Interrupt
//! Stack Table"), so a fault on a broken stack (overflow into the guard page: a #DF) still
//! gets a clean crash dump; other exceptions use no IST (see `idt::ist_for`), and their
//! slots are kept spare.
//!
//! The tables live in each CPU's [`PerCpu`](super::percpu::PerCpu) block; this module only
//! builds and loads them. Every CPU's GDT has the same layout, so the selectors are
//! constants (the IDT, shared by all CPUs, names the code selector).

use x86_64::{
    instructions::{
        segmentation::{Segment, CS, DS, ES, SS},
        tables::load_tss,
    },
    structures::{
        gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector},
        tss::TaskStateSegment,
    },
    PrivilegeLevel, VirtAddr,
};

/// IST slots (1-based in the IDT gate, 0-based in the TSS array).
pub const IST_DOUBLE_FAULT: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;
pub const IST_PAGE_FAULT: u8 = 4;
/// All other exceptions.
pub const IST_EXCEPTION: u8 = 5;
pub const IST_COUNT: usize = 5;
pub const IST_STACK_SIZE: usize = 16 * 1024;

/// One CPU's IST stacks (16-byte aligned as the SysV ABI wants at a call).
#[repr(C, align(16))]
pub struct IstStacks(pub [[u8; IST_STACK_SIZE]; IST_COUNT]);
const _: () = assert!(core::mem::size_of::<IstStacks>() == IST_COUNT * IST_STACK_SIZE);

/// Selectors of the layout every CPU's GDT has (null, code, data, TSS).
pub const CODE: SegmentSelector = SegmentSelector::new(1, PrivilegeLevel::Ring0);
pub const DATA: SegmentSelector = SegmentSelector::new(2, PrivilegeLevel::Ring0);
pub const TSS: SegmentSelector = SegmentSelector::new(3, PrivilegeLevel::Ring0);

/// A TSS whose IST slots point at the tops of the stacks at `ist_base`
/// ([`IST_COUNT`] stacks of [`IST_STACK_SIZE`] bytes, lowest slot first).
pub fn new_tss(ist_base: u64) -> TaskStateSegment {
    let mut tss = TaskStateSegment::new();
    for slot in 1..=IST_COUNT as u64 {
        tss.interrupt_stack_table[slot as usize - 1] = VirtAddr::new(ist_base + slot * IST_STACK_SIZE as u64);
    }
    tss
}

/// A GDT with the layout of [`CODE`], [`DATA`], [`TSS`] whose TSS descriptor points at `tss`.
pub fn new_gdt(tss: &'static TaskStateSegment) -> GlobalDescriptorTable {
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let t = gdt.append(Descriptor::tss_segment(tss));
    debug_assert!(code == CODE && data == DATA && t == TSS);
    gdt
}

/// Loads `gdt` on this CPU, reloads the segment registers and loads the TSS (LTR).
pub fn load(gdt: &'static GlobalDescriptorTable) {
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded (built by `new_gdt`),
    // which is 'static; its TSS descriptor is not busy: each CPU has its own TSS and loads
    // it once.
    unsafe {
        CS::set_reg(CODE);
        DS::set_reg(DATA);
        ES::set_reg(DATA);
        SS::set_reg(DATA);
        load_tss(TSS);
    }
}

/// The kernel code selector (for IDT gates).
pub fn code_selector() -> u16 {
    CODE.0
}

/// Address range of IST stack `slot` of this CPU (for the crash dump's stack checks).
pub fn ist_stack_range(slot: u8) -> (u64, u64) {
    let base = super::percpu::try_current().map_or(0, |p| p.ist_base());
    let lo = base + (slot as u64 - 1) * IST_STACK_SIZE as u64;
    (lo, lo + IST_STACK_SIZE as u64)
}
