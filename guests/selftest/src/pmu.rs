//! The virtual PMU (`mode=pmu`, with `pmu=on` on the VM line; the default run checks that
//! a VM without it sees no PMU): CPUID, counter MSR state across exits and time slices,
//! reserved bits and absent counters faulting as on hardware, cycles that advance while
//! the guest runs (and not faster than time passes), Vireo's VM-exit events, overflow.

use core::{arch::asm, arch::x86_64::__cpuid, fmt::Write};

use guest_abi::{hypercall::nr, pmu as abi};

use crate::{
    checks::{rdmsr, wrmsr, Tally},
    console::Console,
    guest::call,
    smp::tsc_per_ms,
    traps::{expect_fault, settle},
};

const GP_VECTOR: u8 = 13;

// Intel (SDM Vol. 4 Table 2-2).
const IA32_PMC0: u32 = 0xC1;
const IA32_PERFEVTSEL0: u32 = 0x186;
const IA32_FIXED_CTR0: u32 = 0x309;
const IA32_PERF_CAPABILITIES: u32 = 0x345;
const IA32_FIXED_CTR_CTRL: u32 = 0x38D;
const IA32_PERF_GLOBAL_STATUS: u32 = 0x38E;
const IA32_PERF_GLOBAL_CTRL: u32 = 0x38F;
const IA32_PERF_GLOBAL_OVF_CTRL: u32 = 0x390;
const IA32_A_PMC0: u32 = 0x4C1;
// AMD (APM Vol. 2 §13.2).
const PERF_EVT_SEL0: u32 = 0xC001_0000;
const PERF_CTR0: u32 = 0xC001_0004;
const PERF_CTL0: u32 = 0xC001_0200;
// Event-select bits both vendors share.
const USR: u64 = 1 << 16;
const OS: u64 = 1 << 17;
const INT: u64 = 1 << 20;
const EN: u64 = 1 << 22;
const WIDTH_MASK: u64 = (1 << 48) - 1;

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// RDPMC, recovering from #GP.
pub fn rdpmc(ecx: u32) -> Result<u64, (u8, u64)> {
    let (lo, hi): (u32, u32);
    expect_fault(2);
    // SAFETY: a faulting RDPMC (0F 33) is recovered by the trap handler.
    unsafe { asm!("rdpmc", in("ecx") ecx, out("eax") lo, out("edx") hi, options(nostack)) };
    match settle() {
        Some(fault) => Err(fault),
        None => Ok(((hi as u64) << 32) | lo as u64),
    }
}

fn intel() -> bool {
    let r = __cpuid(0);
    [r.ebx, r.edx, r.ecx] == [0x756E_6547, 0x4965_6E69, 0x6C65_746E] // "GenuineIntel"
}

fn gp(r: Result<u64, (u8, u64)>) -> bool {
    matches!(r, Err((GP_VECTOR, _)))
}
fn gp_w(r: Option<(u8, u64)>) -> bool {
    matches!(r, Some((GP_VECTOR, _)))
}

/// The MSRs of GP counter `i`: (event select, counter).
fn gp_msrs(intel: bool, i: u32) -> (u32, u32) {
    if intel {
        (IA32_PERFEVTSEL0 + i, IA32_A_PMC0 + i)
    } else {
        (PERF_CTL0 + 2 * i, PERF_CTL0 + 2 * i + 1)
    }
}

/// CPUID shows a PMU (Intel leaf 0AH version, AMD PerfCtrExtCore).
fn offered(intel: bool) -> bool {
    if intel {
        __cpuid(0xA).eax & 0xFF != 0
    } else {
        __cpuid(0x8000_0001).ecx & (1 << 23) != 0
    }
}

/// A VM without `pmu=on`: no PMU in CPUID, its MSRs and RDPMC fault.
pub fn hidden(t: &mut Tally) {
    let intel = intel();
    let cpuid = !offered(intel);
    let msr = if intel { IA32_PMC0 } else { PERF_CTL0 };
    let r = if !cpuid {
        Err("the PMU shows in CPUID")
    } else if !gp(rdmsr(msr)) || !gp_w(wrmsr(msr, 0)) {
        Err("a counter MSR did not fault")
    } else if !gp(rdpmc(0)) {
        Err("RDPMC did not fault")
    } else {
        Ok(())
    };
    t.check("pmu_hidden", r);
}

