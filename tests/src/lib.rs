//! End-to-end harness: builds Vireo, boots it headless in QEMU and Bochs through the run
//! scripts, and parses the structured `vireo: ...` serial lines.
//!
//! Every boot goes through `scripts/run-qemu.sh` / `scripts/run-bochs.sh`, the same commands a
//! user runs, so the tests also prove the scripts. A missing emulator is installed by the
//! scripts (scripts/install-deps.sh), never skipped.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

/// The four machine configurations Vireo is tested on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// QEMU TCG, `-cpu qemu64,+svm,+npt`, SeaBIOS.
    QemuSvm,
    /// The same with OVMF (UEFI).
    QemuSvmUefi,
    /// Bochs `corei7_skylake_x`: VMX with EPT, VPID, unrestricted guest.
    BochsVmx,
    /// Bochs `ryzen`: SVM with NPT and nRIP.
    BochsSvm,
}

impl Machine {
    fn script_args(self) -> Vec<&'static str> {
        match self {
            Machine::QemuSvm => vec!["scripts/run-qemu.sh", "--accel", "tcg"],
            Machine::QemuSvmUefi => vec!["scripts/run-qemu.sh", "--accel", "tcg", "--uefi"],
            Machine::BochsVmx => vec!["scripts/run-bochs.sh", "--cpu", "vmx"],
            Machine::BochsSvm => vec!["scripts/run-bochs.sh", "--cpu", "svm"],
        }
    }

    fn default_timeout(self) -> u64 {
        match self {
            Machine::QemuSvm => 120,
            Machine::QemuSvmUefi => 240,
            Machine::BochsVmx | Machine::BochsSvm => 600,
        }
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the repository").to_path_buf()
}

/// The `key=value` lines a preparation script (`scripts/guest-linux.sh --quiet`,
/// `scripts/mkdisk.sh`) prints on success, from the repository root; panics with the
/// script's output if it fails. Tests call it once per process (behind a `OnceLock`).
pub fn script_outputs(script: &str, args: &[&str]) -> std::collections::BTreeMap<String, String> {
    let out = Command::new(script)
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The Debian guest's files from `scripts/guest-linux.sh --quiet` (`kernel`,
/// `initrd_headless`, `initrd_net`, ...), prepared once per test process.
pub fn linux_guest_file(key: &str) -> PathBuf {
    static OUTPUTS: OnceLock<std::collections::BTreeMap<String, String>> = OnceLock::new();
    let outputs = OUTPUTS.get_or_init(|| script_outputs("scripts/guest-linux.sh", &["--quiet"]));
    PathBuf::from(outputs.get(key).unwrap_or_else(|| panic!("guest-linux.sh printed no {key}=: {outputs:?}")))
}

/// Which Vireo build a boot uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    Release,
    /// `--features test-hooks`: honours the `test.*` command-line keys.
    TestHooks,
}

