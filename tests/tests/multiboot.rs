//! Multiboot (v1) kernels as `qemu -kernel` runs them: our test kernel (guests/mbtest) booted
//! natively in plain QEMU and as a Vireo VM gives the same checks and the same verdicts
//! (isa-debug-exit statuses 1 = pass, 3 = `mode=fail`; pc-testdev's registers, memory window
//! and an interrupt through its IRQ line), with a module of its own; modules that
//! are no valid multiboot kernel are refused by name while the others run. With `mode=virtio`
//! it is a hostile virtio driver: every broken descriptor chain it publishes must be contained
//! (`hostile_virtio_descriptors_are_contained_*`).

use std::{path::PathBuf, process::Command};

use vireo_tests::{field, repo_root, scratch_file, Boot, Machine, Outcome};

/// Builds guests/mbtest and gives it as QEMU's `-kernel` takes it: an ELF32 copy.
fn kernel() -> PathBuf {
    let root = repo_root();
    let out = Command::new("cargo")
        .args(["build", "--release", "-q", "-p", "vireo-mbtest", "--target", "x86_64-unknown-none"])
        .current_dir(&root)
        .output()
        .expect("run cargo build");
    assert!(out.status.success(), "building vireo-mbtest failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let elf64 = root.join("target/x86_64-unknown-none/release/vireo-mbtest");
    let elf32 = scratch_file("mbtest.elf32", b"");
    let out = Command::new("objcopy").args(["-O", "elf32-i386"]).arg(&elf64).arg(&elf32).output().expect("objcopy");
    assert!(out.status.success(), "objcopy failed:\n{}", String::from_utf8_lossy(&out.stderr));
    elf32
}

/// The kernel in plain QEMU (TCG, no hypervisor): its console lines and exit status.
fn native(kernel: &PathBuf, append: &str) -> (Vec<String>, Option<i32>) {
    let out = Command::new("timeout")
        .args(["120", "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64", "-m", "64", "-display", "none"])
        .args([
            "-serial",
            "stdio",
            "-no-reboot",
            "-nic",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-device",
            "pc-testdev",
        ])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", append])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run qemu-system-x86_64");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    (text.lines().map(str::to_string).collect(), out.status.code())
}

/// `(check, ok)` of every `mbtest: <check> ok|FAIL ...` line.
fn checks<S: AsRef<str>>(lines: &[S]) -> Vec<(String, bool)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut w = l.as_ref().strip_prefix("mbtest: ")?.split(' ');
            let name = w.next()?;
            match w.next()? {
                "ok" => Some((name.to_string(), true)),
                "FAIL" => Some((name.to_string(), false)),
                _ => None,
            }
        })
        .collect()
}

/// A copy of `image` whose multiboot magic is gone (an ELF32 with no header), or whose
/// checksum is off by one.
fn broken(image: &[u8], checksum_only: bool) -> Vec<u8> {
    let mut b = image.to_vec();
    let at = b[..8192].windows(4).position(|w| w == 0x1BAD_B002u32.to_le_bytes()).expect("a multiboot header");
    if checksum_only {
        b[at + 8] ^= 1;
    } else {
        b[at..at + 4].copy_from_slice(&[0; 4]);
    }
    b
}

/// A flat a.out-kludge kernel loaded at 1.5 GiB (beyond a 64 MiB VM's RAM).
fn outside_ram() -> Vec<u8> {
    let flags = 1u32 << 16;
    let load = 0x6000_0000u32;
    let mut b = Vec::new();
    for w in [0x1BAD_B002u32, flags, 0u32.wrapping_sub(0x1BAD_B002u32.wrapping_add(flags)), load, load, 0, 0, load] {
        b.extend_from_slice(&w.to_le_bytes());
    }
    b.resize(4096, 0xF4);
    b
}

