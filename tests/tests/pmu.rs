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

/// Isolation (issue 10): two VMs share the only host CPU, one counting cycles over a busy
/// loop of 400 ms of TSC time (`mode=pmu-count`), the other spinning with no exits until its
/// time limit. Each gets about half of the CPU in 5 ms slices, so the counter holds the
/// counting vCPU's own guest time, about half of the loop, not the loop's length (what a
/// counter of the host CPU's cycles would show) and not the other VM's time; and never more
/// than the time Vireo ran that vCPU (`run_us` of its end report).
fn pmu_isolation(machine: Machine) {
    let out = Boot::new(machine)
        .smp(1)
        .guest("selftest=count mode=pmu-count pmu_ms=400 pmu=on")
        .guest("selftest=busy mode=spin-sti pmu=on timeout=2 expect=timed-out")
        .run();
    out.assert_exit_ok();
    let line =
        out.guest_lines("count").into_iter().find(|l| l.starts_with("selftest: pmu_count ")).unwrap_or_else(|| {
            panic!("no pmu_count line\n{out:?}");
        });
    let n = |k: &str| field(line, k).and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("{k}: {line}"));
    let (cycles, tsc, per_ms) = (n("cycles"), n("tsc"), n("tsc_per_ms"));
    assert!(out.line("vm name=busy placed ").contains("host_cpus=0"), "{out:?}");
    assert!(out.line("vm name=count placed ").contains("host_cpus=0"), "{out:?}");
    // Both ran, taking turns: the counting vCPU waited for the busy one.
    let vcpu = out.line("vm name=count vcpu=0 ");
    let steal_us = field(vcpu, "steal_us").and_then(|v| v.parse::<u64>().ok()).unwrap();
    let run_us = field(vcpu, "run_us").and_then(|v| v.parse::<u64>().ok()).unwrap();
    assert!(steal_us > 100_000, "the counting VM hardly waited: {vcpu}\n{out:?}");
    // Its share of the loop: around a half, far from all of it.
    let pct = cycles * 100 / tsc;
    assert!((25..=75).contains(&pct), "cycles {cycles} over {tsc} TSC ticks: {pct}%\n{line}\n{vcpu}\n{out:?}");
    // Its own run time: the counted guest time is at most Vireo's run time of the vCPU
    // (which adds its exits and the rest of the guest's run) and most of it.
    let cycles_us = cycles * 1000 / per_ms;
    assert!(cycles_us <= run_us + run_us / 50, "counted {cycles_us} us, ran {run_us} us\n{line}\n{vcpu}\n{out:?}");
    assert!(cycles_us >= run_us / 2, "counted {cycles_us} us of a run of {run_us} us\n{line}\n{vcpu}\n{out:?}");
    eprintln!("{line}\n{vcpu}\ncounted {cycles_us} us, ran {run_us} us, {pct}% of the loop");
}

#[test]
fn pmu_isolation_qemu_tcg_svm() {
    pmu_isolation(Machine::QemuSvm);
}

#[test]
fn pmu_isolation_bochs_vmx() {
    pmu_isolation(Machine::BochsVmx);
}

#[test]
fn pmu_isolation_bochs_svm() {
    pmu_isolation(Machine::BochsSvm);
}
