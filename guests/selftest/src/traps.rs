//! The guest's own IDT: exceptions the checks provoke are recorded and recovered from; the
//! test interrupt vector counts deliveries.

use core::sync::atomic::{AtomicU64, Ordering};

/// Length of the instruction a check expects to fault: the handler skips it (0: a fault is
/// unexpected).
pub static RECOVER: AtomicU64 = AtomicU64::new(0);
/// Last exception: vector + 1 (0 = none), and its error code.
pub static LAST_VECTOR: AtomicU64 = AtomicU64::new(0);
pub static LAST_ERROR: AtomicU64 = AtomicU64::new(0);
pub static IRQ_COUNT: AtomicU64 = AtomicU64::new(0);
pub static BP_COUNT: AtomicU64 = AtomicU64::new(0);

pub const TEST_VECTOR: u8 = 0x40;

#[repr(C)]
pub struct Frame {
    regs: [u64; 9], // rax rcx rdx rsi rdi r8 r9 r10 r11
    rbx: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);
static mut IDT: Idt = Idt([[0; 2]; 256]);

core::arch::global_asm!(
    ".section .text",
    ".balign 16",
    ".global guest_stubs",
    "guest_stubs:",
    ".set vec, 0",
    ".rept 256",
    ".balign 16",
    ".if (vec == 8) | (vec == 10) | (vec == 11) | (vec == 12) | (vec == 13) | (vec == 14) | (vec == 17)",
    ".else",
    "push 0",
    ".endif",
    "push vec",
    "jmp guest_common",
    ".set vec, vec + 1",
    ".endr",
    "guest_common:",
    // RBX is saved too: it holds the stack pointer across the call below.
    "push rbx",
    "push r11",
    "push r10",
    "push r9",
    "push r8",
    "push rdi",
    "push rsi",
    "push rdx",
    "push rcx",
    "push rax",
    "mov rdi, rsp",
    "mov rbx, rsp",
    "and rsp, -16",
    "cld",
    "call guest_trap",
    "mov rsp, rbx",
    "pop rax",
    "pop rcx",
    "pop rdx",
    "pop rsi",
    "pop rdi",
    "pop r8",
    "pop r9",
    "pop r10",
    "pop r11",
    "pop rbx",
    "add rsp, 16",
    "iretq",
);

#[no_mangle]
extern "C" fn guest_trap(frame: &mut Frame) {
    let v = frame.vector;
    if v == TEST_VECTOR as u64 {
        IRQ_COUNT.fetch_add(1, Ordering::SeqCst);
        return;
    }
    if v == crate::smp::IPI_VECTOR as u64 {
        crate::smp::on_ipi();
        return;
    }
    if v == crate::smp::BENCH_PING as u64 {
        crate::smp::on_bench_ping();
        return;
    }
    if v == crate::smp::BENCH_PONG as u64 {
        crate::smp::on_bench_pong();
        return;
    }
    if v == 2 {
        // NMI IPIs of the SMP checks.
        crate::smp::on_nmi();
        return;
    }
    if v == crate::smp::SPURIOUS_VECTOR as u64 {
        // A spurious interrupt (SDM §12.9): no EOI.
        return;
    }
    if v == 3 {
        // #BP is a trap: RIP is already past INT3.
        BP_COUNT.fetch_add(1, Ordering::SeqCst);
        LAST_VECTOR.store(v + 1, Ordering::SeqCst);
        return;
    }
    let skip = RECOVER.swap(0, Ordering::SeqCst);
    if v < 32 && skip != 0 {
        LAST_VECTOR.store(v + 1, Ordering::SeqCst);
        LAST_ERROR.store(frame.error, Ordering::SeqCst);
        frame.rip += skip;
        return;
    }
    use core::fmt::Write;
    let _ = writeln!(
        crate::console::Console,
        "selftest: unexpected exception vector={} error={:#x} rip={:#x}",
        v,
        frame.error,
        frame.rip
    );
    crate::guest::exit(99);
}

/// Takes the last recorded exception: (vector, error code).
pub fn take() -> Option<(u8, u64)> {
    let v = LAST_VECTOR.swap(0, Ordering::SeqCst);
    (v != 0).then(|| ((v - 1) as u8, LAST_ERROR.swap(0, Ordering::SeqCst)))
}

pub fn install() {
    extern "C" {
        static guest_stubs: u8;
    }
    let base = core::ptr::addr_of!(guest_stubs) as u64;
    // SAFETY: only the BSP runs yet (APs start later), IDT filled before LIDT points at it.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (v, gate) in idt.0.iter_mut().enumerate() {
            let h = base + v as u64 * 16;
            // 64-bit interrupt gate, DPL 0, present, selector 0x10 (Vireo's flat code).
            gate[0] = (h & 0xFFFF) | (0x10 << 16) | (0x8E00u64 << 32) | ((h >> 16) & 0xFFFF) << 48;
            gate[1] = h >> 32;
        }
    }
    load();
}

/// Loads the guest's IDT on this CPU (the BSP after filling it; each AP as it starts).
pub fn load() {
    let b = core::ptr::addr_of!(IDT) as u64;
    let ptr: [u16; 5] = [4095, b as u16, (b >> 16) as u16, (b >> 32) as u16, (b >> 48) as u16];
    // SAFETY: IDT is filled by `install` before any CPU calls this, and never changes after.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) ptr.as_ptr(), options(nostack)) };
}

/// Loads an empty IDT and raises #BP: #BP cannot be delivered -> #GP -> #DF -> shutdown.
pub fn triple_fault() -> ! {
    let ptr: [u16; 5] = [0; 5];
    // SAFETY: deliberately destroys this guest; Vireo must contain it.
    unsafe { core::arch::asm!("lidt [{}]", "int3", in(reg) ptr.as_ptr(), options(noreturn)) }
}

/// Arms recovery for the next instruction of `len` bytes.
pub fn expect_fault(len: u64) {
    RECOVER.store(len, Ordering::SeqCst);
}

/// Disarms recovery (the instruction did not fault) and returns the fault, if any.
pub fn settle() -> Option<(u8, u64)> {
    RECOVER.store(0, Ordering::SeqCst);
    take()
}
