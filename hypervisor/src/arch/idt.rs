//! The IDT, exception entry stubs and Vireo's crash dump.
//!
//! Each of the 256 vectors has a 16-byte assembly stub that pushes a dummy error code when
//! the CPU pushes none (SDM Vol. 3A §7.13 "Error Code"), then the vector number, saves all
//! general registers into a [`TrapFrame`] and calls [`vireo_exception_dispatch`]. CPU
//! exceptions are fatal to Vireo: a readable dump, then a clean stop through the configured
//! exit method. Other vectors are logged and ignored (nothing is routed to Vireo yet).

// The IDT is only installed on bare metal; host builds compile the rest for unit tests.
#![cfg_attr(not(target_os = "none"), allow(dead_code))]

use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use super::{gdt, percpu};
use crate::report;

/// Registers saved by the exception stubs, lowest address first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    // Pushed by the CPU (SDM Vol. 3A Figure 7-9, 64-bit mode).
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}
const _: () = assert!(core::mem::size_of::<TrapFrame>() == 22 * 8);

/// One 16-byte IDT gate descriptor (SDM Vol. 3A §7.14.1, Figure 7-8).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Gate {
    offset_low: u16,
    selector: u16,
    /// Bits 2:0 IST index.
    ist: u8,
    /// Type (0xE = 64-bit interrupt gate), DPL, present.
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Gate>() == 16);

const GATE_INTERRUPT_PRESENT: u8 = 0x8E;

impl Gate {
    fn new(handler: u64, selector: u16, ist: u8) -> Self {
        Self {
            offset_low: handler as u16,
            selector,
            ist: ist & 0x7,
            attributes: GATE_INTERRUPT_PRESENT,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

/// The IDT, shared by every CPU: filled once by the BSP (`init`) before any AP starts,
/// read-only afterwards (by the CPUs' `lidt`).
struct IdtCell(core::cell::UnsafeCell<Idt>);
// SAFETY: written only by `init`, on the BSP, before any other CPU runs; never after.
unsafe impl Sync for IdtCell {}

static IDT: IdtCell = IdtCell(core::cell::UnsafeCell::new(Idt([Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    attributes: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
}; 256])));

/// Architectural exception vectors (SDM Vol. 3A Table 7-1).
pub const VECTOR_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization exception",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security exception",
    "reserved 31",
];

pub const VECTOR_NMI: u8 = 2;
pub const VECTOR_DOUBLE_FAULT: u8 = 8;
pub const VECTOR_PAGE_FAULT: u8 = 14;
pub const VECTOR_MACHINE_CHECK: u8 = 18;

/// Which IST stack each vector runs on: only the double fault, the NMI and the machine check
/// (as Linux does). Every other exception is taken on the stack it hit, without reading the
/// TSS: in the SVM world switch the TR holds the *guest's* TSS between VMLOAD of the guest
/// state and VMLOAD of the host's (APM Vol. 2 §15.5.2), so an IST lookup there reads a
/// guest-virtual address under Vireo's page tables and the CPU shuts down (a fault seen under
/// QEMU TCG right at the #VMEXIT return). Without IST the exception reaches
/// [`vireo_exception_dispatch`], which puts the host state back first. A stack overflow into
/// the guard page still gets a dump: the #PF cannot be pushed, which is a #DF on its own stack.
fn ist_for(vector: u8) -> u8 {
    match vector {
        VECTOR_DOUBLE_FAULT => gdt::IST_DOUBLE_FAULT,
        VECTOR_NMI => gdt::IST_NMI,
        VECTOR_MACHINE_CHECK => gdt::IST_MACHINE_CHECK,
        _ => 0,
    }
}

// The stubs: vectors with a CPU-pushed error code are 8, 10-14, 17, 21, 29, 30
// (SDM Vol. 3A Table 7-1; APM Vol. 2 Table 8-1 for #VC/#SX).
#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .text.vireo_idt, "ax"
    .balign 16
    .global vireo_exception_stubs
vireo_exception_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) | (vec == 10) | (vec == 11) | (vec == 12) | (vec == 13) | (vec == 14) | (vec == 17) | (vec == 21) | (vec == 29) | (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp vireo_exception_common
    .set vec, vec + 1
    .endr

vireo_exception_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call vireo_exception_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
"#,
    options(att_syntax)
);

/// Fills and loads the IDT (on the BSP). Call after `percpu::init_bsp` (the GDT).
#[cfg(target_os = "none")]
pub fn init() {
    extern "C" {
        static vireo_exception_stubs: u8;
    }
    // Taking the address of an extern static is safe (no read happens).
    let base = core::ptr::addr_of!(vireo_exception_stubs) as u64;
    let selector = gdt::code_selector();
    // SAFETY: single-threaded early boot (no AP started yet), interrupts off: nothing else
    // touches the IDT while it is filled; `lidt` then points at a static that lives forever.
    unsafe {
        let idt = &mut *IDT.0.get();
        for (vector, gate) in idt.0.iter_mut().enumerate() {
            *gate = Gate::new(base + vector as u64 * 16, selector, ist_for(vector as u8));
        }
    }
    load();
}

/// Loads the shared IDT on this CPU (the BSP through [`init`], each AP once at start).
#[cfg(target_os = "none")]
pub fn load() {
    let pointer = x86_64::structures::DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: x86_64::VirtAddr::new(IDT.0.get() as u64),
    };
    // SAFETY: IDT is a static filled by `init` on the BSP before any AP starts, and never
    // written again; every gate points at a stub in Vireo's text.
    unsafe { x86_64::instructions::tables::lidt(&pointer) };
}