/// `mode=pmu`: every check; returns the failures. In a VM without `pmu=on` only
/// [`hidden`]'s check runs (`selftest: pmu absent`).
pub fn run() -> u32 {
    let mut t = Tally::new();
    let intel = intel();
    if !offered(intel) {
        let _ = writeln!(Console, "selftest: pmu absent");
        hidden(&mut t);
        let _ = writeln!(Console, "selftest: {} passed, {} failed", t.passed, t.failed);
        return t.failed;
    }
    let counters: u32 = if intel { 4 } else { 6 };
    let _ = writeln!(Console, "selftest: pmu vendor={}", if intel { "intel" } else { "amd" });

    t.check("pmu_cpuid", {
        if intel {
            let a = __cpuid(0xA);
            let pdcm = __cpuid(1).ecx & (1 << 15) != 0;
            let caps = rdmsr(IA32_PERF_CAPABILITIES);
            let _ = writeln!(
                Console,
                "selftest: pmu cpuid_0a eax={:#x} ebx={:#x} edx={:#x} perf_capabilities={caps:x?}",
                a.eax, a.ebx, a.edx
            );
            if a.eax & 0xFF != 2 || (a.eax >> 8) & 0xFF != 4 || (a.eax >> 16) & 0xFF != 48 {
                Err("leaf 0AH: not version 2 with 4 counters of 48 bits")
            } else if a.ebx & 0b101 != 0 || a.ebx & 0b10 == 0 {
                Err("leaf 0AH EBX: cycles must be available, instructions retired not")
            } else if a.edx & 0x1F != 3 || (a.edx >> 5) & 0xFF != 48 {
                Err("leaf 0AH EDX: not 3 fixed counters of 48 bits")
            } else if !pdcm || caps != Ok(1 << 13) {
                Err("PDCM / IA32_PERF_CAPABILITIES.FW_WRITE")
            } else {
                Ok(())
            }
        } else if __cpuid(0x8000_0001).ecx & (1 << 23) == 0 {
            Err("CPUID Fn8000_0001 ECX PerfCtrExtCore clear")
        } else {
            Ok(())
        }
    });

    // Distinct values in every event select (not enabled) and counter; they must read back
    // unchanged after thousands of exits and a run longer than a time slice.
    t.check("pmu_state_survives_exits_and_slices", {
        let sel = |i: u32| 0x1234_0000_u64 & !(EN | 1 << 21 | 1 << 19) | (i as u64) << 8 | 0xC4;
        let ctr = |i: u32| 0x0000_8765_4321_0000 + i as u64 * 0x1_0001;
        let mut r = Ok(());
        for i in 0..counters {
            let (s, c) = gp_msrs(intel, i);
            if wrmsr(s, sel(i)).is_some() || wrmsr(c, ctr(i)).is_some() {
                r = Err("a valid counter write faulted");
            }
        }
        if intel {
            for i in 0..3 {
                let _ = wrmsr(IA32_FIXED_CTR0 + i, 0x100 + i as u64);
            }
        }
        for i in 0..2000u64 {
            call(nr::PING, [i, 0, 0, 0]);
        }
        let t0 = rdtsc();
        let slice = 300 * tsc_per_ms();
        while rdtsc() - t0 < slice {
            core::hint::spin_loop();
        }
        for i in 0..counters {
            let (s, c) = gp_msrs(intel, i);
            if rdmsr(s) != Ok(sel(i)) || rdmsr(c) != Ok(ctr(i)) {
                let _ = writeln!(Console, "selftest: pmu counter {i} sel={:x?} ctr={:x?}", rdmsr(s), rdmsr(c));
                r = Err("a counter or event select changed");
            }
            if rdpmc(i) != Ok(ctr(i)) {
                r = Err("RDPMC disagrees with RDMSR");
            }
        }
        if intel {
            for i in 0..3 {
                if rdmsr(IA32_FIXED_CTR0 + i) != Ok(0x100 + i as u64) || rdpmc(1 << 30 | i) != Ok(0x100 + i as u64) {
                    r = Err("a fixed counter changed");
                }
            }
            // The legacy alias keeps the low 32 bits, sign-extended to 48.
            let _ = wrmsr(IA32_PMC0, 0xFFFF_FFFF_8000_0001);
            if rdmsr(IA32_A_PMC0) != Ok(0xFFFF_8000_0001) {
                r = Err("IA32_PMC0 write not sign-extended from bit 31");
            }
        } else {
            // The legacy registers alias counters 0-3.
            if rdmsr(PERF_EVT_SEL0 + 2) != Ok(sel(2)) || rdmsr(PERF_CTR0 + 3) != Ok(ctr(3)) {
                r = Err("legacy PerfEvtSel/PerfCtr do not alias PERF_CTL/PERF_CTR");
            }
        }
        r
    });

    t.check("pmu_reserved_bits_fault", {
        let bad: &[(u32, u64)] = if intel {
            &[
                (IA32_PERFEVTSEL0, 1 << 21),
                (IA32_PERFEVTSEL0 + 1, 1 << 32),
                (IA32_FIXED_CTR_CTRL, 1 << 2),
                (IA32_FIXED_CTR_CTRL, 1 << 12),
                (IA32_PERF_GLOBAL_CTRL, 1 << 4),
                (IA32_PERF_GLOBAL_CTRL, 1 << 35),
                (IA32_PERF_GLOBAL_OVF_CTRL, 1 << 61),
                (IA32_PERF_GLOBAL_STATUS, 0),
                (IA32_PERF_CAPABILITIES, 0),
                (IA32_A_PMC0, 1 << 48),
            ]
        } else {
            &[(PERF_CTL0, 1 << 19), (PERF_CTL0 + 2, 1 << 21), (PERF_CTL0 + 4, 1 << 36), (PERF_EVT_SEL0, 1 << 42)]
        };
        match bad.iter().find(|(m, v)| !gp_w(wrmsr(*m, *v))) {
            Some((m, v)) => {
                let _ = writeln!(Console, "selftest: pmu no #GP for msr={m:#x} value={v:#x}");
                Err("a reserved bit did not fault")
            }
            None => Ok(()),
        }
    });

    t.check("pmu_absent_counters_fault", {
        let absent: &[u32] = if intel {
            &[IA32_PMC0 + 4, IA32_PERFEVTSEL0 + 4, IA32_A_PMC0 + 4, IA32_FIXED_CTR0 + 3]
        } else {
            &[PERF_CTL0 + 12, PERF_CTL0 + 13, PERF_CTR0 + 4]
        };
        let rdpmc_absent: &[u32] = if intel { &[4, 1 << 30 | 3, 1 << 29] } else { &[6, 7, 0x100] };
        if let Some(m) = absent.iter().find(|m| !gp(rdmsr(**m)) || !gp_w(wrmsr(**m, 0))) {
            let _ = writeln!(Console, "selftest: pmu msr={m:#x} did not fault");
            Err("an absent counter's MSR did not fault")
        } else if rdpmc_absent.iter().any(|e| !gp(rdpmc(*e))) {
            Err("RDPMC of an absent counter did not fault")
        } else {
            Ok(())
        }
    });

    // Cycles: TSC ticks in guest mode, so they advance while the guest runs, never faster
    // than the TSC, and most of a busy loop is guest time.
    let (cyc_sel, cyc_ctr) = gp_msrs(intel, 0);
    let cycles_event = if intel { abi::INTEL_CORE_CYCLES } else { abi::AMD_CPU_CLOCKS } as u64;
    {
        let _ = wrmsr(cyc_ctr, 0);
        if intel {
            let _ = wrmsr(IA32_PERF_GLOBAL_CTRL, 0x7_0000_000F);
            let _ = wrmsr(IA32_FIXED_CTR_CTRL, 0x330); // fixed 1 and 2, OS+USR
            let _ = wrmsr(IA32_FIXED_CTR0 + 1, 0);
        }
        let _ = wrmsr(cyc_sel, EN | OS | USR | cycles_event);
        let c0 = rdpmc(0).unwrap_or(0);
        let t0 = rdtsc();
        while rdtsc() - t0 < 50 * tsc_per_ms() {
            core::hint::spin_loop();
        }
        for _ in 0..100 {
            // An exit to Vireo: its time is not guest time.
            core::hint::black_box(__cpuid(0));
        }
        let t1 = rdtsc();
        let c1 = rdpmc(0).unwrap_or(0);
        let fixed = if intel { rdpmc(1 << 30 | 1).unwrap_or(0) } else { 0 };
        let (dc, dt) = (c1.wrapping_sub(c0) & WIDTH_MASK, t1 - t0);
        let pct = dc * 100 / dt.max(1);
        t.check_detail(
            "pmu_cycles_advance_in_guest_mode",
            if dc == 0 {
                Err("the cycles counter did not advance")
            } else if dc > dt + 1000 {
                Err("more cycles than TSC ticks passed")
            } else if pct < 20 {
                Err("under a fifth of a busy loop counted as guest time")
            } else if intel && fixed == 0 {
                Err("fixed counter 1 (core cycles) did not advance")
            } else {
                Ok(())
            },
            format_args!("cycles={dc} tsc={dt} guest_pct={pct} fixed1={fixed}"),
        );
        // Disabled, it stands still.
        let _ = wrmsr(cyc_sel, OS | USR | cycles_event);
        let a = rdmsr(cyc_ctr);
        for i in 0..200u64 {
            call(nr::PING, [i, 0, 0, 0]);
        }
        t.check("pmu_disabled_counter_stands_still", if rdmsr(cyc_ctr) == a { Ok(()) } else { Err("it moved") });
    }

    // Vireo's exit events: exactly the CPUID exits the guest made, and at least that many
    // exits in all.
    {
        let (s1, c1) = gp_msrs(intel, 1);
        let (s2, c2) = gp_msrs(intel, 2);
        let (s3, c3) = gp_msrs(intel, 3);
        let exits = |umask: u8| EN | OS | USR | (umask as u64) << 8 | abi::EVENT_VM_EXITS as u64;
        let cpuid_class = guest_abi::stats::KIND_NAMES.iter().position(|k| *k == "cpuid").unwrap_or(0);
        let hc_class = guest_abi::stats::KIND_NAMES.iter().position(|k| *k == "hypercall").unwrap_or(0);
        for c in [c1, c2, c3] {
            let _ = wrmsr(c, 0);
        }
        let _ = wrmsr(s1, exits(abi::umask_exit_class(cpuid_class)));
        let _ = wrmsr(s2, exits(abi::UMASK_ALL_EXITS));
        let _ = wrmsr(s3, exits(abi::umask_exit_class(hc_class)));
        for _ in 0..123 {
            core::hint::black_box(__cpuid(1));
        }
        for i in 0..45u64 {
            call(nr::PING, [i, 0, 0, 0]);
        }
        let (n_cpuid, n_all, n_hc) = (rdmsr(c1).unwrap_or(0), rdmsr(c2).unwrap_or(0), rdmsr(c3).unwrap_or(0));
        t.check_detail(
            "pmu_exit_events",
            if n_cpuid != 123 || n_hc != 45 {
                Err("CPUID/hypercall exits miscounted")
            } else if n_all < 123 + 45 {
                Err("fewer exits in all than CPUIDs and hypercalls")
            } else {
                Ok(())
            },
            format_args!("cpuid={n_cpuid} hypercall={n_hc} all={n_all}"),
        );
        for s in [s1, s2, s3] {
            let _ = wrmsr(s, 0);
        }
    }

    // Overflow: a counter 10000 ticks short of wrapping, with INT, overflows while the guest
    // spins (Vireo makes it exit by then); Intel sets GLOBAL_STATUS (cleared by OVF_CTRL).
    {
        let _ = wrmsr(cyc_sel, 0);
        let _ = wrmsr(cyc_ctr, WIDTH_MASK - 9_999);
        let _ = wrmsr(cyc_sel, EN | OS | USR | INT | cycles_event);
        let t0 = rdtsc();
        while rdtsc() - t0 < 20 * tsc_per_ms() {
            core::hint::spin_loop();
        }
        let v = rdmsr(cyc_ctr).unwrap_or(0);
        let _ = wrmsr(cyc_sel, 0);
        let r = if v >= WIDTH_MASK - 9_999 {
            Err("the counter did not wrap")
        } else if intel {
            let st = rdmsr(IA32_PERF_GLOBAL_STATUS).unwrap_or(0);
            let _ = wrmsr(IA32_PERF_GLOBAL_OVF_CTRL, 1);
            let after = rdmsr(IA32_PERF_GLOBAL_STATUS).unwrap_or(1);
            if st & 1 == 0 {
                Err("GLOBAL_STATUS bit 0 not set")
            } else if after & 1 != 0 {
                Err("GLOBAL_OVF_CTRL did not clear it")
            } else {
                Ok(())
            }
        } else {
            Ok(())
        };
        t.check_detail("pmu_overflow", r, format_args!("after_wrap={v}"));
    }

    let _ = writeln!(Console, "selftest: {} passed, {} failed", t.passed, t.failed);
    t.failed
}

