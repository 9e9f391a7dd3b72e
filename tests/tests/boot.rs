//! Boot Vireo in every emulator configuration and check what it reports.

use vireo_tests::{field, scratch_file, Boot, Machine};

/// Parses the banner's sizes (`512MiB`, `523775KiB`, `12B`).
fn bytes(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("bad size {s:?}"));
    n * match unit {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => panic!("bad unit in {s:?}"),
    }
}

/// The common banner checks, on a machine with two CPUs (both must come online with
/// virtualization `virt` on); returns the outcome for machine-specific ones.
fn boot_and_check_banner(machine: Machine, firmware: &str, virt: &str) -> vireo_tests::Outcome {
    let out = Boot::new(machine).smp(2).cmdline("log=info").run();
    out.assert_exit_ok();
    out.assert_cpus_online(2, virt);
    assert!(out.line("starting ").contains("build=release"), "{out:?}");
    assert_eq!(out.field("boot ", "firmware"), firmware, "{out:?}");
    assert!(out.line("cmdline \"").contains("log=info"), "{out:?}");
    assert!(out.lines("cmdline error").is_empty(), "the scripts' command line is valid\n{out:?}");
    let total = bytes(&out.field("memory ", "total"));
    // The run scripts give every machine 512 MiB; firmware keeps a little of it.
    assert!((448 << 20..=512 << 20).contains(&total), "memory total={total}\n{out:?}");
    let free = bytes(&out.field("memory ", "free"));
    assert!(free > 256 << 20 && free < total, "free={free}\n{out:?}");
    assert_eq!(out.field("modules ", "accepted"), "0");
    assert!(out.lines("nothing to run").len() == 1, "{out:?}");
    out
}

#[test]
fn qemu_tcg_svm_banner() {
    let out = boot_and_check_banner(Machine::QemuSvm, "bios", "svm");
    assert_eq!(out.field("cpu ", "vendor"), "AuthenticAMD", "{out:?}");
    let virt = out.line("virt ");
    // QEMU TCG emulates SVM with nested paging but not nRIP-save or decode assists.
    assert!(virt.starts_with("virt svm npt=1 nrip=0 "), "{out:?}");
    assert_eq!(field(virt, "decode_assists").as_deref(), Some("0"));
    assert!(field(virt, "asids").unwrap().parse::<u32>().unwrap() > 1, "{out:?}");
}

#[test]
fn qemu_tcg_svm_uefi_banner() {
    let out = boot_and_check_banner(Machine::QemuSvmUefi, "uefi", "svm");
    assert!(out.line("virt ").starts_with("virt svm npt=1 "), "{out:?}");
}

#[test]
fn bochs_vmx_banner() {
    let out = boot_and_check_banner(Machine::BochsVmx, "bios", "vmx");
    assert_eq!(out.field("cpu ", "vendor"), "GenuineIntel", "{out:?}");
    let virt = out.line("virt ");
    assert!(virt.starts_with("virt vmx ept=1 vpid=1 unrestricted=1 "), "{out:?}");
    for key in ["ept_2m", "true_ctls"] {
        assert_eq!(field(virt, key).as_deref(), Some("1"), "{key}\n{out:?}");
    }
    assert_eq!(field(virt, "disabled_by_firmware").as_deref(), Some("0"), "{out:?}");
}

#[test]
fn bochs_svm_banner() {
    let out = boot_and_check_banner(Machine::BochsSvm, "bios", "svm");
    assert_eq!(out.field("cpu ", "vendor"), "AuthenticAMD", "{out:?}");
    // Bochs's ryzen model has nested paging and nRIP-save.
    assert!(out.line("virt ").starts_with("virt svm npt=1 nrip=1 "), "{out:?}");
}

/// `cpus=1` keeps Vireo on the BSP; the other CPU is reported offline, by name.
#[test]
fn cpus_key_limits_host_cpus() {
    let out = Boot::new(Machine::QemuSvm).smp(2).cmdline("cpus=1").run();
    out.assert_exit_ok();
    assert_eq!(out.field("cpus ", "found"), "2", "{out:?}");
    assert_eq!(out.field("cpus ", "used"), "1", "{out:?}");
    assert_eq!(out.lines("cpu index=").len(), 1, "{out:?}");
    assert_eq!(out.field("cpu index=", "index"), "0", "{out:?}");
    let offline = out.lines("cpu apic_id=");
    assert_eq!(offline.len(), 1, "{out:?}");
    assert!(offline[0].contains(" offline reason=\"beyond the cpus= limit\""), "{out:?}");
}

/// More CPUs than two, and a machine with one: every CPU comes up, dense indices.
#[test]
fn qemu_four_cpus_and_one() {
    let out = Boot::new(Machine::QemuSvm).smp(4).run();
    out.assert_exit_ok();
    out.assert_cpus_online(4, "svm");
    let out = Boot::new(Machine::QemuSvm).smp(1).run();
    out.assert_exit_ok();
    out.assert_cpus_online(1, "svm");
}

