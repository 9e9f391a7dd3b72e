use super::*;
use intel::*;

fn intel() -> Pmu {
    Pmu::new(Vendor::Intel, true)
}
fn amd() -> Pmu {
    Pmu::new(Vendor::Amd, true)
}
fn ok(p: &Pmu, msr: u32) -> u64 {
    match p.read(msr) {
        Access::Ok(v) => v,
        other => panic!("read {msr:#x}: {other:?}"),
    }
}
fn w(p: &mut Pmu, msr: u32, v: u64) {
    assert_eq!(p.write(msr, v), Access::Ok(v), "write {msr:#x} = {v:#x}");
}

const EN_CYCLES: u64 = EventSelect::EN | EventSelect::USR | EventSelect::OS | 0x3C;

#[test]
fn off_claims_nothing() {
    for vendor in [Vendor::Intel, Vendor::Amd] {
        let mut p = Pmu::new(vendor, false);
        for msr in
            [IA32_PMC0, IA32_PERFEVTSEL0, IA32_PERF_GLOBAL_CTRL, 0xC001_0000, 0xC001_0201, IA32_PERF_CAPABILITIES]
        {
            assert_eq!(p.read(msr), Access::NotPmu);
            assert_eq!(p.write(msr, 0), Access::NotPmu);
        }
        assert_eq!(p.rdpmc(0), None);
        p.guest_ran(1000, 0);
        assert!(!p.counts_guest_time());
    }
}

#[test]
fn vendors_claim_only_their_msrs() {
    let (i, a) = (intel(), amd());
    assert_eq!(i.read(0xC001_0000), Access::NotPmu);
    assert_eq!(i.read(0xC001_0201), Access::NotPmu);
    assert_eq!(a.read(IA32_PMC0), Access::NotPmu);
    assert_eq!(a.read(IA32_PERF_GLOBAL_CTRL), Access::NotPmu);
    // Absent counters: Intel has 4 GP counters, so PMC4/PERFEVTSEL4 are not PMU MSRs
    // (the caller's #GP for unknown MSRs applies).
    assert_eq!(i.read(IA32_PMC0 + 4), Access::NotPmu);
    assert_eq!(i.read(IA32_PERFEVTSEL0 + 4), Access::NotPmu);
    assert_eq!(i.read(IA32_A_PMC0 + 4), Access::NotPmu);
    assert_eq!(i.read(IA32_FIXED_CTR0 + 3), Access::NotPmu);
    assert_eq!(a.read(0xC001_020C), Access::NotPmu);
    assert_eq!(a.read(0xC001_0008), Access::NotPmu);
}

#[test]
fn intel_reset_state_and_cpuid() {
    let p = intel();
    assert_eq!(ok(&p, IA32_PERF_GLOBAL_CTRL), 0xF, "GP counters enabled at RESET");
    assert_eq!(ok(&p, IA32_PERF_GLOBAL_STATUS), 0);
    assert_eq!(ok(&p, IA32_FIXED_CTR_CTRL), 0);
    assert_eq!(ok(&p, IA32_PERF_CAPABILITIES), 1 << 13);
    let [eax, ebx, ecx, edx] = cpuid_0a();
    assert_eq!(eax & 0xFF, 2, "version");
    assert_eq!((eax >> 8) & 0xFF, 4, "GP counters");
    assert_eq!((eax >> 16) & 0xFF, 48, "width");
    assert_eq!(eax >> 24, 7, "EBX vector length");
    assert_eq!(ebx & 1, 0, "core cycles available");
    assert_ne!(ebx & 2, 0, "instructions retired unavailable");
    assert_eq!(ebx & 4, 0, "reference cycles available");
    assert_eq!(ebx >> 3, 0xF, "LLC and branch events unavailable");
    assert_eq!(ecx, 0);
    assert_eq!((edx & 0x1F, (edx >> 5) & 0xFF), (3, 48));
}

