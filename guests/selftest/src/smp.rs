//! Multi-vCPU checks (VM line `cpus=N`, N >= 2): application processors started by
//! INIT-SIPI-SIPI through a real-mode trampoline, IPIs both ways (physical, shorthand,
//! logical flat, NMI) and a spinlock-protected shared counter.
//!
//! The BSP drives everything; the APs, once in 64-bit Rust code, serve commands posted in
//! a mailbox (`CMD_*` statics) and acknowledge each one, then end parked (CLI; HLT). Every
//! wait of the BSP is bounded by a TSC deadline, so a broken start or a lost IPI gives a
//! FAIL line, never a hang.
//!
//! References: SDM Vol. 3A §9.4 (MP initialization: INIT-SIPI-SIPI, the 10 ms and 200 us
//! delays of §9.4.4.1), §10.8.5 (switching to IA-32e mode: protected mode, CR4.PAE, CR3,
//! IA32_EFER.LME, CR0.PG, then a far jump to a 64-bit code segment), §12.6 (issuing IPIs
//! through the ICR), §12.6.2 (physical and logical destinations, flat model), §12.8.5 (EOI).

use core::{
    arch::{asm, global_asm, x86_64::__cpuid},
    cell::UnsafeCell,
    fmt::Write,
    hint::spin_loop,
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
};

use crate::{checks::Tally, console::Console};

/// The most vCPUs a VM can have (Vireo's `cpus=` limit).
pub const MAX_CPUS: usize = 16;
const MAX_APS: usize = MAX_CPUS - 1;

/// Where the trampoline is copied: a free page below 1 MiB (Vireo's boot tables end at
/// 0x7FFF, the command line sits at 0x8000; `RESERVED_END` is 0x10000). SIPI vector 0x09.
const TRAMPOLINE: u64 = 0x9000;
/// Each AP's stack.
const AP_STACK_SIZE: usize = 16 * 1024;

/// The fixed IPI vector of these checks (priority class 5, above the test vector 0x40).
pub const IPI_VECTOR: u8 = 0x50;
/// The spurious-interrupt vector programmed in the SVR (its low 4 bits must be 1s on old
/// APICs; 0xFF is the usual choice).
pub const SPURIOUS_VECTOR: u8 = 0xFF;

// ---- local APIC (xAPIC MMIO, SDM Table 12-1) ---------------------------------------------

const APIC_BASE: u64 = 0xFEE0_0000;
const MSR_APIC_BASE: u32 = 0x1B;
const APIC_BASE_EXTD: u64 = 1 << 10;
const MSR_X2APIC_ID: u32 = 0x802;
const MSR_X2APIC_EOI: u32 = 0x80B;
const MSR_X2APIC_ICR: u32 = 0x830;
const REG_ID: u32 = 0x20;
const REG_EOI: u32 = 0xB0;
const REG_LDR: u32 = 0xD0;
const REG_DFR: u32 = 0xE0;
const REG_SVR: u32 = 0xF0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;

/// ICR low fields (SDM Figure 12-12).
mod icr {
    pub const FIXED: u32 = 0b000 << 8;
    pub const NMI: u32 = 0b100 << 8;
    pub const INIT: u32 = 0b101 << 8;
    pub const STARTUP: u32 = 0b110 << 8;
    pub const LOGICAL: u32 = 1 << 11;
    pub const DELIVERY_PENDING: u32 = 1 << 12;
    pub const ASSERT: u32 = 1 << 14;
    pub const ALL_EXCLUDING_SELF: u32 = 0b11 << 18;
}

// The accesses are plain 32-bit MOVs written out in assembly: a volatile read may compile to
// e.g. `test dword ptr [mem], imm`, which Vireo's MMIO emulation does not decode (it stops
// the VM with "cannot emulate the instruction of an MMIO access").

fn apic_read(reg: u32) -> u32 {
    let v: u32;
    // SAFETY: the xAPIC page is identity-mapped by Vireo's boot tables; an aligned 32-bit
    // access is what the SDM requires (§12.4.1).
    unsafe { asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) APIC_BASE + reg as u64, v = out(reg) v, options(nostack)) };
    v
}

fn apic_write(reg: u32, v: u32) {
    // SAFETY: as in `apic_read`.
    unsafe { asm!("mov dword ptr [{a}], {v:e}", a = in(reg) APIC_BASE + reg as u64, v = in(reg) v, options(nostack)) };
}

/// EOI for the interrupt being serviced (SDM §12.8.5): any value written to 0xB0, or to
/// MSR 0x80B in x2APIC mode (SDM §12.12.1).
pub fn eoi() {
    if X2APIC_MODE[cpu_index()].load(Ordering::SeqCst) {
        wrmsr_raw(MSR_X2APIC_EOI, 0);
    } else {
        apic_write(REG_EOI, 0);
    }
}

/// Switches this CPU's local APIC from xAPIC to x2APIC mode (SDM §12.12.5: IA32_APIC_BASE
/// EN=1, EXTD 0 -> 1) with interrupts off; returns whether it worked and the x2APIC ID
/// (MSR 0x802) reads the initial APIC ID.
fn enter_x2apic() -> bool {
    // SAFETY: no interrupt may arrive between the mode switch and the EOI path's flag.
    unsafe { asm!("cli", options(nomem, nostack)) };
    let me = cpu_index();
    let ok = match crate::checks::rdmsr(MSR_APIC_BASE) {
        Ok(base) => crate::checks::wrmsr(MSR_APIC_BASE, base | APIC_BASE_EXTD).is_none(),
        Err(_) => false,
    };
    let ok = ok && crate::checks::rdmsr(MSR_APIC_BASE).is_ok_and(|b| b & APIC_BASE_EXTD != 0);
    X2APIC_MODE[me].store(ok, Ordering::SeqCst);
    ok && crate::checks::rdmsr(MSR_X2APIC_ID) == Ok(initial_apic_id() as u64)
}

