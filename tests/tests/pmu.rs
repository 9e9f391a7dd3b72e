//! The virtual PMU (`pmu=on`, issue 10) on both vendors' counters: the self-test guest's
//! `mode=pmu` checks on AMD (QEMU TCG SVM, Bochs ryzen) and Intel (Bochs VMX), next to a
//! VM without the PMU, which sees none. Neither emulator has a host PMU: the counters are
//! Vireo's software counters (guest-mode TSC ticks, VM exits).

use vireo_tests::{field, Boot, Machine, Outcome};

/// The checks `mode=pmu` prints `ok` for.
const PMU_CHECKS: &[&str] = &[
    "pmu_cpuid",
    "pmu_state_survives_exits_and_slices",
    "pmu_reserved_bits_fault",
    "pmu_absent_counters_fault",
    "pmu_cycles_advance_in_guest_mode",
    "pmu_disabled_counter_stands_still",
    "pmu_exit_events",
    "pmu_overflow",
];

fn pmu_selftest(machine: Machine, vendor: &str) -> Outcome {
    let out = Boot::new(machine).guest("selftest=pmu mode=pmu pmu=on").guest("selftest=nopmu mode=pmu").run();
    out.assert_exit_ok();
    let lines = out.guest_lines("pmu");
    assert!(lines.contains(&format!("selftest: pmu vendor={vendor}").as_str()), "{out:?}");
    for check in PMU_CHECKS {
        let ok = format!("selftest: {check} ok");
        assert!(lines.iter().any(|l| l.starts_with(&ok)), "no `{ok}`\n{out:?}");
    }
    assert!(lines.contains(&"selftest: 8 passed, 0 failed"), "{out:?}");
    assert_eq!(out.field("vm name=pmu start ", "pmu"), "on", "{out:?}");
    assert_eq!(out.field("vm name=nopmu start ", "pmu"), "off", "{out:?}");
    // No emulator here has a host PMU (they advertise one in CPUID and ignore its MSRs):
    // the hardware path's probe finds its counters standing still, so the software ones.
    assert_eq!(out.field("vm name=pmu start ", "pmu_counters"), "software", "{out:?}");
    assert_eq!(out.field("vm name=nopmu start ", "pmu_counters"), "none", "{out:?}");
    let end = out.line("vm name=pmu end ");
    assert_eq!(field(end, "outcome").as_deref(), Some("exited"), "{out:?}");
    assert_eq!(field(end, "status").as_deref(), Some("0"), "{out:?}");
    // RDPMC exits to Vireo (its own exit class), never reads the host's counters.
    let rdpmc = out.line("vm name=pmu exit reason=rdpmc ");
    assert!(field(rdpmc, "count").unwrap().parse::<u64>().unwrap() >= 10, "{out:?}");
    // Exactly the guest's CPUID and hypercall exits, counted by class.
    let events = lines.iter().find(|l| l.starts_with("selftest: pmu_exit_events ok")).unwrap();
    assert_eq!(field(events, "cpuid").as_deref(), Some("123"), "{out:?}");
    assert_eq!(field(events, "hypercall").as_deref(), Some("45"), "{out:?}");
    // Cycles: guest time only, never more than the TSC time that passed.
    let cycles = lines.iter().find(|l| l.starts_with("selftest: pmu_cycles_advance_in_guest_mode ok")).unwrap();
    let n = |k: &str| field(cycles, k).unwrap().parse::<u64>().unwrap();
    assert!(n("cycles") > 0 && n("cycles") <= n("tsc") + 1000, "{cycles}\n{out:?}");
    // Without pmu=on: no PMU in CPUID; its MSRs and RDPMC fault.
    let nopmu = out.guest_lines("nopmu");
    assert!(nopmu.contains(&"selftest: pmu absent"), "{out:?}");
    assert!(nopmu.contains(&"selftest: pmu_hidden ok"), "{out:?}");
    assert!(nopmu.contains(&"selftest: 1 passed, 0 failed"), "{out:?}");
    out
}

#[test]
fn pmu_qemu_tcg_svm() {
    pmu_selftest(Machine::QemuSvm, "amd");
}

#[test]
fn pmu_bochs_vmx() {
    pmu_selftest(Machine::BochsVmx, "intel");
}

#[test]
fn pmu_bochs_svm() {
    pmu_selftest(Machine::BochsSvm, "amd");
}
