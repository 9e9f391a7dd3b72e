//! GDT and TSS. Every exception and the NMI run on their own IST stack (SDM Vol. 3A §7.14.5
//! "Interrupt Stack Table"), so a fault on a broken stack (overflow into the guard page)
//! still gets a clean crash dump.

use spin::Once;
use x86_64::{
    instructions::{
        segmentation::{Segment, CS, DS, ES, SS},
        tables::load_tss,
    },
    structures::{
        gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector},
        tss::TaskStateSegment,
    },
    VirtAddr,
};

/// IST slots (1-based in the IDT gate, 0-based in the TSS array).
pub const IST_DOUBLE_FAULT: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;
pub const IST_PAGE_FAULT: u8 = 4;
/// All other exceptions.
pub const IST_EXCEPTION: u8 = 5;
const IST_COUNT: usize = 5;
pub const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; IST_COUNT]);

static mut IST_STACKS: IstStacks = IstStacks([[0; IST_STACK_SIZE]; IST_COUNT]);

pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();

/// Address ranges of the IST stacks (for the crash dump's stack checks).
pub fn ist_stack_range(slot: u8) -> (u64, u64) {
    let base = core::ptr::addr_of!(IST_STACKS) as u64 + (slot as u64 - 1) * IST_STACK_SIZE as u64;
    (base, base + IST_STACK_SIZE as u64)
}

/// Loads Vireo's GDT, reloads the segment registers and loads the TSS.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        for slot in 1..=IST_COUNT as u8 {
            let (_, top) = ist_stack_range(slot);
            tss.interrupt_stack_table[slot as usize - 1] = VirtAddr::new(top);
        }
        tss
    });
    let (gdt, sel) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        (gdt, Selectors { code, data, tss })
    });
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which lives in a
    // static and so outlives every use.
    unsafe {
        CS::set_reg(sel.code);
        DS::set_reg(sel.data);
        ES::set_reg(sel.data);
        SS::set_reg(sel.data);
        load_tss(sel.tss);
    }
}

/// The kernel code selector (for IDT gates).
pub fn code_selector() -> u16 {
    GDT.get().map(|(_, s)| s.code.0).unwrap_or(0x08)
}