/// Vireo with the test kernel passing (with a module), failing on purpose, and (with
/// `bad_input`) three modules that must be refused.
fn under_vireo(machine: Machine, kernel: &PathBuf, bad_input: bool) -> Outcome {
    let module = scratch_file("mbtest-module.bin", b"a module for the multiboot test kernel");
    let mut boot = Boot::new(machine)
        .module(kernel, "mb mem=64M expect=exited:1 -- a=1 b=2")
        .module(&module, "mb:module mod0 x=y")
        .module(kernel, "mbfail mem=64M expect=exited:3 -- mode=fail");
    if bad_input {
        // Two vCPUs (the second waits for a SIPI that never comes); a module for no VM.
        boot = boot.module(kernel, "mbsmp mem=64M cpus=2 expect=exited:1").module(&module, "ghost:module");
        let image = std::fs::read(kernel).expect("read the kernel");
        boot = boot
            .module(scratch_file("mb-noheader.elf32", &broken(&image, false)), "noheader mem=64M")
            .module(scratch_file("mb-badsum.elf32", &broken(&image, true)), "badsum mem=64M")
            .module(scratch_file("mb-outside.bin", &outside_ram()), "outside mem=64M");
    }
    boot.run()
}

fn compare(out: &Outcome, kernel: &PathBuf, backend: &str) {
    assert_eq!(out.field("virt enabled", "backend"), backend, "{out:?}");
    assert_eq!(out.field("vm name=mb start ", "backend"), backend, "{out:?}");
    let (pass_lines, pass_status) = native(kernel, "a=1 b=2");
    let (fail_lines, fail_status) = native(kernel, "mode=fail");
    assert_eq!(pass_status, Some(1), "native QEMU, pass: {pass_lines:?}");
    assert_eq!(fail_status, Some(3), "native QEMU, mode=fail: {fail_lines:?}");
    for (vm, native_lines, status) in [("mb", &pass_lines, "1"), ("mbfail", &fail_lines, "3")] {
        let lines = out.guest_lines(vm);
        let end = out.line(&format!("vm name={vm} end "));
        assert_eq!(field(end, "outcome").as_deref(), Some("exited"), "{out:?}");
        assert_eq!(field(end, "status").as_deref(), Some(status), "{out:?}");
        assert_eq!(out.field(&format!("vm name={vm} result"), "result"), "as-expected", "{out:?}");
        let (ours, theirs) = (checks(&lines), checks(native_lines));
        assert!(ours.len() >= 15, "{vm}: {ours:?}\n{out:?}");
        for check in
            ["string_io_ins", "string_io_outs", "testdev_irq", "testdev_iomem", "testdev_iomem_alu", "fw_cfg_cmdline"]
        {
            assert!(ours.contains(&(check.to_string(), true)), "{vm}: {check}\n{out:?}");
        }
        assert_eq!(ours, theirs, "{vm}: the same checks with the same results as under plain QEMU\n{out:?}");
    }
    // The arguments arrive as under QEMU's -append, and the module with its own command line.
    let mb = out.guest_lines("mb");
    assert!(mb.contains(&"mbtest: args \"a=1 b=2\""), "{out:?}");
    assert!(pass_lines.iter().any(|l| l == "mbtest: args \"a=1 b=2\""), "{pass_lines:?}");
    assert!(mb.contains(&"mbtest: module 0 size=38 cmdline=\"mod0 x=y\""), "{out:?}");
    assert!(mb.contains(&"mbtest: string_io_outs ok rep outsb"), "{out:?}");
    assert!(out.lines("crash").is_empty(), "{out:?}");
}