/// Every provoked exception gives a dump with its vector, registers and a clean stop.
#[test]
fn crash_dump_on_cpu_exceptions() {
    let cases = [
        ("ud", 6, "#UD invalid opcode"),
        ("pf", 14, "#PF page fault"),
        ("gp", 13, "#GP general protection"),
        ("de", 0, "#DE divide error"),
        ("bp", 3, "#BP breakpoint"),
        ("stack", 8, "#DF double fault"),
    ];
    for (fault, vector, name) in cases {
        let out = Boot::new(Machine::QemuSvm).test_build().cmdline(&format!("test.fault={fault}")).run();
        out.assert_exit_fail();
        let crash = out.line("crash vector=");
        assert_eq!(field(crash, "vector"), Some(vector.to_string()), "{fault}\n{out:?}");
        assert_eq!(field(crash, "name").as_deref(), Some(name), "{fault}\n{out:?}");
        for reg in ["rax=", "rsi=", "r8 =", "r12="] {
            assert_eq!(out.lines(&format!("crash {reg}")).len(), 1, "{fault}: register line {reg}\n{out:?}");
        }
        assert!(out.line("crash backtrace ").len() > "crash backtrace ".len(), "{out:?}");
        assert_eq!(out.field("crash context", "context"), "test hook test.fault", "{out:?}");
        match fault {
            "pf" => assert_eq!(field(crash, "cr2").as_deref(), Some("0x700000000000"), "{out:?}"),
            "stack" => assert!(out.line("crash note").contains("guard page"), "{out:?}"),
            _ => {}
        }
        assert!(out.lines("nothing to run").is_empty(), "Vireo must stop at the fault\n{out:?}");
    }
}

/// The crash path works on the Intel model too.
#[test]
fn crash_dump_bochs_vmx() {
    let out = Boot::new(Machine::BochsVmx).test_build().cmdline("test.fault=gp").run();
    out.assert_exit_fail();
    assert_eq!(out.field("crash vector=", "vector"), "13", "{out:?}");
}

/// Bad keys and values are reported by name and ignored; the good ones still apply.
#[test]
fn malformed_cmdline_is_reported_not_fatal() {
    let out = Boot::new(Machine::QemuSvm)
        .cmdline("log=loud frobnicate=1 =x novalue heap=9999G test.fault=ud log=debug")
        .run();
    out.assert_exit_ok();
    let errors = out.lines("cmdline error=");
    let expect = [
        "bad value 'loud' for key 'log'",
        "unknown key 'frobnicate'",
        "malformed token '=x'",
        "malformed token 'novalue'",
        "bad value '9999G' for key 'heap'",
        "key 'test.fault' needs a test-hooks build",
    ];
    for e in expect {
        assert!(errors.iter().any(|l| l.contains(e)), "missing cmdline error {e:?}\n{out:?}");
    }
    assert_eq!(errors.len(), expect.len(), "{out:?}");
    // log=debug (valid, later on the line) took effect.
    assert!(out.serial.contains("[DEBUG]"), "{out:?}");
    assert!(out.lines("crash").is_empty(), "{out:?}");
}

/// An empty module (real GRUB input) is rejected with a reason; others are kept.
#[test]
fn empty_module_is_rejected() {
    let good = scratch_file("good-module.bin", b"a module with contents");
    let empty = scratch_file("empty-module.bin", b"");
    let out = Boot::new(Machine::QemuSvm).module(&good, "good one").module(&empty, "empty one").run();
    // Neither module is a VM Vireo can run: the run reports failure, with both refused.
    out.assert_exit_fail();
    assert_eq!(out.field("vms ended", "refused"), "2", "{out:?}");
    let accepted = out.line("module index=0 ");
    assert_eq!(field(accepted, "cmdline").as_deref(), Some("good one"), "{out:?}");
    assert_eq!(field(accepted, "size").as_deref(), Some("22"), "{out:?}");
    assert!(out.line("module index=1 ").contains("reason=\"empty module\""), "{out:?}");
    assert_eq!(out.field("modules ", "accepted"), "1");
    assert_eq!(out.field("modules ", "rejected"), "1");
}

/// A module overlapping Vireo's image (forced by a test hook, then validated by the real
/// path) is rejected; the rest of the boot goes on.
#[test]
fn module_overlapping_image_is_rejected() {
    let a = scratch_file("module-a.bin", &[0xAA; 5000]);
    let b = scratch_file("module-b.bin", &[0xBB; 100]);
    let out = Boot::new(Machine::QemuSvm)
        .test_build()
        .cmdline("test.mbi=module-overlaps-image")
        .module(&a, "a")
        .module(&b, "b")
        .run();
    out.assert_exit_fail();
    assert_eq!(out.field("vms ended", "refused"), "2", "{out:?}");
    assert!(out.line("module index=0 ").contains("rejected reason=\"overlaps Vireo's own image\""), "{out:?}");
    assert_eq!(field(out.line("module index=1 "), "cmdline").as_deref(), Some("b"), "{out:?}");
    assert_eq!(out.field("modules ", "accepted"), "1");
    assert_eq!(out.field("modules ", "rejected"), "1");
}
