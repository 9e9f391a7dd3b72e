//! Vireo's self-test guest. Vireo starts it in 64-bit mode with RDI = RAM size and
//! RSI = guest-physical address of its module command line (NUL-terminated). Modes:
//! - (default) run every check, print `selftest: <check> ok|FAIL ...` lines and the summary
//!   `selftest: N passed, M failed`, then end the VM with status M; with `cpus=N` (N >= 2)
//!   on the VM line the SMP checks (`smp.rs`) run too: APs started by INIT-SIPI-SIPI, IPIs
//!   both ways, a spinlock-protected shared counter;
//! - `bench=N`: N hypercall round trips, timed with the TSC; with `bench_pmu=count` (and
//!   `pmu=on`) cycles and exit events counting meanwhile (`selftest: bench_pmu ...`);
//! - `ipibench=N` (with `cpus=2` or more): N IPI round trips BSP -> AP 1 -> BSP, timed with
//!   the TSC (`selftest: ipi_round_trip n=N ticks=T ns=X ...`);
//! - `hostile=N`: N random hostile operations (wild MSRs, ports, hypercalls, pointers);
//! - `mode=pv` (with `pv=kvm` or `pv=off` on the VM line): the hypercall page checks, then
//!   the new MSRs and hypercalls of ABI version 2 and of the KVM interface given bad values,
//!   then valid kvmclock, steal-time and PV EOI registrations (`pv.rs`); summary and exit
//!   status as in the default mode;
//! - `mode=pmu` (with `pmu=on` on the VM line): the virtual PMU's checks (`pmu.rs`): CPUID,
//!   counter state across exits and time slices, reserved bits and absent counters
//!   faulting, cycles advancing in guest mode, Vireo's exit events, overflow;
//! - `mode=pmu-count` (with `pmu=on`; `pmu_ms=MS`, default 300): cycles counted over a busy
//!   loop of MS ms (`selftest: pmu_count cycles= tsc= tsc_per_ms= guest_pct=`);
//! - `mode=reuse`: the first boot writes a marker into all of its free RAM and resets the VM
//!   (hypercall VM_RESET); the next boot (`vireo_boot=N` on its line) checks that its
//!   untouched RAM reads as zeros (`selftest: reuse boot=N chunks=C nonzero_words=W`) and
//!   exits with status 0 if so;
//! - `mode=triple-fault`: fault with no usable IDT, which triple-faults;
//! - `mode=spin` / `mode=spin-sti`: loop forever with interrupts off / on and no exits (a
//!   runaway guest, for the VM time limit).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod checks;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod pmu;
#[cfg(target_os = "none")]
mod pv;
#[cfg(target_os = "none")]
mod smp;
#[cfg(target_os = "none")]
mod traps;

#[cfg(target_os = "none")]
mod guest {
    use core::fmt::Write;

    use guest_abi::hypercall::{self, nr, Instruction};

    use crate::{console::Console, traps};

    core::arch::global_asm!(
        ".section .text.entry, \"ax\"",
        ".global _start",
        "_start:",
        "and rsp, -16",
        "call selftest_main",
        "2: hlt",
        "jmp 2b",
    );

    /// The native hypercall instruction, from Vireo's version leaf (read once).
    pub fn native() -> Instruction {
        use core::sync::atomic::{AtomicU8, Ordering};
        static NATIVE: AtomicU8 = AtomicU8::new(0);
        let known = NATIVE.load(Ordering::Relaxed);
        let hint = if known != 0 {
            known as u32
        } else {
            let ecx = core::arch::x86_64::__cpuid(guest_abi::cpuid::LEAF_VERSION).ecx;
            NATIVE.store(ecx as u8, Ordering::Relaxed);
            ecx
        };
        if hint == guest_abi::cpuid::HYPERCALL_INSN_VMMCALL {
            Instruction::Vmmcall
        } else {
            Instruction::Vmcall
        }
    }

    pub fn call(nr: u64, args: [u64; 4]) -> i64 {
        // SAFETY: we run in a Vireo guest at CPL 0; buffers passed are our own.
        unsafe { hypercall::call(native(), nr, args) }
    }

    /// Ends the VM with `status`.
    pub fn exit(status: u64) -> ! {
        call(nr::VM_EXIT, [status, 0, 0, 0]);
        loop {
            // SAFETY: halting forever is all that is left.
            unsafe { core::arch::asm!("cli", "hlt") };
        }
    }