#[test]
fn multiboot_matches_qemu_on_qemu_tcg_svm() {
    let kernel = kernel();
    let out = under_vireo(Machine::QemuSvm, &kernel, true);
    compare(&out, &kernel, "svm");
    // Bad input: refused by name, the others ran.
    let refused = |vm: &str| out.line(&format!("vm name={vm} not started")).to_string();
    assert!(refused("noheader").contains("32-bit ELF without a multiboot header"), "{out:?}");
    assert!(refused("badsum").contains("bad checksum"), "{out:?}");
    assert!(refused("outside").contains("lies outside the VM's RAM"), "{out:?}");
    // fw_cfg counts the vCPUs (the MADT lists them); a module naming no VM is reported.
    assert!(out.guest_lines("mbsmp").contains(&"mbtest: fw_cfg_cpus ok cpus=2"), "{out:?}");
    assert!(out.line("vm module=").contains("module for VM 'ghost', which no module describes"), "{out:?}");
    let ended = out.line("vms ended ");
    assert_eq!(field(ended, "as_expected").as_deref(), Some("3"), "{out:?}");
    assert_eq!(field(ended, "refused").as_deref(), Some("3"), "{out:?}");
    out.assert_exit_fail();
}

/// A kernel that fails (isa-debug-exit status 3 where the line expects 1) fails the run, as
/// it fails under plain QEMU.
#[test]
fn a_failing_multiboot_kernel_fails_the_run() {
    let kernel = kernel();
    let out = Boot::new(Machine::QemuSvm).module(&kernel, "mbfail mem=64M expect=exited:1 -- mode=fail").run();
    assert_eq!(out.field("vm name=mbfail end ", "status"), "3", "{out:?}");
    assert_eq!(out.field("vm name=mbfail result", "result"), "unexpected", "{out:?}");
    out.assert_exit_fail();
    assert!(out.line("exit status=fail").contains("a VM did not end as expected"), "{out:?}");
}

#[test]
fn multiboot_matches_qemu_on_bochs_vmx() {
    let kernel = kernel();
    let out = under_vireo(Machine::BochsVmx, &kernel, false);
    compare(&out, &kernel, "vmx");
    out.assert_exit_ok();
}

#[test]
fn multiboot_matches_qemu_on_bochs_svm() {
    let kernel = kernel();
    let out = under_vireo(Machine::BochsSvm, &kernel, false);
    compare(&out, &kernel, "svm");
    out.assert_exit_ok();
}

/// Each hostile case of `mode=virtio` (guests/mbtest/src/kernel/virtio.rs), the text of the
/// line Vireo must print for it, and the device status that line gives (`ring_mmio` fails
/// at queue enable, before DRIVER_OK).
const HOSTILE: [(&str, &str, &str); 10] = [
    ("loop", "descriptor chain loops at descriptor 0", "0x4f"),
    ("past_ram", "buffer 0x3ffff00+0x1000 is not in RAM", "0x4f"),
    ("mmio_lapic", "buffer 0xfee00000+0x10 is not in RAM", "0x4f"),
    ("mmio_bar", "buffer 0xc0000000+0x100 is not in RAM", "0x4f"),
    ("too_long", "descriptor chain is longer than the queue size 8", "0x4f"),
    ("avail_jump", "available index 9 is more than the queue size ahead of 0", "0x4f"),
    ("head_range", "chain head 200 is outside the descriptor table", "0x4f"),
    ("next_range", "next index 8 is outside a table of 8 descriptors", "0x4f"),
    ("ring_mmio", "Descriptors ring at 0xfee00000 is not in RAM", "0x4b"),
    ("cfg_window", "descriptor chain loops at descriptor 0", "0x4f"),
];