#[test]
fn intel_reserved_bits_fault() {
    let mut p = intel();
    assert_eq!(p.write(IA32_PERFEVTSEL0, 1 << 21), Access::Gp, "AnyThread is version 3");
    assert_eq!(p.write(IA32_PERFEVTSEL0, 1 << 32), Access::Gp);
    assert_eq!(p.write(IA32_PERFEVTSEL0 + 3, 1 << 63), Access::Gp);
    w(&mut p, IA32_PERFEVTSEL0, 0xFFDF_FFFF);
    assert_eq!(ok(&p, IA32_PERFEVTSEL0), 0xFFDF_FFFF, "every defined bit holds");
    assert_eq!(p.write(IA32_FIXED_CTR_CTRL, 1 << 2), Access::Gp, "AnyThread");
    assert_eq!(p.write(IA32_FIXED_CTR_CTRL, 1 << 12), Access::Gp, "no fourth fixed counter");
    w(&mut p, IA32_FIXED_CTR_CTRL, 0xBBB);
    assert_eq!(p.write(IA32_PERF_GLOBAL_CTRL, 1 << 4), Access::Gp, "no PMC4");
    assert_eq!(p.write(IA32_PERF_GLOBAL_CTRL, 1 << 35), Access::Gp, "no FIXED_CTR3");
    w(&mut p, IA32_PERF_GLOBAL_CTRL, 0x7_0000_000F);
    assert_eq!(p.write(IA32_PERF_GLOBAL_OVF_CTRL, 1 << 4), Access::Gp);
    assert_eq!(p.write(IA32_PERF_GLOBAL_OVF_CTRL, 1 << 61), Access::Gp, "no uncore");
    w(&mut p, IA32_PERF_GLOBAL_OVF_CTRL, 0xC000_0007_0000_000F);
    assert_eq!(p.write(IA32_PERF_GLOBAL_STATUS, 0), Access::Gp, "read-only");
    assert_eq!(p.write(IA32_PERF_CAPABILITIES, 1 << 13), Access::Gp, "read-only");
    assert_eq!(p.write(IA32_A_PMC0, 1 << 48), Access::Gp, "beyond the counter width");
}

#[test]
fn intel_counter_writes() {
    let mut p = intel();
    // Legacy alias: low 32 bits, sign-extended from bit 31 to 48 bits.
    w(&mut p, IA32_PMC0, 0xFFFF_FFFF_8000_0000);
    assert_eq!(ok(&p, IA32_PMC0), 0xFFFF_8000_0000);
    assert_eq!(ok(&p, IA32_A_PMC0), 0xFFFF_8000_0000, "one counter, two names");
    w(&mut p, IA32_PMC0 + 1, 0x1234_7000_0000);
    assert_eq!(ok(&p, IA32_PMC0 + 1), 0x7000_0000);
    w(&mut p, IA32_A_PMC0 + 2, 0xABCD_1234_5678);
    assert_eq!(ok(&p, IA32_PMC0 + 2), 0xABCD_1234_5678);
    w(&mut p, IA32_FIXED_CTR0 + 1, u64::MAX);
    assert_eq!(ok(&p, IA32_FIXED_CTR0 + 1), COUNTER_MASK);
    // Linux's check_hw_exists: read, flip the low 16 bits, write, read back the same.
    let v = ok(&p, IA32_A_PMC0 + 3) ^ 0xFFFF;
    w(&mut p, IA32_A_PMC0 + 3, v);
    assert_eq!(ok(&p, IA32_A_PMC0 + 3), v);
    assert_eq!(ok(&p, IA32_PERF_GLOBAL_OVF_CTRL), 0, "write-1-to-clear reads 0");
}

#[test]
fn cycles_count_guest_time_only_when_enabled() {
    let mut p = intel();
    p.guest_ran(1000, 0);
    assert_eq!(ok(&p, IA32_PMC0), 0, "disabled counters keep their value");
    w(&mut p, IA32_PERFEVTSEL0, EN_CYCLES);
    w(&mut p, IA32_PERFEVTSEL0 + 1, EN_CYCLES | 0x100); // reference cycles
    w(&mut p, IA32_PERFEVTSEL0 + 2, EventSelect::EN | EventSelect::USR | EventSelect::OS | 0xC0); // instructions
    assert!(p.counts_guest_time() && !p.needs_cpl());
    p.guest_ran(1000, 0);
    p.guest_ran(500, 3);
    assert_eq!(ok(&p, IA32_PMC0), 1500);
    assert_eq!(ok(&p, IA32_PMC0 + 1), 1500);
    assert_eq!(ok(&p, IA32_PMC0 + 2), 0, "instructions retired is never faked");
    // GLOBAL_CTRL gates each counter.
    w(&mut p, IA32_PERF_GLOBAL_CTRL, 0b10);
    p.guest_ran(100, 0);
    assert_eq!((ok(&p, IA32_PMC0), ok(&p, IA32_PMC0 + 1)), (1500, 1600));
    // Edge, invert and counter mask make a counter count nothing.
    w(&mut p, IA32_PERF_GLOBAL_CTRL, 0xF);
    w(&mut p, IA32_PERFEVTSEL0, EN_CYCLES | 1 << 24);
    p.guest_ran(100, 0);
    assert_eq!(ok(&p, IA32_PMC0), 1500);
}