/// Builds the ELF once per test process and returns its path.
pub fn elf(build: Build) -> PathBuf {
    static RELEASE: OnceLock<PathBuf> = OnceLock::new();
    static HOOKS: OnceLock<PathBuf> = OnceLock::new();
    let (cell, args): (_, &[&str]) = match build {
        Build::Release => (&RELEASE, &[]),
        Build::TestHooks => (&HOOKS, &["--features", "test-hooks", "--target-dir", "target/test-hooks"]),
    };
    cell.get_or_init(|| {
        let out = Command::new("scripts/build.sh")
            .args(args)
            .current_dir(repo_root())
            .output()
            .expect("run scripts/build.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "scripts/build.sh {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = stdout.lines().last().expect("build.sh prints the ELF path").trim();
        let path = repo_root().join(path);
        assert!(path.is_file(), "build.sh named {path:?}, which does not exist");
        path
    })
    .clone()
}

/// One headless boot to run.
#[derive(Clone, Debug)]
pub struct Boot {
    pub machine: Machine,
    pub build: Build,
    pub cmdline: String,
    /// (file, module command line)
    pub modules: Vec<(PathBuf, String)>,
    /// `--guest` specs: `NAME[=MODULE CMDLINE]`.
    pub guests: Vec<String>,
    pub timeout: Option<u64>,
    /// Host CPUs of the emulated machine (`--smp`); `None`: the scripts' default (2).
    pub smp: Option<u32>,
    /// RAM of the emulated machine in MiB (`--mem`); `None`: the scripts' default (512).
    pub mem_mib: Option<u32>,
    /// `--type-after PATTERN TEXT` (QEMU only): typed on Vireo's console once a serial line
    /// contains PATTERN.
    pub type_after: Option<(String, String)>,
    /// QEMU runs every emulated CPU on one host thread (`VIREO_TCG_THREAD=single`).
    pub tcg_single: bool,
}

impl Boot {
    pub fn new(machine: Machine) -> Self {
        Self {
            machine,
            build: Build::Release,
            cmdline: String::new(),
            modules: Vec::new(),
            guests: Vec::new(),
            timeout: None,
            smp: None,
            mem_mib: None,
            type_after: None,
            tcg_single: false,
        }
    }

    pub fn test_build(mut self) -> Self {
        self.build = Build::TestHooks;
        self
    }

    /// The emulated machine's CPU count (`--smp N`).
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = Some(cpus);
        self
    }

    /// The emulated machine's RAM in MiB (`--mem N`): several large VMs need more than the
    /// scripts' 512.
    pub fn mem(mut self, mib: u32) -> Self {
        self.mem_mib = Some(mib);
        self
    }

    /// Types `text` (printf `%b` escapes) on Vireo's serial console once a serial line
    /// contains `pattern` (QEMU only: `scripts/run-qemu.sh --type-after`).
    pub fn type_after(mut self, pattern: &str, text: &str) -> Self {
        assert_eq!(self.machine, Machine::QemuSvm, "--type-after is a run-qemu.sh option");
        self.type_after = Some((pattern.to_string(), text.to_string()));
        self
    }

    /// QEMU TCG with one host thread for all emulated CPUs (`VIREO_TCG_THREAD=single`)
    /// instead of one per CPU.
    pub fn tcg_single_thread(mut self) -> Self {
        assert_eq!(self.machine, Machine::QemuSvm, "a QEMU setting");
        self.tcg_single = true;
        self
    }

    /// The time limit of the whole boot in seconds (`--timeout`); default per machine.
    pub fn timeout(mut self, seconds: u64) -> Self {
        self.timeout = Some(seconds);
        self
    }

    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.to_string();
        self
    }

    pub fn module(mut self, path: impl Into<PathBuf>, cmdline: &str) -> Self {
        self.modules.push((path.into(), cmdline.to_string()));
        self
    }

    /// Adds a guest built from guests/NAME: `spec` is `NAME` or `NAME=MODULE CMDLINE`.
    pub fn guest(mut self, spec: &str) -> Self {
        self.guests.push(spec.to_string());
        self
    }

    pub fn run(&self) -> Outcome {
        let elf = elf(self.build);
        let args = self.machine.script_args();
        let timeout = self.timeout.unwrap_or(self.machine.default_timeout());
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]).current_dir(repo_root());
        cmd.args(["--headless", "--timeout", &timeout.to_string(), "--elf"]).arg(&elf);
        if let Some(n) = self.smp {
            cmd.args(["--smp", &n.to_string()]);
        }
        if let Some(mib) = self.mem_mib {
            cmd.args(["--mem", &mib.to_string()]);
        }
        if let Some((pattern, text)) = &self.type_after {
            cmd.args(["--type-after", pattern, text]);
        }
        if self.tcg_single {
            cmd.env("VIREO_TCG_THREAD", "single");
        }
        if !self.cmdline.is_empty() {
            cmd.args(["--cmdline", &self.cmdline]);
        }
        for (path, mcmd) in &self.modules {
            let spec =
                if mcmd.is_empty() { path.display().to_string() } else { format!("{}={}", path.display(), mcmd) };
            cmd.args(["--module", &spec]);
        }
        for g in &self.guests {
            cmd.args(["--guest", g]);
        }
        // Every test says exactly which VMs it wants.
        cmd.arg("--no-default-guest");
        let start = Instant::now();
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]));
        let elapsed = start.elapsed();
        let serial = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        let log = save_serial_log(&serial);
        let outcome = Outcome {
            boot: self.clone(),
            code: out.status.code(),
            serial,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed,
            log,
        };
        eprintln!("{:?} booted in {:.1}s, script exit {:?}", self.machine, elapsed.as_secs_f64(), outcome.code);
        outcome
    }
}

/// What a boot printed and how the script ended.
pub struct Outcome {
    pub boot: Boot,
    pub code: Option<i32>,
    pub serial: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// Where the whole serial log was saved (`target/boot-logs/`), if it could be.
    pub log: Option<PathBuf>,
}

/// Saves a boot's whole serial log as `target/boot-logs/<test>-<pid>-<n>.log` (a failure's
/// message shows only the tail and Vireo's VM reports) and returns its path.
fn save_serial_log(serial: &str) -> Option<PathBuf> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = repo_root().join("target").join("boot-logs");
    std::fs::create_dir_all(&dir).ok()?;
    let test = std::thread::current().name().unwrap_or("boot").replace("::", "-");
    let path = dir.join(format!("{test}-{}-{}.log", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, serial).ok()?;
    Some(path)
}

impl fmt::Debug for Outcome {
    /// The tail of the serial log: what a failed assertion shows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<&str> = self.serial.lines().collect();
        let cut = lines.len().saturating_sub(60);
        let tail = &lines[cut..];
        writeln!(f, "boot {:?} (script exit {:?}, {:.1}s)", self.boot, self.code, self.elapsed.as_secs_f64())?;
        if let Some(log) = &self.log {
            writeln!(f, "whole serial log: {}", log.display())?;
        }
        // Vireo's own lines above the tail (how each VM ended, faults, refusals): with several
        // VMs, the one that failed usually reported long before the tail.
        let earlier: Vec<&&str> = lines[..cut].iter().filter(|l| l.starts_with("vireo: ")).collect();
        if !earlier.is_empty() {
            writeln!(f, "--- Vireo's lines before the tail ({}) ---", earlier.len())?;
            for l in earlier.iter().rev().take(150).rev() {
                writeln!(f, "{l}")?;
            }
        }
        writeln!(f, "--- serial log tail ---")?;
        for l in tail {
            writeln!(f, "{l}")?;
        }
        writeln!(f, "--- script stderr ---\n{}", self.stderr)
    }
}