/// Sends an IPI in x2APIC mode: one WRMSR of the 64-bit ICR, destination in bits 63:32
/// (SDM §12.12.9); there is no delivery status to wait for.
fn send_ipi_x2apic(dest: u32, low: u32) {
    wrmsr_raw(MSR_X2APIC_ICR, (dest as u64) << 32 | low as u64);
}

/// WRMSR without fault recovery (the recovery of `checks::wrmsr` is one global slot, not
/// for CPUs that run at once): used only in x2APIC mode, where these MSRs exist; a #GP
/// would be reported by the trap handler as an unexpected exception and end the VM.
fn wrmsr_raw(msr: u32, v: u64) {
    // SAFETY: an x2APIC register write (EOI or ICR) in x2APIC mode.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack)) };
}

/// Software-enables this CPU's local APIC (SVR bit 8) with the spurious vector.
fn apic_enable() {
    apic_write(REG_SVR, (1 << 8) | SPURIOUS_VECTOR as u32);
}

/// Sends an IPI (SDM §12.6.1): destination in ICR high bits 31:24, then the low half,
/// which sends. Waits (bounded) for the delivery status to go idle before and after.
/// Returns false if it never did.
fn send_ipi(dest: u8, low: u32) -> bool {
    let idle = || apic_read(REG_ICR_LOW) & icr::DELIVERY_PENDING == 0;
    let ready = wait_ms(100, idle);
    apic_write(REG_ICR_HIGH, (dest as u32) << 24);
    apic_write(REG_ICR_LOW, low);
    ready && wait_ms(100, idle)
}

/// This CPU's initial APIC ID (CPUID.1:EBX[31:24]).
pub fn initial_apic_id() -> u32 {
    __cpuid(1).ebx >> 24
}

// ---- time --------------------------------------------------------------------------------

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per millisecond: CPUID leaf 0x16 (base frequency in MHz; Vireo reports the
/// TSC rate it calibrated there, e.g. 40 MHz in Bochs), else a generous 4 GHz guess
/// (timeouts get longer, delays never shorter than asked on a slower TSC).
pub fn tsc_per_ms() -> u64 {
    static CACHED: AtomicU64 = AtomicU64::new(0);
    let c = CACHED.load(Ordering::Relaxed);
    if c != 0 {
        return c;
    }
    let mhz = __cpuid(0x16).eax as u64;
    let per_ms = if (1..=20_000).contains(&mhz) { mhz * 1000 } else { 4_000_000 };
    CACHED.store(per_ms, Ordering::Relaxed);
    per_ms
}

/// Polls `cond` until it holds or `ms` milliseconds of TSC time passed.
fn wait_ms(ms: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = rdtsc().saturating_add(ms * tsc_per_ms());
    loop {
        if cond() {
            return true;
        }
        if rdtsc() > end {
            return cond();
        }
        spin_loop();
    }
}

fn delay_us(us: u64) {
    let end = rdtsc().saturating_add(us * tsc_per_ms() / 1000);
    while rdtsc() < end {
        spin_loop();
    }
}

/// Runs `f` with interrupts enabled on this CPU (the BSP runs its checks with IF=0).
fn with_interrupts<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: the guest's IDT handles every vector; IF goes back to 0 afterwards.
    unsafe { asm!("sti", options(nomem, nostack)) };
    let r = f();
    // SAFETY: as above.
    unsafe { asm!("cli", options(nomem, nostack)) };
    r
}

// ---- the trampoline ----------------------------------------------------------------------