#[test]
fn privilege_filter_uses_the_exit_cpl() {
    let mut p = intel();
    w(&mut p, IA32_PERFEVTSEL0, EventSelect::EN | EventSelect::USR | 0x3C);
    w(&mut p, IA32_PERFEVTSEL0 + 1, EventSelect::EN | EventSelect::OS | 0x3C);
    w(&mut p, IA32_PERFEVTSEL0 + 2, EventSelect::EN | 0x3C);
    assert!(p.needs_cpl());
    p.guest_ran(10, 0);
    p.guest_ran(7, 3);
    assert_eq!([ok(&p, IA32_PMC0), ok(&p, IA32_PMC0 + 1), ok(&p, IA32_PMC0 + 2)], [7, 10, 0]);
}

#[test]
fn fixed_counters() {
    let mut p = intel();
    w(&mut p, IA32_FIXED_CTR_CTRL, 0x333);
    p.guest_ran(100, 0);
    assert_eq!(ok(&p, IA32_FIXED_CTR0 + 1), 0, "GLOBAL_CTRL leaves the fixed counters off at RESET");
    w(&mut p, IA32_PERF_GLOBAL_CTRL, 0x7_0000_0000);
    p.guest_ran(100, 0);
    assert_eq!([ok(&p, IA32_FIXED_CTR0), ok(&p, IA32_FIXED_CTR0 + 1), ok(&p, IA32_FIXED_CTR0 + 2)], [0, 100, 100]);
    assert_eq!(p.rdpmc(1 << 30 | 1), Some(100));
    assert_eq!(p.rdpmc(1 << 30 | 3), None);
    w(&mut p, IA32_FIXED_CTR_CTRL, 0x200);
    p.guest_ran(5, 0);
    p.guest_ran(7, 3);
    assert_eq!([ok(&p, IA32_FIXED_CTR0 + 1), ok(&p, IA32_FIXED_CTR0 + 2)], [100, 107]);
}

#[test]
fn overflow_sets_status_and_pmi() {
    let mut p = intel();
    w(&mut p, IA32_PMC0, (-100i64) as u64);
    w(&mut p, IA32_PERFEVTSEL0, EN_CYCLES | EventSelect::INT);
    w(&mut p, IA32_PMC0 + 1, (-50i64) as u64);
    w(&mut p, IA32_PERFEVTSEL0 + 1, EN_CYCLES);
    assert_eq!(p.ticks_to_overflow(), Some(100), "only counters with INT");
    p.guest_ran(60, 0);
    assert_eq!(ok(&p, IA32_PERF_GLOBAL_STATUS), 0b10, "overflow without INT: status only");
    assert!(!p.take_pmi());
    assert_eq!(p.ticks_to_overflow(), Some(40));
    p.guest_ran(40, 0);
    assert_eq!(ok(&p, IA32_PMC0), 0, "wrapped past 48 bits");
    assert_eq!(ok(&p, IA32_PERF_GLOBAL_STATUS), 0b11);
    assert!(p.take_pmi());
    assert!(!p.take_pmi(), "taken once");
    assert_eq!(p.pmis, 1);
    w(&mut p, IA32_PERF_GLOBAL_OVF_CTRL, 0b01);
    assert_eq!(ok(&p, IA32_PERF_GLOBAL_STATUS), 0b10);
    // Fixed counter overflow: status bit 32 + i; PMI with its PMI bit.
    w(&mut p, IA32_FIXED_CTR0 + 2, COUNTER_MASK);
    w(&mut p, IA32_FIXED_CTR_CTRL, 0xB00);
    w(&mut p, IA32_PERF_GLOBAL_CTRL, 1 << 34);
    p.guest_ran(1, 0);
    assert_eq!(ok(&p, IA32_PERF_GLOBAL_STATUS), 0b10 | 1 << 34);
    assert!(p.take_pmi());
    // Fixed counter 0 (instructions) never counts, so never overflows.
    w(&mut p, IA32_FIXED_CTR0, COUNTER_MASK);
    w(&mut p, IA32_FIXED_CTR_CTRL, 0xB);
    w(&mut p, IA32_PERF_GLOBAL_CTRL, 1 << 32);
    p.guest_ran(1000, 0);
    assert_eq!(ok(&p, IA32_FIXED_CTR0), COUNTER_MASK);
    assert_eq!(p.ticks_to_overflow(), None);
}

