//! A stock Debian Linux kernel (fetched by package name by scripts/guest-linux.sh) boots to
//! userspace under Vireo; a corrupt kernel module is refused with a clear error.

use std::{path::PathBuf, process::Command, sync::OnceLock};

use vireo_tests::{field, repo_root, scratch_file, Boot, Machine, Outcome};

/// (kernel, headless initramfs), prepared once per test process.
fn linux_guest() -> &'static (PathBuf, PathBuf) {
    static GUEST: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    GUEST.get_or_init(|| {
        let out = Command::new("scripts/guest-linux.sh")
            .arg("--quiet")
            .current_dir(repo_root())
            .output()
            .expect("run guest-linux.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "guest-linux.sh failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let get = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("guest-linux.sh printed no {key}=\n{stdout}"))
        };
        (get("kernel"), get("initrd_headless"))
    })
}

fn boot_linux(machine: Machine, timeout: u64) -> Outcome {
    boot_linux_with(machine, timeout, "")
}

/// `options`: extra VM-line keys (e.g. `apic=on`).
fn boot_linux_with(machine: Machine, timeout: u64, options: &str) -> Outcome {
    let (kernel, initrd) = linux_guest();
    // A light workload, so that the Bochs boots stay within the suite's budget.
    let line =
        format!("linux mem=256M {options} -- console=ttyS0 panic=-1 linux_guest_compute=20000 linux_guest_forks=50");
    let line = line.as_str();
    let mut boot = Boot::new(machine).module(kernel, line).module(initrd, "linux:initrd");
    boot.timeout = Some(timeout);
    let out = boot.run();
    out.assert_exit_ok();
    out
}

fn check_userspace(out: &Outcome) {
    let lines = out.guest_lines("linux");
    assert!(lines.iter().any(|l| l.contains("Linux version 6.1")), "kernel log on the console\n{out:?}");
    let guest = |key: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("linux-guest: {key} ")))
            .unwrap_or_else(|| panic!("no `linux-guest: {key}` line\n{out:?}"))
            .to_string()
    };
    assert!(guest("uname").starts_with("Linux "), "{out:?}");
    assert_eq!(guest("cpus"), "1", "the VM has one vCPU\n{out:?}");
    let mem_kb: u64 = guest("mem_kb").parse().unwrap();
    assert!((180_000..=262_144).contains(&mem_kb), "the kernel sees the 256 MiB it was given: {mem_kb} kB\n{out:?}");
    assert!(guest("flags").contains("hypervisor"), "{out:?}");
    assert!(guest("compute").ends_with("fork 50"), "{out:?}");
    assert!(lines.contains(&"linux-guest: done"), "{out:?}");
    // The guest's poweroff goes through ACPI S5 (PM1a control), and only its VM ends.
    let end = out.line("vm name=linux end ");
    assert_eq!(field(end, "outcome").as_deref(), Some("powered-off"), "{out:?}");
    assert!(lines.iter().any(|l| l.contains("ACPI: PM: (supports S0 S5)")), "{out:?}");
    assert!(!out.lines("vm name=linux exit reason=io ").is_empty(), "exit statistics printed\n{out:?}");
}

#[test]
fn linux_qemu_tcg_svm() {
    let out = boot_linux(Machine::QemuSvm, 240);
    check_userspace(&out);
    check_apic_mode(&out);
    let lines = out.guest_lines("linux");
    assert!(lines.iter().any(|l| l.contains("..TIMER: vector=0x30 apic1=0 pin1=2")), "{out:?}");
}

#[test]
fn corrupt_kernel_is_refused() {
    let (kernel, _) = linux_guest();
    let mut bytes = std::fs::read(kernel).expect("read the kernel");
    bytes.truncate(bytes.len() / 2);
    let half = scratch_file("vmlinuz-truncated", &bytes);
    let mut broken_header = std::fs::read(kernel).unwrap();
    broken_header[0x206] = 0x0B; // boot protocol 2.11
    broken_header[0x207] = 0x02;
    let old = scratch_file("vmlinuz-protocol-2.11", &broken_header);
    let out = Boot::new(Machine::QemuSvm)
        .module(&half, "halved mem=128M")
        .module(&old, "old mem=128M")
        .guest("selftest")
        .run();
    out.assert_exit_fail();
    assert_eq!(out.field("vms ended", "refused"), "2", "{out:?}");
    assert!(out.line("vm name=halved not started").contains("Linux kernel: image is truncated"), "{out:?}");
    assert!(out.line("vm name=old not started").contains("older than 2.12"), "{out:?}");
    // The other VM still ran.
    assert_eq!(out.field("vm name=selftest end", "outcome"), "exited", "{out:?}");
}

#[test]
fn linux_bochs_vmx() {
    let out = boot_linux(Machine::BochsVmx, 600);
    check_userspace(&out);
    check_apic_mode(&out);
}

#[test]
fn linux_bochs_svm() {
    let out = boot_linux(Machine::BochsSvm, 600);
    check_userspace(&out);
    check_apic_mode(&out);
}

/// Linux VMs get a local APIC and I/O APIC by default and route interrupts through them.
fn check_apic_mode(out: &Outcome) {
    let lines = out.guest_lines("linux");
    assert!(lines.iter().any(|l| l.contains("IOAPIC[0]: apic_id 0")), "{out:?}");
    assert!(lines.iter().any(|l| l.contains("Using IOAPIC for interrupt routing")), "{out:?}");
}

/// `apic=off`: no local APIC in CPUID, Linux stays on the 8259 pair.
#[test]
fn linux_qemu_tcg_svm_pic_mode() {
    let out = boot_linux_with(Machine::QemuSvm, 240, "apic=off");
    check_userspace(&out);
    let lines = out.guest_lines("linux");
    assert!(lines.iter().any(|l| l.contains("APIC: Keep in PIC mode(8259)")), "{out:?}");
}