// Copied to TRAMPOLINE; an AP starts at CS = 0x0900, IP = 0 in real mode (SDM §9.4.4). Data
// slots at its end are filled by the BSP: CR3/CR4/CR0/EFER as the BSP runs with, the base of
// the AP stacks and the 64-bit entry. Each AP takes a ticket (LOCK XADD): its stack is
// stacks + (ticket + 1) * AP_STACK_SIZE, so APs never share a stack even if they start late.
global_asm!(
    ".section .text.ap_trampoline, \"ax\"",
    ".balign 16",
    ".global ap_tramp_start",
    ".global ap_tramp_end",
    ".global ap_tramp_cr3",
    ".global ap_tramp_cr4",
    ".global ap_tramp_cr0",
    ".global ap_tramp_efer",
    ".global ap_tramp_stacks",
    ".global ap_tramp_entry",
    ".global ap_tramp_ticket",
    ".set TB, {base}",
    ".code16",
    "ap_tramp_start:",
    "cli",
    "cld",
    "movw %cs, %ax",
    "movw %ax, %ds",
    // A 32-bit GDT base (operand-size prefix), DS-relative offset.
    "lgdtl (ap_tramp_gdtr - ap_tramp_start)",
    "movl %cr0, %eax",
    "orl $1, %eax",
    "movl %eax, %cr0",
    "ljmpl $0x08, $(TB + ap_tramp_pm32 - ap_tramp_start)",
    ".code32",
    "ap_tramp_pm32:",
    "movw $0x18, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movw %ax, %fs",
    "movw %ax, %gs",
    // SDM §10.8.5: CR4.PAE, CR3, EFER.LME, then CR0.PG (with PE) activates IA-32e mode.
    "movl (TB + ap_tramp_cr4 - ap_tramp_start), %eax",
    "movl %eax, %cr4",
    "movl (TB + ap_tramp_cr3 - ap_tramp_start), %eax",
    "movl %eax, %cr3",
    "movl $0xC0000080, %ecx",
    "movl (TB + ap_tramp_efer - ap_tramp_start), %eax",
    "xorl %edx, %edx",
    "wrmsr",
    "movl (TB + ap_tramp_cr0 - ap_tramp_start), %eax",
    "movl %eax, %cr0",
    "ljmpl $0x10, $(TB + ap_tramp_lm64 - ap_tramp_start)",
    ".code64",
    "ap_tramp_lm64:",
    "movl $1, %eax",
    "lock xaddl %eax, (TB + ap_tramp_ticket - ap_tramp_start)",
    "cmpl ${max_aps}, %eax",
    "jae 2f",
    "movq (TB + ap_tramp_stacks - ap_tramp_start), %rsp",
    "leaq 1(%rax), %rcx",
    "imulq ${stack}, %rcx",
    "addq %rcx, %rsp",
    "movl %eax, %edi",
    "movq (TB + ap_tramp_entry - ap_tramp_start), %rax",
    "callq *%rax",
    "2:",
    "cli",
    "hlt",
    "jmp 2b",
    ".balign 8",
    // null; 0x08 32-bit code; 0x10 64-bit code; 0x18 data: the selectors of Vireo's boot
    // GDT (0x10 code, 0x18 data), so the BSP's IDT gates are valid here too.
    "ap_tramp_gdt:",
    ".quad 0",
    ".quad 0x00CF9B000000FFFF",
    ".quad 0x00AF9B000000FFFF",
    ".quad 0x00CF93000000FFFF",
    "ap_tramp_gdtr:",
    ".word 31",
    ".long TB + ap_tramp_gdt - ap_tramp_start",
    ".balign 8",
    "ap_tramp_cr3: .quad 0",
    "ap_tramp_cr4: .quad 0",
    "ap_tramp_cr0: .quad 0",
    "ap_tramp_efer: .quad 0",
    "ap_tramp_stacks: .quad 0",
    "ap_tramp_entry: .quad 0",
    "ap_tramp_ticket: .long 0",
    "ap_tramp_end:",
    ".text",
    base = const TRAMPOLINE,
    max_aps = const MAX_APS,
    stack = const AP_STACK_SIZE,
    options(att_syntax)
);

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static ap_tramp_cr3: u8;
    static ap_tramp_cr4: u8;
    static ap_tramp_cr0: u8;
    static ap_tramp_efer: u8;
    static ap_tramp_stacks: u8;
    static ap_tramp_entry: u8;
}

#[repr(C, align(16))]
struct Stacks(UnsafeCell<[u8; MAX_APS * AP_STACK_SIZE + AP_STACK_SIZE]>);
// SAFETY: each AP owns its own slice (by ticket); the BSP only takes the base address.
unsafe impl Sync for Stacks {}
static AP_STACKS: Stacks = Stacks(UnsafeCell::new([0; MAX_APS * AP_STACK_SIZE + AP_STACK_SIZE]));

/// The BSP's GDTR (10 bytes, padded), for the APs to load.
static BSP_GDTR: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Copies the trampoline to TRAMPOLINE and fills its slots from the BSP's own state.
fn install_trampoline() {
    let start = core::ptr::addr_of!(ap_tramp_start) as u64;
    let len = core::ptr::addr_of!(ap_tramp_end) as u64 - start;
    let slot = |sym: *const u8| (TRAMPOLINE + (sym as u64 - start)) as *mut u64;
    let (cr0, cr3, cr4): (u64, u64, u64);
    // SAFETY: reading control registers at CPL 0 has no side effects.
    unsafe { asm!("mov {}, cr0", "mov {}, cr3", "mov {}, cr4", out(reg) cr0, out(reg) cr3, out(reg) cr4) };
    let efer = crate::checks::rdmsr(0xC000_0080).unwrap_or(0x901);
    // Only the bits the trampoline may set before and while entering IA-32e mode:
    // CR0: PE MP ET NE WP PG (the BSP's FPU/SSE setup); CR4: PAE PGE OSFXSR OSXMMEXCPT;
    // EFER: SCE LME NXE (LMA is set by the CPU).
    let cr0 = (cr0 & 0x8001_0033) | 0x8000_0001;
    let cr4 = (cr4 & 0x6A0) | 0x20;
    let efer = (efer & 0x901) | 0x100;
    let mut gdtr = [0u64; 2];
    // SAFETY: SGDT stores 10 bytes into `gdtr` (16 bytes); the trampoline page is free guest
    // RAM below RESERVED_END that nothing else uses; the copy has `len` bytes from our image.
    unsafe {
        asm!("sgdt [{}]", in(reg) gdtr.as_mut_ptr(), options(nostack));
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len as usize);
        slot(core::ptr::addr_of!(ap_tramp_cr3)).write_volatile(cr3);
        slot(core::ptr::addr_of!(ap_tramp_cr4)).write_volatile(cr4);
        slot(core::ptr::addr_of!(ap_tramp_cr0)).write_volatile(cr0);
        slot(core::ptr::addr_of!(ap_tramp_efer)).write_volatile(efer);
        slot(core::ptr::addr_of!(ap_tramp_stacks)).write_volatile(AP_STACKS.0.get() as u64);
        slot(core::ptr::addr_of!(ap_tramp_entry)).write_volatile(ap_main as *const () as u64);
    }
    BSP_GDTR[0].store(gdtr[0], Ordering::SeqCst);
    BSP_GDTR[1].store(gdtr[1], Ordering::SeqCst);
}