/// `mode=pmu-count` (with `pmu=on`; `pmu_ms=MS`, default 300): counts cycles on counter 0
/// (user and kernel mode) over a busy loop of MS milliseconds of TSC time, with no exit of
/// its own, and prints `selftest: pmu_count cycles=C tsc=T tsc_per_ms=R guest_pct=P`: the
/// guest-mode time of this vCPU within T TSC ticks. Sharing a host CPU with another busy VM,
/// C is this vCPU's share of the loop, not the loop's length (the isolation test in
/// tests/tests/pmu.rs). Returns 1 (the exit status) without a PMU or when nothing counted.
pub fn count(ms: u64) -> u32 {
    let intel = intel();
    if !offered(intel) {
        let _ = writeln!(Console, "selftest: pmu absent");
        return 1;
    }
    let (sel, ctr) = gp_msrs(intel, 0);
    let event = if intel { abi::INTEL_CORE_CYCLES } else { abi::AMD_CPU_CLOCKS } as u64;
    if intel {
        let _ = wrmsr(IA32_PERF_GLOBAL_CTRL, 1);
    }
    let _ = wrmsr(sel, 0);
    let _ = wrmsr(ctr, 0);
    let per_ms = tsc_per_ms();
    let t0 = rdtsc();
    let _ = wrmsr(sel, EN | OS | USR | event);
    // No PAUSE in the loop: a pause loop looks like lock spinning, and Vireo's pause-loop
    // exits would hand the host CPU to the other VM early (each slice cut short). Interrupts
    // on, as in `mode=spin-sti` (Vireo sends this guest none): on Bochs SVM a guest with
    // IF=0 was seen to keep its host CPU for ~100 ms slices, not the 5 ms slice.
    // SAFETY: no interrupt source is set up for this guest; IF is cleared again below.
    unsafe { asm!("sti", options(nomem, nostack)) };
    while core::hint::black_box(rdtsc()) - t0 < ms * per_ms {}
    // SAFETY: as above.
    unsafe { asm!("cli", options(nomem, nostack)) };
    let _ = wrmsr(sel, 0);
    let dt = rdtsc() - t0;
    let c = rdmsr(ctr).unwrap_or(0) & WIDTH_MASK;
    let _ = writeln!(
        Console,
        "selftest: pmu_count cycles={c} tsc={dt} tsc_per_ms={per_ms} guest_pct={}",
        c * 100 / dt.max(1)
    );
    (c == 0) as u32
}