/// Hostile descriptors from a guest we control, contained: the test kernel drives the
/// virtio-console of VM `vh` with a chain that loops, buffers past the end of RAM, in the
/// local APIC page and in the device's own BAR, an indirect table longer than the queue, an
/// available index that jumps past the queue size, head and next indices outside the table,
/// a descriptor table in MMIO, and a loop notified through the PCI configuration access
/// window. Each must leave the device in "needs reset" (status bit 64, a configuration
/// interrupt where DRIVER_OK was set, the used ring untouched) with one Vireo line naming
/// the error; after a reset a good request goes through and its text reaches Vireo's
/// console. VM `mb`, running beside it, and Vireo end normally.
fn hostile_virtio(machine: Machine, backend: &str) {
    let kernel = kernel();
    let out = Boot::new(machine)
        .module(&kernel, "vh mem=64M virtio=console expect=exited:1 -- mode=virtio")
        .module(&kernel, "mb mem=64M expect=exited:1 -- a=1 b=2")
        .run();
    assert_eq!(out.field("vm name=vh start ", "backend"), backend, "{out:?}");
    let vh = out.guest_lines("vh");
    let results: Vec<&str> = vh.iter().filter_map(|l| l.strip_prefix("mbtest: virtio_hostile ")).collect();
    assert_eq!(results.len(), HOSTILE.len(), "{out:?}");
    let errors: Vec<&str> = out.serial.lines().filter(|l| l.contains("vm vh: virtio-console queue 1: ")).collect();
    assert_eq!(errors.len(), HOSTILE.len(), "one line per hostile chain\n{out:?}");
    for (((case, text, status), result), error) in HOSTILE.iter().zip(&results).zip(&errors) {
        assert!(result.starts_with("ok "), "{case}: {result}\n{out:?}");
        assert_eq!(field(result, "case").as_deref(), Some(*case), "{out:?}");
        assert_eq!(field(result, "needs_reset").as_deref(), Some("1"), "{case}\n{out:?}");
        assert_eq!(field(result, "used_idx").as_deref(), Some("0"), "{case}\n{out:?}");
        assert_eq!(field(result, "used_untouched").as_deref(), Some("1"), "{case}\n{out:?}");
        assert_eq!(field(result, "reset").as_deref(), Some("ok"), "{case}\n{out:?}");
        let isr = if *case == "ring_mmio" { "0x0" } else { "0x2" };
        assert_eq!(field(result, "isr").as_deref(), Some(isr), "{case}: the configuration interrupt\n{out:?}");
        let want = format!(": {text}: device needs reset (status {status})");
        assert!(error.ends_with(&want), "{case}: {error}\n{out:?}");
    }
    // The good request after the reset: used, and its text on Vireo's console, once.
    assert!(vh.iter().any(|l| l.starts_with("mbtest: virtio_good ok ")), "{out:?}");
    assert_eq!(vh.iter().filter(|l| **l == "virtio-console: good write after reset").count(), 1, "{out:?}");
    assert!(vh.contains(&"mbtest: virtio_found ok bar=0xc0000000"), "{out:?}");
    for vm in ["vh", "mb"] {
        let end = out.line(&format!("vm name={vm} end "));
        assert_eq!(field(end, "outcome").as_deref(), Some("exited"), "{vm}\n{out:?}");
        assert_eq!(field(end, "status").as_deref(), Some("1"), "{vm}\n{out:?}");
        assert_eq!(out.field(&format!("vm name={vm} result"), "result"), "as-expected", "{out:?}");
    }
    assert!(out.guest_lines("mb").contains(&"mbtest: 15 passed, 0 failed"), "{out:?}");
    // vh: mb's 15 checks, virtio_found, the 10 hostile cases and virtio_good.
    assert!(vh.contains(&"mbtest: 27 passed, 0 failed"), "{out:?}");
    assert!(out.lines("crash").is_empty(), "{out:?}");
    out.assert_exit_ok();
}

#[test]
fn hostile_virtio_descriptors_are_contained_on_qemu_tcg_svm() {
    hostile_virtio(Machine::QemuSvm, "svm");
}

#[test]
fn hostile_virtio_descriptors_are_contained_on_bochs_vmx() {
    hostile_virtio(Machine::BochsVmx, "vmx");
}

#[test]
fn hostile_virtio_descriptors_are_contained_on_bochs_svm() {
    hostile_virtio(Machine::BochsSvm, "svm");
}