// ---- shared state ------------------------------------------------------------------------

/// APs that reached `ap_main`.
static CHECKED_IN: AtomicU32 = AtomicU32::new(0);
/// Per ticket: the AP's initial APIC ID + 1 and its APIC ID register + 1 (0: none yet).
static TICKET_CPUID_ID: [AtomicU32; MAX_APS] = [const { AtomicU32::new(0) }; MAX_APS];
static TICKET_REG_ID: [AtomicU32; MAX_APS] = [const { AtomicU32::new(0) }; MAX_APS];
/// Bit i: the CPU with APIC ID i serves commands.
static ALIVE: AtomicU32 = AtomicU32::new(0);
/// Fixed IPIs (IPI_VECTOR) and NMIs received, per APIC ID.
static IPIS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static NMIS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

/// The mailbox: the BSP writes the command and its argument, then bumps the sequence
/// number; each AP runs it and stores the number in its ACK slot.
static CMD_SEQ: AtomicU32 = AtomicU32::new(0);
static CMD: AtomicU32 = AtomicU32::new(0);
static CMD_ARG: AtomicU64 = AtomicU64::new(0);
static ACK: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

/// AP commands.
const CMD_SEND_IPI: u32 = 1; // arg: sender APIC ID | dest << 8 | ICR low << 32
const CMD_LOGICAL_FLAT: u32 = 2; // set DFR flat, LDR = one bit per APIC ID (< 8)
const CMD_COUNT: u32 = 3; // arg: iterations of the locked increment
const CMD_PARK: u32 = 4;
const CMD_X2APIC: u32 = 5; // switch to x2APIC mode
const CMD_SEND_IPI_X2APIC: u32 = 6; // as CMD_SEND_IPI, through MSR 0x830
/// Per APIC ID: the local APIC is in x2APIC mode (the EOI goes to MSR 0x80B).
static X2APIC_MODE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// Per APIC ID: the switch to x2APIC mode worked (and the x2APIC ID was right).
static X2APIC_OK: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

fn cpu_index() -> usize {
    (initial_apic_id() as usize).min(MAX_CPUS - 1)
}

/// Called by the guest's trap handler for IPI_VECTOR.
pub fn on_ipi() {
    IPIS[cpu_index()].fetch_add(1, Ordering::SeqCst);
    eoi();
}

/// The IPI round-trip benchmark (`ipibench=N`): the BSP sends BENCH_PING to AP 1, whose
/// handler answers with BENCH_PONG to the BSP. Vectors of their own, so that neither
/// handler needs CPUID (an exit) to know which CPU it runs on.
pub const BENCH_PING: u8 = 0x51;
pub const BENCH_PONG: u8 = 0x52;
/// BENCH_PING interrupts taken by AP 1, BENCH_PONG interrupts taken by the BSP.
static PINGS: AtomicU64 = AtomicU64::new(0);
static PONGS: AtomicU64 = AtomicU64::new(0);

/// A fixed IPI the lean way, for the benchmark: ICR high, then ICR low (which sends), with
/// no polling of the delivery status (Vireo delivers at the write of ICR low).
fn bench_send(dest: u8, vector: u8) {
    apic_write(REG_ICR_HIGH, (dest as u32) << 24);
    apic_write(REG_ICR_LOW, icr::FIXED | icr::ASSERT | vector as u32);
}

/// Called by the guest's trap handler for BENCH_PING (on AP 1): answer the BSP.
pub fn on_bench_ping() {
    PINGS.fetch_add(1, Ordering::SeqCst);
    bench_send(0, BENCH_PONG);
    apic_write(REG_EOI, 0);
}

/// Called by the guest's trap handler for BENCH_PONG (on the BSP).
pub fn on_bench_pong() {
    PONGS.fetch_add(1, Ordering::SeqCst);
    apic_write(REG_EOI, 0);
}

/// Round-trip times kept for the median (the first this many).
const BENCH_SAMPLES: usize = 8192;
struct Samples(UnsafeCell<[u64; BENCH_SAMPLES]>);
// SAFETY: only the BSP touches it, in `ipi_bench`.
unsafe impl Sync for Samples {}
static SAMPLES: Samples = Samples(UnsafeCell::new([0; BENCH_SAMPLES]));