    #[no_mangle]
    extern "C" fn selftest_main(ram: u64, cmdline: *const u8) -> ! {
        // SAFETY: Vireo passes a NUL-terminated string inside our RAM (or null).
        let args = unsafe { cstr(cmdline) };
        let mut out = Console;
        if args.split_whitespace().any(|a| a == "mode=spin") {
            let _ = writeln!(out, "selftest: spinning forever with interrupts off");
            // SAFETY: a runaway guest on purpose: no exit ever again.
            unsafe { core::arch::asm!("cli", "2: jmp 2b", options(noreturn)) };
        }
        if args.split_whitespace().any(|a| a == "mode=spin-sti") {
            let _ = writeln!(out, "selftest: spinning forever with interrupts on");
            // SAFETY: a runaway guest on purpose (its interrupts enabled, no IDT needed: every
            // interrupt it could get comes from Vireo, which sends none).
            unsafe { core::arch::asm!("sti", "2: jmp 2b", options(noreturn)) };
        }
        if args.split_whitespace().any(|a| a == "mode=triple-fault") {
            let _ = writeln!(out, "selftest: about to triple-fault on purpose");
            traps::triple_fault();
        }
        traps::install();
        if let Some(n) = args.split_whitespace().find_map(|a| a.strip_prefix("hostile=")) {
            let wrong = crate::checks::hostile(n.parse().unwrap_or(10_000), ram);
            exit(wrong as u64);
        }
        if let Some(n) = args.split_whitespace().find_map(|a| a.strip_prefix("bench=")) {
            let n: u64 = n.parse().unwrap_or(100_000);
            // bench_pmu=count: with the PMU counting (cycles, exits, hypercall exits).
            let counting = args.split_whitespace().any(|a| a == "bench_pmu=count") && crate::pmu::bench_start();
            crate::checks::bench(n);
            if counting {
                let (cycles, exits, hypercalls) = crate::pmu::bench_stop();
                let _ = writeln!(out, "selftest: bench_pmu cycles={cycles} exits={exits} hypercall_exits={hypercalls}");
            }
            exit(0);
        }
        if args.split_whitespace().any(|a| a == "mode=reuse") {
            match args.split_whitespace().find_map(|a| a.strip_prefix("vireo_boot=")) {
                None => {
                    let chunks = crate::checks::dirty_ram(ram);
                    let _ = writeln!(out, "selftest: reuse boot=1 dirtied_chunks={chunks}");
                    call(nr::VM_RESET, [0; 4]);
                    let _ = writeln!(out, "selftest: reuse VM_RESET returned FAIL");
                    exit(1);
                }
                Some(boot) => {
                    let (chunks, nonzero) = crate::checks::probe_untouched(ram);
                    let _ = writeln!(out, "selftest: reuse boot={boot} chunks={chunks} nonzero_words={nonzero}");
                    exit((nonzero != 0) as u64);
                }
            }
        }
        // Vireo hands the guest its whole VM line, `cpus=N` included.
        let cpus = args.split_whitespace().find_map(|a| a.strip_prefix("cpus=")).and_then(|n| n.parse().ok());
        if args.split_whitespace().any(|a| a == "mode=pmu") {
            exit(crate::pmu::run() as u64);
        }
        if args.split_whitespace().any(|a| a == "mode=pmu-count") {
            let ms = args.split_whitespace().find_map(|a| a.strip_prefix("pmu_ms=")).and_then(|n| n.parse().ok());
            exit(crate::pmu::count(ms.unwrap_or(300)) as u64);
        }
        if args.split_whitespace().any(|a| a == "mode=pv") {
            exit(crate::pv::run(ram, cpus.unwrap_or(1)) as u64);
        }
        if let Some(n) = args.split_whitespace().find_map(|a| a.strip_prefix("ipibench=")) {
            let n: u64 = n.parse().unwrap_or(1000);
            exit(crate::smp::ipi_bench(cpus.unwrap_or(1), n) as u64);
        }
        let failed = crate::checks::run_all(ram, cpus.unwrap_or(1));
        exit(failed as u64)
    }

    unsafe fn cstr(p: *const u8) -> &'static str {
        if p.is_null() {
            return "";
        }
        let mut len = 0;
        // SAFETY: per caller, NUL-terminated; bounded at 255 bytes regardless.
        while len < 255 && unsafe { *p.add(len) } != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes were just read.
        core::str::from_utf8(unsafe { core::slice::from_raw_parts(p, len) }).unwrap_or("")
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        let _ = writeln!(Console, "selftest: panic {info}");
        exit(100)
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("vireo-selftest is a guest kernel: build it with --target x86_64-unknown-none");
    std::process::exit(1);
}