impl Outcome {
    /// The structured lines, without the `vireo: ` prefix.
    pub fn reports(&self) -> impl Iterator<Item = &str> {
        self.serial.lines().filter_map(|l| l.trim_end().strip_prefix("vireo: "))
    }

    /// Lines a VM printed on its console (`[name] text`), without the prefix.
    pub fn guest_lines(&self, vm: &str) -> Vec<&str> {
        let prefix = format!("[{vm}] ");
        self.serial.lines().filter_map(|l| l.trim_end().strip_prefix(prefix.as_str())).collect()
    }

    /// The first report line starting with `prefix` (e.g. `"cpu "`), or a panic with the log.
    pub fn line(&self, prefix: &str) -> &str {
        self.reports().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no `vireo: {prefix}` line\n{self:?}"))
    }

    /// All report lines starting with `prefix`.
    pub fn lines(&self, prefix: &str) -> Vec<&str> {
        self.reports().filter(|l| l.starts_with(prefix)).collect()
    }

    /// The value of `key=` in the first line starting with `prefix` (quotes stripped).
    pub fn field(&self, prefix: &str, key: &str) -> String {
        field(self.line(prefix), key).unwrap_or_else(|| panic!("no {key}= in `vireo: {prefix}...`\n{self:?}"))
    }

    /// Checks the SMP banner: `cpus found=N used=N` and one `cpu index=I ... online virt=VIRT`
    /// line per CPU, indices 0..N dense, the BSP first.
    pub fn assert_cpus_online(&self, n: usize, virt: &str) {
        let cpus = self.line("cpus ");
        assert_eq!(field(cpus, "found").as_deref(), Some(n.to_string().as_str()), "{self:?}");
        assert_eq!(field(cpus, "used").as_deref(), Some(n.to_string().as_str()), "{self:?}");
        assert_eq!(field(cpus, "apic_ids").map(|l| l.split(',').count()), Some(n), "{self:?}");
        let online = self.lines("cpu index=");
        assert_eq!(online.len(), n, "{self:?}");
        for (i, l) in online.iter().enumerate() {
            assert_eq!(field(l, "index").as_deref(), Some(i.to_string().as_str()), "{self:?}");
            assert!(l.contains(" online ") && field(l, "virt").as_deref() == Some(virt), "{l}\n{self:?}");
        }
        assert!(self.lines("cpu apic_id=").is_empty(), "no CPU may stay offline\n{self:?}");
        if n > 1 {
            // Vireo sends each AP its wake-up IPI once and checks the AP took it.
            assert!(self.reports().any(|l| l == "cpus wake_ipi=ok"), "{self:?}");
        }
    }

    pub fn assert_exit_ok(&self) {
        assert_eq!(self.code, Some(0), "script should succeed\n{self:?}");
        assert!(self.reports().any(|l| l == "exit status=ok"), "no `vireo: exit status=ok`\n{self:?}");
    }

    pub fn assert_exit_fail(&self) {
        assert!(
            matches!(self.code, Some(c) if c != 0 && c != 124),
            "script should report failure (not timeout)\n{self:?}"
        );
        assert!(self.reports().any(|l| l.starts_with("exit status=fail")), "no `vireo: exit status=fail`\n{self:?}");
    }
}

/// The value of `key=` in a report line: `key=value` or `key="quoted value"`.
pub fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let mut search = line;
    loop {
        let at = search.find(&pat)?;
        let before_ok = at == 0 || search.as_bytes()[at - 1] == b' ';
        let rest = &search[at + pat.len()..];
        if before_ok {
            return Some(match rest.strip_prefix('"') {
                Some(q) => q.split('"').next().unwrap_or("").to_string(),
                None => rest.split(' ').next().unwrap_or("").to_string(),
            });
        }
        search = rest;
    }
}

/// A scratch file for module contents, unique per test.
pub fn scratch_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = repo_root().join("target/e2e-scratch");
    std::fs::create_dir_all(&dir).expect("create target/e2e-scratch");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write scratch file");
    path
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn fields() {
        let l = r#"cpu vendor=AuthenticAMD brand="QEMU Virtual CPU" nx=1 xnx=7"#;
        assert_eq!(field(l, "vendor").as_deref(), Some("AuthenticAMD"));
        assert_eq!(field(l, "brand").as_deref(), Some("QEMU Virtual CPU"));
        assert_eq!(field(l, "nx").as_deref(), Some("1"));
        assert_eq!(field(l, "x").as_deref(), None);
        assert_eq!(field(l, "missing"), None);
    }
}