/// For `bench=N bench_pmu=count`: starts counting cycles (counter 0), all exits (counter 1)
/// and hypercall exits (counter 2), user and kernel mode, so that the benchmark runs with the
/// PMU in use (scripts/bench-pmu.sh). False without a PMU.
pub fn bench_start() -> bool {
    let intel = intel();
    if !offered(intel) {
        return false;
    }
    let hc = guest_abi::stats::KIND_NAMES.iter().position(|k| *k == "hypercall").unwrap_or(0);
    let cycles = if intel { abi::INTEL_CORE_CYCLES } else { abi::AMD_CPU_CLOCKS } as u64;
    let exits = |umask: u8| (umask as u64) << 8 | abi::EVENT_VM_EXITS as u64;
    let events = [cycles, exits(abi::UMASK_ALL_EXITS), exits(abi::umask_exit_class(hc))];
    if intel {
        let _ = wrmsr(IA32_PERF_GLOBAL_CTRL, 0b111);
    }
    for (i, e) in events.iter().enumerate() {
        let (s, c) = gp_msrs(intel, i as u32);
        let _ = wrmsr(s, 0);
        let _ = wrmsr(c, 0);
        let _ = wrmsr(s, EN | OS | USR | e);
    }
    true
}

/// The counters [`bench_start`] started: (cycles, exits, hypercall exits); stops them.
pub fn bench_stop() -> (u64, u64, u64) {
    let intel = intel();
    let mut v = [0u64; 3];
    for (i, x) in v.iter_mut().enumerate() {
        let (s, c) = gp_msrs(intel, i as u32);
        let _ = wrmsr(s, 0);
        *x = rdmsr(c).unwrap_or(0) & WIDTH_MASK;
    }
    (v[0], v[1], v[2])
}