/// What Vireo was doing before the per-CPU blocks exist (first lines of the boot).
static EARLY_CONTEXT: AtomicPtr<&'static str> = AtomicPtr::new(core::ptr::null_mut());

/// Records what this CPU is doing now, for crash dumps.
pub fn set_context(context: &'static &'static str) {
    match percpu::try_current() {
        Some(cpu) => cpu.set_context(context),
        None => EARLY_CONTEXT.store(context as *const _ as *mut _, Ordering::Relaxed),
    }
}

/// 1 + the index of the CPU that is printing a crash dump; 0 = none.
static IN_CRASH: AtomicUsize = AtomicUsize::new(0);

/// Called by the stubs with the saved registers.
#[no_mangle]
extern "C" fn vireo_exception_dispatch(frame: &mut TrapFrame) {
    if frame.vector < 32 {
        crash(frame);
    }
    super::interrupts::handle(frame.vector as u8);
}

/// Stack ranges a frame-pointer walk may read: this CPU's kernel stack and IST stacks.
fn known_stack(addr: u64) -> bool {
    let Some(cpu) = percpu::try_current() else { return false };
    let (lo, hi) = cpu.stack();
    let in_ist = (1..=5).any(|slot| {
        let (lo, hi) = gdt::ist_stack_range(slot);
        (lo..hi - 16).contains(&addr)
    });
    addr.is_multiple_of(8) && ((lo..hi - 16).contains(&addr) || in_ist)
}

/// Address of the boot stack's guard page.
fn guard_page() -> u64 {
    extern "C" {
        static boot_stack_guard: u8;
    }
    core::ptr::addr_of!(boot_stack_guard) as u64
}

fn crash(frame: &TrapFrame) -> ! {
    let me = percpu::try_current().map_or(0, |c| c.index());
    if let Err(owner) = IN_CRASH.compare_exchange(0, me + 1, Ordering::SeqCst, Ordering::SeqCst) {
        if owner != me + 1 {
            // Another CPU is printing its dump and will stop the machine: stay out of its way.
            super::halt_forever();
        }
        crate::console::serial::force_unlock();
        report!("crash nested vector={} rip={:#x}: giving up", frame.vector, frame.rip);
        crate::platform::exit::fail("nested exception");
    }
    // In the SVM world switch the guest's TR, GS and syscall MSRs are loaded: put the host's
    // back before anything reads GS (the per-CPU block) or the TSS.
    #[cfg(target_os = "none")]
    let in_world_switch = crate::svm::run::host_state_after_fault(frame.rip, frame.rsp);
    #[cfg(not(target_os = "none"))]
    let in_world_switch = false;
    crate::console::serial::force_unlock();
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let cr3 = x86_64::registers::control::Cr3::read_raw().0.start_address().as_u64();
    let name = VECTOR_NAMES[frame.vector as usize];
    report!(
        "crash vector={} name=\"{}\" error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} ss={:#x} cr2={:#x} cr3={:#x}",
        frame.vector, name, frame.error_code, frame.rip, frame.cs, frame.rflags, frame.rsp, frame.ss, cr2, cr3
    );
    let f = frame;
    report!("crash rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}", f.rax, f.rbx, f.rcx, f.rdx);
    report!("crash rsi={:#018x} rdi={:#018x} rbp={:#018x} rsp={:#018x}", f.rsi, f.rdi, f.rbp, f.rsp);
    report!("crash r8 ={:#018x} r9 ={:#018x} r10={:#018x} r11={:#018x}", f.r8, f.r9, f.r10, f.r11);
    report!("crash r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}", f.r12, f.r13, f.r14, f.r15);
    if (frame.vector == VECTOR_PAGE_FAULT as u64 || frame.vector == VECTOR_DOUBLE_FAULT as u64)
        && (guard_page()..guard_page() + 4096).contains(&cr2)
    {
        report!("crash note=\"stack overflow: the fault hit the boot stack's guard page\"");
    }
    if in_world_switch {
        report!("crash note=\"in the SVM world switch, right around VMRUN, with the guest's TR/GS loaded: host state reloaded for this dump; cr2 may be the guest's\"");
    }
    match percpu::try_current() {
        Some(cpu) => {
            report!("crash cpu index={} apic_id={}", cpu.index(), cpu.apic_id());
            if let Some(context) = cpu.context() {
                report!("crash context=\"{context}\"");
            }
        }
        None => {
            let context = EARLY_CONTEXT.load(Ordering::Relaxed);
            if !context.is_null() {
                // SAFETY: EARLY_CONTEXT only ever holds pointers to `&'static &'static str`.
                report!("crash context=\"{}\"", unsafe { *context });
            }
        }
    }
    // Frame-pointer walk (Vireo is built with frame pointers), reading only known stacks.
    let mut rbp = frame.rbp;
    let mut depth = 0;
    crate::console::serial::with_console(|c| {
        use core::fmt::Write;
        let _ = write!(c, "vireo: crash backtrace {:#x}", frame.rip);
        while depth < 16 && known_stack(rbp) {
            // SAFETY: rbp points into a mapped Vireo stack (checked above); a frame record
            // is [saved rbp, return address].
            let (next, ret) = unsafe { (*(rbp as *const u64), *((rbp + 8) as *const u64)) };
            if ret == 0 {
                break;
            }
            let _ = write!(c, " {ret:#x}");
            if next <= rbp {
                break;
            }
            rbp = next;
            depth += 1;
        }
        let _ = c.write_str("\r\n");
    });
    crate::platform::exit::fail("fatal CPU exception in Vireo");
}