/// `n` IPI round trips BSP -> AP 1 -> BSP (after 16 unmeasured ones), timed with the TSC
/// on the BSP, which spins with interrupts on while it waits. Prints
/// `selftest: ipi_round_trip n=N ticks=T ns=X ...` (T: mean TSC ticks per round trip, X the
/// same in ns from the TSC rate of CPUID 0x16) and returns 0, or prints a FAIL line and
/// returns 1.
pub fn ipi_bench(cpus: usize, n: u64) -> u32 {
    if cpus < 2 {
        let _ = writeln!(Console, "selftest: ipi_round_trip FAIL needs cpus=2 or more on the VM line");
        return 1;
    }
    let mut buf = Buf::new();
    if start_aps(cpus.min(MAX_CPUS), &mut buf).is_err() || ALIVE.load(Ordering::SeqCst) & 2 == 0 {
        let _ = writeln!(Console, "selftest: ipi_round_trip FAIL AP 1 did not start: {}", buf.as_str());
        return 1;
    }
    const WARMUP: u64 = 16;
    let (mut total, mut min, mut max, mut lost) = (0u64, u64::MAX, 0u64, None);
    // SAFETY: only this CPU uses SAMPLES.
    let samples = unsafe { &mut *SAMPLES.0.get() };
    with_interrupts(|| {
        for i in 0..n + WARMUP {
            let before = PONGS.load(Ordering::SeqCst);
            let t0 = rdtsc();
            bench_send(1, BENCH_PING);
            if !wait_ms(1000, || PONGS.load(Ordering::SeqCst) != before) {
                lost = Some(i);
                return;
            }
            let dt = rdtsc() - t0;
            if i >= WARMUP {
                let k = (i - WARMUP) as usize;
                if k < BENCH_SAMPLES {
                    samples[k] = dt;
                }
                total += dt;
                min = min.min(dt);
                max = max.max(dt);
            }
        }
    });
    if let Some(i) = lost {
        let _ = writeln!(
            Console,
            "selftest: ipi_round_trip FAIL no answer to round trip {i} within 1000 ms (AP 1 took {} pings, the BSP {} pongs; AP loop ran {} times)",
            PINGS.load(Ordering::SeqCst),
            PONGS.load(Ordering::SeqCst),
            HEARTBEAT[1].load(Ordering::Relaxed)
        );
        return 1;
    }
    let kept = &mut samples[..(n as usize).min(BENCH_SAMPLES)];
    kept.sort_unstable();
    let median = kept.get(kept.len() / 2).copied().unwrap_or(0);
    let per_ms = tsc_per_ms();
    let ns = |t: u64| t.saturating_mul(1_000_000) / per_ms;
    let mean = total / n.max(1);
    let _ = writeln!(
        Console,
        "selftest: ipi_round_trip n={n} ticks={mean} ns={} median_ns={} min_ns={} max_ns={} tsc_khz={per_ms}",
        ns(mean),
        ns(median),
        ns(if n == 0 { 0 } else { min }),
        ns(max)
    );
    if !command(CMD_PARK, 0, 5000) {
        let _ = writeln!(Console, "selftest: smp some APs did not acknowledge parking");
    }
    0
}

/// Called by the guest's trap handler for vector 2.
pub fn on_nmi() {
    NMIS[cpu_index()].fetch_add(1, Ordering::SeqCst);
}

/// A spinlock built on LOCK CMPXCHG (compare_exchange), with a deadline.
struct SpinLock(AtomicBool);

impl SpinLock {
    fn lock(&self, deadline: u64) -> bool {
        loop {
            if self.0.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return true;
            }
            while self.0.load(Ordering::Relaxed) {
                if rdtsc() > deadline {
                    return false;
                }
                spin_loop();
            }
        }
    }

    fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

static LOCK: SpinLock = SpinLock(AtomicBool::new(false));
struct Counter(UnsafeCell<u64>);
// SAFETY: only accessed under LOCK (or by the BSP while no AP counts).
unsafe impl Sync for Counter {}
static COUNTER: Counter = Counter(UnsafeCell::new(0));
/// Lock acquisitions that timed out.
static LOCK_TIMEOUTS: AtomicU32 = AtomicU32::new(0);

/// `k` increments of COUNTER under LOCK: a plain (non-atomic) read, a short pause that widens
/// the window a broken lock would show in, and a plain write.
fn count(k: u64) {
    let deadline = rdtsc().saturating_add(20_000 * tsc_per_ms());
    for _ in 0..k {
        if !LOCK.lock(deadline) {
            LOCK_TIMEOUTS.fetch_add(1, Ordering::SeqCst);
            return;
        }
        // SAFETY: LOCK is held: no other CPU touches COUNTER.
        unsafe {
            let v = core::ptr::read_volatile(COUNTER.0.get());
            for _ in 0..4 {
                spin_loop();
            }
            core::ptr::write_volatile(COUNTER.0.get(), v + 1);
        }
        LOCK.unlock();
    }
}