#[test]
fn exit_events() {
    use guest_abi::pmu::{umask_exit_class, EVENT_VM_EXITS};
    let mut p = intel();
    let sel =
        |umask: u8| EventSelect::EN | EventSelect::USR | EventSelect::OS | (umask as u64) << 8 | EVENT_VM_EXITS as u64;
    w(&mut p, IA32_PERFEVTSEL0, sel(0));
    w(&mut p, IA32_PERFEVTSEL0 + 1, sel(umask_exit_class(0))); // cpuid
    w(&mut p, IA32_PERFEVTSEL0 + 2, sel(umask_exit_class(4))); // hypercall
    w(&mut p, IA32_PERFEVTSEL0 + 3, sel(guest_abi::stats::KINDS as u8 + 1)); // no such class
    assert!(p.counts_exits() && !p.counts_guest_time());
    for kind in [0, 0, 4, 10, 3] {
        p.count_exit(kind, 0);
    }
    assert_eq!([ok(&p, IA32_PMC0), ok(&p, IA32_PMC0 + 1), ok(&p, IA32_PMC0 + 2), ok(&p, IA32_PMC0 + 3)], [5, 2, 1, 0]);
    // The same raw code on AMD.
    let mut a = amd();
    w(&mut a, 0xC001_0204, amd::EventSelect::EN | amd::EventSelect::OS | 0x0156);
    a.count_exit(0, 0);
    a.count_exit(0, 3);
    a.count_exit(1, 0);
    assert_eq!(ok(&a, 0xC001_0205), 1);
}

#[test]
fn rdpmc_indices() {
    let mut p = intel();
    w(&mut p, IA32_A_PMC0 + 3, 0x1_2345_6789);
    assert_eq!(p.rdpmc(3), Some(0x1_2345_6789));
    assert_eq!(p.rdpmc(1 << 31 | 3), Some(0x2345_6789), "fast read: low 32 bits");
    assert_eq!(p.rdpmc(4), None);
    assert_eq!(p.rdpmc(1 << 29), None);
    let mut a = amd();
    w(&mut a, 0xC001_020B, 77);
    assert_eq!(a.rdpmc(5), Some(77));
    assert_eq!(a.rdpmc(6), None, "no northbridge counters");
}

#[test]
fn amd_registers_and_aliases() {
    let mut a = amd();
    assert!(!a.pmi_masks_lvtpc() && intel().pmi_masks_lvtpc());
    // Legacy PerfEvtSel/PerfCtr 0-3 are PERF_CTL/PERF_CTR 0-3.
    w(&mut a, 0xC001_0001, 0x43_0076);
    assert_eq!(ok(&a, 0xC001_0202), 0x43_0076);
    w(&mut a, 0xC001_0207, 123);
    assert_eq!(ok(&a, 0xC001_0007), 123);
    // Counters 4 and 5 exist only under the core-extension numbers.
    w(&mut a, 0xC001_0209, 9);
    assert_eq!(ok(&a, 0xC001_0209), 9);
    // Reserved bits 19, 21, 39:36, 63:42 fault; Guest/HostOnly and EventSelect[11:8] do not.
    for bit in [19, 21, 36, 39, 42, 63] {
        assert_eq!(a.write(0xC001_0200, 1 << bit), Access::Gp, "bit {bit}");
    }
    w(&mut a, 0xC001_0200, 3 << 40 | 0xF << 32 | 0xFFDF_FFFF & !(1 << 19));
    // The count register keeps 48 bits.
    w(&mut a, 0xC001_0201, u64::MAX);
    assert_eq!(ok(&a, 0xC001_0201), COUNTER_MASK);
}

#[test]
fn amd_cycles_and_overflow() {
    let mut a = amd();
    let sel = amd::EventSelect::EN | amd::EventSelect::USR | amd::EventSelect::OS | amd::EventSelect::INT | 0x76;
    w(&mut a, 0xC001_0201, COUNTER_MASK - 9);
    w(&mut a, 0xC001_0200, sel | amd::EventSelect::HOST_ONLY);
    assert_eq!(a.ticks_to_overflow(), Some(10));
    a.guest_ran(5, 0);
    assert!(!a.take_pmi());
    a.guest_ran(5, 0);
    assert_eq!(ok(&a, 0xC001_0201), 0);
    assert!(a.take_pmi());
    // An event with the extended select bits set is another event: counts nothing.
    w(&mut a, 0xC001_0202, sel | 1 << 32);
    a.guest_ran(5, 0);
    assert_eq!(ok(&a, 0xC001_0203), 0);
    // USR and OS both clear: counts nothing.
    w(&mut a, 0xC001_0200, amd::EventSelect::EN | 0x76);
    a.guest_ran(5, 0);
    assert_eq!(ok(&a, 0xC001_0201), 5, "left as it was");
    assert!(!a.counts_guest_time());
}

#[test]
fn huge_intervals_still_overflow() {
    let mut p = intel();
    w(&mut p, IA32_PERFEVTSEL0, EN_CYCLES | EventSelect::INT);
    p.guest_ran(u64::MAX, 0);
    assert!(p.take_pmi());
    assert_ne!(ok(&p, IA32_PERF_GLOBAL_STATUS) & 1, 0);
}