fn park() -> ! {
    loop {
        // SAFETY: this CPU has nothing left to do; only INIT could restart it.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

// ---- the AP side -------------------------------------------------------------------------

/// The APs' 64-bit entry (from the trampoline, on their own stack, IF = 0).
extern "C" fn ap_main(ticket: u32) -> ! {
    let gdtr = [BSP_GDTR[0].load(Ordering::SeqCst), BSP_GDTR[1].load(Ordering::SeqCst)];
    // SAFETY: the BSP's GDT has the same selectors as the trampoline's (0x10 code, 0x18
    // data), so CS and the data segments stay valid.
    unsafe { asm!("lgdt [{}]", in(reg) gdtr.as_ptr(), options(nostack)) };
    crate::traps::load();
    let id = initial_apic_id();
    let t = ticket as usize;
    TICKET_CPUID_ID[t].store(id + 1, Ordering::SeqCst);
    apic_enable();
    TICKET_REG_ID[t].store((apic_read(REG_ID) >> 24) + 1, Ordering::SeqCst);
    CHECKED_IN.fetch_add(1, Ordering::SeqCst);
    if id as usize >= MAX_CPUS || id == 0 {
        park();
    }
    let me = id as usize;
    ALIVE.fetch_or(1 << me, Ordering::SeqCst);
    // SAFETY: the IDT is loaded and the local APIC enabled: the APs take IPIs while serving.
    unsafe { asm!("sti", options(nomem, nostack)) };
    let mut seen = 0;
    loop {
        HEARTBEAT[me].fetch_add(1, Ordering::Relaxed);
        let seq = CMD_SEQ.load(Ordering::Acquire);
        if seq == seen {
            spin_loop();
            continue;
        }
        seen = seq;
        let arg = CMD_ARG.load(Ordering::SeqCst);
        match CMD.load(Ordering::SeqCst) {
            CMD_SEND_IPI if arg as u8 as usize == me => {
                send_ipi((arg >> 8) as u8, (arg >> 32) as u32);
            }
            CMD_LOGICAL_FLAT => {
                apic_write(REG_DFR, 0xFFFF_FFFF);
                apic_write(REG_LDR, logical_id(me) << 24);
            }
            CMD_COUNT => count(arg),
            CMD_X2APIC if arg as usize == me => {
                X2APIC_OK[me].store(enter_x2apic(), Ordering::SeqCst);
                // SAFETY: back to serving with interrupts on.
                unsafe { asm!("sti", options(nomem, nostack)) };
            }
            CMD_SEND_IPI_X2APIC if arg as u8 as usize == me => {
                send_ipi_x2apic((arg >> 8) as u8 as u32, (arg >> 32) as u32);
            }
            CMD_PARK => {
                ACK[me].store(seq, Ordering::SeqCst);
                park();
            }
            _ => {}
        }
        ACK[me].store(seq, Ordering::Release);
    }
}

/// The flat-model logical ID of APIC ID `id` (one bit of 8; none beyond 8 CPUs).
fn logical_id(id: usize) -> u32 {
    if id < 8 {
        1 << id
    } else {
        0
    }
}

// ---- the BSP side ------------------------------------------------------------------------

/// Posts a command to the APs and waits (bounded) for every alive AP to acknowledge it.
fn command(cmd: u32, arg: u64, ms: u64) -> bool {
    CMD.store(cmd, Ordering::SeqCst);
    CMD_ARG.store(arg, Ordering::SeqCst);
    let seq = CMD_SEQ.fetch_add(1, Ordering::SeqCst) + 1;
    let alive = ALIVE.load(Ordering::SeqCst);
    let beats: [u64; MAX_CPUS] = core::array::from_fn(|i| HEARTBEAT[i].load(Ordering::Relaxed));
    let done = wait_ms(ms, || aps(alive).all(|i| ACK[i].load(Ordering::Acquire) == seq));
    for i in aps(alive).filter(|&i| ACK[i].load(Ordering::Acquire) != seq) {
        // Evidence for a FAIL: did the AP run its loop at all while we waited?
        let _ = writeln!(
            Console,
            "selftest: smp command {cmd} seq {seq}: AP {i} acknowledged {} after {ms} ms; its loop ran {} times meanwhile",
            ACK[i].load(Ordering::Acquire),
            HEARTBEAT[i].load(Ordering::Relaxed).wrapping_sub(beats[i])
        );
    }
    done
}

/// Per APIC ID: iterations of the AP's command loop.
static HEARTBEAT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn aps(alive: u32) -> impl Iterator<Item = usize> {
    (1..MAX_CPUS).filter(move |i| alive & (1 << i) != 0)
}

fn ipi_counts() -> [u32; MAX_CPUS] {
    core::array::from_fn(|i| IPIS[i].load(Ordering::SeqCst))
}

/// Waits with interrupts on until the IPI counters are `want`, then a little longer to see
/// that no extra IPI arrives. Ok or a description of the first difference.
fn expect_counts(want: &[u32; MAX_CPUS], what: &str, buf: &mut Buf) -> Result<(), ()> {
    let ok = with_interrupts(|| {
        let ok = wait_ms(2000, || ipi_counts() == *want);
        // Long enough for every vCPU to run once more (Vireo's slices are 5 ms).
        delay_us(20_000);
        ok
    });
    let got = ipi_counts();
    if ok && got == *want {
        return Ok(());
    }
    let i = (0..MAX_CPUS).find(|&i| got[i] != want[i]).unwrap_or(0);
    let _ = write!(buf, "{what}: cpu {i} got {} IPIs, expected {}", got[i], want[i]);
    Err(())
}

/// A small formatting buffer for FAIL details.
pub struct Buf {
    bytes: [u8; 160],
    len: usize,
}

impl Buf {
    pub const fn new() -> Self {
        Self { bytes: [0; 160], len: 0 }
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("?")
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

impl Write for Buf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn result(r: Result<(), ()>, buf: &Buf) -> Result<(), &str> {
    r.map_err(|()| buf.as_str())
}

/// INIT-SIPI-SIPI to each AP in turn (SDM §9.4.4.1), each awaited before the next.
fn start_aps(cpus: usize, buf: &mut Buf) -> Result<(), ()> {
    if __cpuid(1).edx & (1 << 9) == 0 {
        let _ = write!(buf, "CPUID.1:EDX.APIC clear");
        return Err(());
    }
    let base = crate::checks::rdmsr(MSR_APIC_BASE).unwrap_or(0);
    if base & !0xFFF != APIC_BASE || base & (1 << 11) == 0 || base & (1 << 10) != 0 || base & (1 << 8) == 0 {
        let _ = write!(buf, "IA32_APIC_BASE={base:#x}: not an enabled xAPIC at {APIC_BASE:#x} on the BSP");
        return Err(());
    }
    if initial_apic_id() != 0 || apic_read(REG_ID) >> 24 != 0 {
        let _ = write!(buf, "BSP APIC ID {} (register {:#x}), expected 0", initial_apic_id(), apic_read(REG_ID));
        return Err(());
    }
    apic_enable();
    install_trampoline();
    let vector = (TRAMPOLINE >> 12) as u32;
    let mut failed = false;
    for ap in 1..cpus {
        let before = CHECKED_IN.load(Ordering::SeqCst);
        let mut sent = send_ipi(ap as u8, icr::INIT | icr::ASSERT);
        delay_us(10_000);
        for _ in 0..2 {
            sent &= send_ipi(ap as u8, icr::STARTUP | icr::ASSERT | vector);
            delay_us(200);
        }
        let arrived = wait_ms(3000, || CHECKED_IN.load(Ordering::SeqCst) > before);
        let started = sent && arrived;
        if !started && !failed {
            failed = true;
            let _ = write!(buf, "AP {ap} did not check in (ICR went idle: {sent})");
        }
    }
    // Every AP reported its APIC ID (in start order: ticket k is APIC ID k + 1), all
    // distinct, and its APIC ID register agrees.
    for t in 0..cpus - 1 {
        let (c, r) = (TICKET_CPUID_ID[t].load(Ordering::SeqCst), TICKET_REG_ID[t].load(Ordering::SeqCst));
        if (c, r) != (t as u32 + 2, t as u32 + 2) && !failed {
            failed = true;
            let _ = write!(
                buf,
                "AP started {}th reports CPUID APIC ID {} and ID register {} (expected {})",
                t + 1,
                c as i64 - 1,
                r as i64 - 1,
                t + 1
            );
        }
    }
    let alive = ALIVE.load(Ordering::SeqCst);
    let want = ((1u32 << cpus) - 1) & !1;
    if alive != want && !failed {
        failed = true;
        let _ = write!(buf, "serving APs {alive:#x}, expected {want:#x}");
    }
    if failed {
        Err(())
    } else {
        Ok(())
    }
}

fn bsp_to_ap(alive: u32, buf: &mut Buf) -> Result<(), ()> {
    for ap in aps(alive) {
        let mut want = ipi_counts();
        want[ap] += 1;
        send_ipi(ap as u8, icr::FIXED | icr::ASSERT | IPI_VECTOR as u32);
        expect_counts(&want, "physical", buf)?;
    }
    Ok(())
}

fn ap_to_bsp(alive: u32, buf: &mut Buf) -> Result<(), ()> {
    for ap in aps(alive) {
        let mut want = ipi_counts();
        want[0] += 1;
        let low = icr::FIXED | icr::ASSERT | IPI_VECTOR as u32;
        if !command(CMD_SEND_IPI, ap as u64 | (low as u64) << 32, 5000) {
            let _ = write!(buf, "AP {ap} did not acknowledge the command to send");
            return Err(());
        }
        expect_counts(&want, "physical", buf)?;
    }
    Ok(())
}

/// All-excluding-self from the BSP, then from the first AP.
fn shorthand(alive: u32, buf: &mut Buf) -> Result<(), ()> {
    let low = icr::FIXED | icr::ASSERT | icr::ALL_EXCLUDING_SELF | IPI_VECTOR as u32;
    let mut want = ipi_counts();
    for ap in aps(alive) {
        want[ap] += 1;
    }
    send_ipi(0, low);
    expect_counts(&want, "from the BSP", buf)?;
    let sender = aps(alive).next().unwrap_or(1);
    let mut want = ipi_counts();
    want[0] += 1;
    for ap in aps(alive).filter(|&ap| ap != sender) {
        want[ap] += 1;
    }
    if !command(CMD_SEND_IPI, sender as u64 | (low as u64) << 32, 5000) {
        let _ = write!(buf, "AP {sender} did not acknowledge the command to send");
        return Err(());
    }
    expect_counts(&want, "from an AP", buf)
}

/// Flat logical model (SDM §12.6.2.2): DFR = all ones, LDR = one bit per CPU; the BSP sends
/// to all APs at once, then the first AP sends to the BSP.
fn logical(alive: u32, buf: &mut Buf) -> Result<(), ()> {
    apic_write(REG_DFR, 0xFFFF_FFFF);
    apic_write(REG_LDR, logical_id(0) << 24);
    if !command(CMD_LOGICAL_FLAT, 0, 5000) {
        let _ = write!(buf, "APs did not acknowledge the LDR/DFR setup");
        return Err(());
    }
    let low = icr::FIXED | icr::ASSERT | icr::LOGICAL | IPI_VECTOR as u32;
    let mut want = ipi_counts();
    let mut mda = 0u32;
    for ap in aps(alive).filter(|&ap| ap < 8) {
        mda |= logical_id(ap);
        want[ap] += 1;
    }
    send_ipi(mda as u8, low);
    expect_counts(&want, "BSP to APs", buf)?;
    let sender = aps(alive).next().unwrap_or(1);
    let mut want = ipi_counts();
    want[0] += 1;
    let arg = sender as u64 | (logical_id(0) as u64) << 8 | (low as u64) << 32;
    if !command(CMD_SEND_IPI, arg, 5000) {
        let _ = write!(buf, "AP {sender} did not acknowledge the command to send");
        return Err(());
    }
    expect_counts(&want, "AP to BSP", buf)
}

fn nmi(alive: u32, buf: &mut Buf) -> Result<(), ()> {
    for ap in aps(alive) {
        let before = NMIS[ap].load(Ordering::SeqCst);
        send_ipi(ap as u8, icr::NMI | icr::ASSERT);
        if !wait_ms(2000, || NMIS[ap].load(Ordering::SeqCst) == before + 1) {
            let _ = write!(buf, "AP {ap} took {} NMIs, expected {}", NMIS[ap].load(Ordering::SeqCst), before + 1);
            return Err(());
        }
    }
    Ok(())
}

/// Every CPU switches to x2APIC mode; fixed IPIs through MSR 0x830 both ways, EOIs
/// through MSR 0x80B. Runs after the xAPIC checks (there is no way back short of disabling
/// the APIC).
fn x2apic(alive: u32, buf: &mut Buf) -> Result<(), ()> {
    if __cpuid(1).ecx & (1 << 21) == 0 {
        let _ = write!(buf, "CPUID.1:ECX.x2APIC clear");
        return Err(());
    }
    if !enter_x2apic() {
        let _ = write!(buf, "the BSP did not switch to x2APIC mode (or its x2APIC ID is not 0)");
        return Err(());
    }
    // One AP at a time: the fault recovery of `checks::rdmsr`/`wrmsr` is one global slot.
    for ap in aps(alive) {
        if !command(CMD_X2APIC, ap as u64, 5000) {
            let _ = write!(buf, "AP {ap} did not acknowledge the switch to x2APIC mode");
            return Err(());
        }
    }
    if let Some(ap) = aps(alive).find(|&ap| !X2APIC_OK[ap].load(Ordering::SeqCst)) {
        let _ = write!(buf, "AP {ap} did not switch to x2APIC mode (or its x2APIC ID is wrong)");
        return Err(());
    }
    let low = icr::FIXED | icr::ASSERT | IPI_VECTOR as u32;
    for ap in aps(alive) {
        let mut want = ipi_counts();
        want[ap] += 1;
        send_ipi_x2apic(ap as u32, low);
        expect_counts(&want, "BSP to AP", buf)?;
        let mut want = ipi_counts();
        want[0] += 1;
        if !command(CMD_SEND_IPI_X2APIC, ap as u64 | (low as u64) << 32, 5000) {
            let _ = write!(buf, "AP {ap} did not acknowledge the command to send");
            return Err(());
        }
        expect_counts(&want, "AP to BSP", buf)?;
    }
    Ok(())
}

fn shared_counter(alive: u32, cpus: usize, buf: &mut Buf) -> Result<(), ()> {
    const K: u64 = 20_000;
    // SAFETY: no AP counts now (every command before was acknowledged or timed out).
    unsafe { core::ptr::write_volatile(COUNTER.0.get(), 0) };
    CMD.store(CMD_COUNT, Ordering::SeqCst);
    CMD_ARG.store(K, Ordering::SeqCst);
    let seq = CMD_SEQ.fetch_add(1, Ordering::SeqCst) + 1;
    count(K);
    let done = wait_ms(30_000, || aps(alive).all(|i| ACK[i].load(Ordering::Acquire) == seq));
    let _ = LOCK.lock(rdtsc().saturating_add(1000 * tsc_per_ms()));
    // SAFETY: LOCK is held.
    let got = unsafe { core::ptr::read_volatile(COUNTER.0.get()) };
    LOCK.unlock();
    let want = cpus as u64 * K;
    let timeouts = LOCK_TIMEOUTS.load(Ordering::SeqCst);
    if done && got == want && timeouts == 0 {
        return Ok(());
    }
    let _ =
        write!(buf, "counter {got}, expected {want} ({cpus} CPUs x {K}); all done: {done}; lock timeouts: {timeouts}");
    Err(())
}

/// The SMP checks for a VM of `cpus` vCPUs (from the command line's `cpus=`).
pub fn run(t: &mut Tally, cpus: usize) {
    if cpus < 2 {
        let _ = writeln!(Console, "selftest: smp not applicable (1 vCPU)");
        return;
    }
    let cpus = cpus.min(MAX_CPUS);
    let mut buf = Buf::new();
    let r = start_aps(cpus, &mut buf);
    t.check("smp_ap_start", result(r, &buf));
    let alive = ALIVE.load(Ordering::SeqCst);
    type Check = fn(u32, &mut Buf) -> Result<(), ()>;
    let checks: [(&str, Check); 6] = [
        ("smp_ipi_bsp_to_ap", bsp_to_ap),
        ("smp_ipi_ap_to_bsp", ap_to_bsp),
        ("smp_ipi_all_excluding_self", shorthand),
        ("smp_ipi_logical_flat", logical),
        ("smp_ipi_nmi", nmi),
        ("smp_ipi_x2apic", x2apic),
    ];
    for (name, check) in checks {
        buf.clear();
        let r = if alive == 0 {
            let _ = write!(buf, "no AP running");
            Err(())
        } else {
            check(alive, &mut buf)
        };
        t.check(name, result(r, &buf));
    }
    buf.clear();
    let r = if alive == 0 {
        let _ = write!(buf, "no AP running");
        Err(())
    } else {
        shared_counter(alive, 1 + aps(alive).count(), &mut buf).and_then(|()| {
            if aps(alive).count() + 1 == cpus {
                Ok(())
            } else {
                let _ = write!(buf, "only {} of {cpus} CPUs took part", aps(alive).count() + 1);
                Err(())
            }
        })
    };
    t.check("smp_shared_counter", result(r, &buf));
    if alive != 0 && !command(CMD_PARK, 0, 5000) {
        let _ = writeln!(Console, "selftest: smp some APs did not acknowledge parking");
    }
}
