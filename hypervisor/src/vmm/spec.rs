//! A VM described by a multiboot2 module: the module holds the guest image, its command
//! line names the VM and sets its options.
//!
//! Module command line: `<name> [mem=SIZE] [cpus=N] [apic=on|off] [pv=kvm|off] [pmu=on|off] [virtio=console|off] [floor=on|off] [timeout=SECONDS] [guest arguments...]
//! [-- kernel command line]`; `timeout` stops the VM after that many seconds of running
//! (default: no limit); everything after ` -- ` is a Linux guest's or a multiboot kernel's
//! command line. `expect=OUTCOME` (or `expect=exited:STATUS`) is how the VM should end.
//! `pv` picks the paravirtual interface at CPUID 0x4000_0000 (`crate::pv`): default `kvm`
//! for Linux VMs with local APICs, `off` otherwise. `floor=on` is a measuring mode: the
//! backend answers PING hypercalls in its own entry loop (`Backend::run_floor`).
//! `pmu` offers Vireo's virtual PMU (`crate::pmu`): default on for Linux VMs, off otherwise.
//! `virtio=console` puts a virtio-console on the PCI bus of a Linux or multiboot VM (00:01.0,
//! `crate::devices::virtio::console`); default off.
//! `cpus` is 1..=[`MAX_VCPUS`] (default 1), and `mem` must hold them: at least [`MIN_MEM`]
//! plus [`MEM_PER_EXTRA_VCPU`] for every vCPU beyond the first ([`min_mem_for`]).
//! A module whose line is `<name>:initrd` is the initramfs of VM `<name>`; one whose line is
//! `<name>:module [command line]` is a module for the multiboot kernel of VM `<name>`; one
//! whose line is `<name>:disk [ro] [serial=S]` is a disk image for VM `<name>`'s virtio-blk
//! device ([`disk_of`]; at 00:02.0, one disk per VM, written in place in Vireo's RAM and kept
//! across the VM's resets: `start.rs`). `net=SWITCH` connects the VM's virtio-net device to the virtual
//! switch `SWITCH` (a name like a VM's; VMs naming the same switch share it).
//! Unknown `key=value` words are left to the guest (test guests read `bench=`, `mode=`). The whole line is also
//! handed to the guest (test guests read `bench=N`, `mode=...` from it). `name` is 1-32
//! characters of `[A-Za-z0-9_-]`.

use core::fmt;

use crate::bootinfo::cmdline::parse_size;

pub const DEFAULT_MEM: u64 = 64 << 20;
pub const MIN_MEM: u64 = 4 << 20;
/// The most vCPUs a VM may have (the MADT lists them as xAPIC IDs 0..N-1).
pub const MAX_VCPUS: u32 = 16;
/// RAM each vCPU beyond the first adds to the minimum: room for a guest's per-CPU data,
/// its kernel and interrupt stacks and page tables (Linux takes a few hundred KiB per CPU;
/// 2 MiB leaves margin without making small test VMs large).
pub const MEM_PER_EXTRA_VCPU: u64 = 2 << 20;

/// The least RAM a VM with `cpus` vCPUs may have: [`MIN_MEM`] + [`MEM_PER_EXTRA_VCPU`] for
/// each vCPU beyond the first.
pub const fn min_mem_for(cpus: u32) -> u64 {
    MIN_MEM + cpus.saturating_sub(1) as u64 * MEM_PER_EXTRA_VCPU
}
pub const MAX_NAME: usize = 32;

/// Outcomes a VM line may expect (`expect=`), as the `end` line names them.
pub const EXPECTABLE: [&str; 7] = ["exited", "triple-fault", "halted", "fatal", "timed-out", "powered-off", "reset"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSpec<'a> {
    pub name: &'a str,
    pub mem: u64,
    /// Run-time limit in seconds (0 = none).
    pub timeout_s: u64,
    /// vCPUs, 1..=[`MAX_VCPUS`].
    pub cpus: u32,
    /// A Linux or multiboot kernel's command line (after ` -- `), empty if none.
    pub kernel_cmdline: &'a str,
    /// A Linux VM's local APIC and I/O APIC (`apic=off`: 8259 PIC mode only).
    pub apic: bool,
    /// How the VM is expected to end (`expect=` with an outcome name); `None`: powered off
    /// or exited with status 0. Vireo's exit status says whether every VM met its expectation.
    pub expect: Option<&'static str>,
    /// `expect=exited:N`: the status the VM must exit with (e.g. 1 for a test kernel that
    /// writes 0 to QEMU's `isa-debug-exit`, which ends with (V << 1) | 1).
    pub expect_status: Option<u64>,
    /// `pv=`; `None`: the default for the kind of guest.
    pub pv: Option<crate::pv::PvMode>,
    /// `floor=on`: the backend answers PING hypercalls itself ([`crate::vmm::backend::Backend::run_floor`]),
    /// to measure the exit path's floor (`scripts/bench-hypercall.sh`).
    pub floor: bool,
    /// `pmu=on|off`: the virtual PMU (`crate::pmu`); `None`: the default for the kind of
    /// guest (on for Linux VMs).
    pub pmu: Option<bool>,
    /// `virtio=console`: a virtio-console on the VM's PCI bus (`off`, the default: none).
    pub virtio_console: bool,
    /// `net=SWITCH`: the virtual switch the VM's NIC is on; `None`: no NIC.
    pub net: Option<&'a str>,
    /// The module's whole command line, passed to the guest.
    pub args: &'a str,
}

/// A disk image module: `<name>:disk [ro] [serial=S]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpec<'a> {
    /// The VM it belongs to.
    pub vm: &'a str,
    /// `ro`: writes fail with an I/O error and the device says it is read-only.
    pub read_only: bool,
    /// `serial=S` (1-20 printable ASCII characters): the disk's identity
    /// (`/sys/block/vda/serial`); default the VM's name.
    pub serial: &'a str,
}

/// Longest `serial=` (virtio-blk's GET_ID answer, virtio 1.2 §5.2.6).
pub const MAX_SERIAL: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecError<'a> {
    NoName,
    BadName(&'a str),
    BadMem(&'a str),
    BadPv(&'a str),
    MemTooSmall(u64),
    /// `mem` (bytes) is below [`min_mem_for`] `cpus`.
    MemTooSmallForCpus {
        mem: u64,
        cpus: u32,
    },
    BadTimeout(&'a str),
    BadCpus(&'a str),
    BadApic(&'a str),
    BadExpect(&'a str),
    BadExpectStatus(&'a str),
    BadFloor(&'a str),
    BadPmu(&'a str),
    BadVirtio(&'a str),
    BadNet(&'a str),
    /// A word on a `:disk` line that is not `ro` or `serial=S`.
    BadDiskWord(&'a str),
}

impl fmt::Display for SpecError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecError::NoName => f.write_str("module command line names no VM (expected: <name> [mem=SIZE] ...)"),
            SpecError::BadName(n) => write!(f, "bad VM name '{n}' (1-{MAX_NAME} characters of A-Z a-z 0-9 _ -)"),
            SpecError::BadMem(v) => write!(f, "bad value '{v}' for key 'mem' (expected a size such as 64M)"),
            SpecError::MemTooSmall(m) => write!(f, "mem={m} is below the minimum of 4M"),
            SpecError::BadTimeout(v) => write!(f, "bad value '{v}' for key 'timeout' (expected 1-86400 seconds)"),
            SpecError::BadApic(v) => write!(f, "bad value '{v}' for key 'apic' (expected on or off)"),
            SpecError::BadFloor(v) => write!(f, "bad value '{v}' for key 'floor' (expected on or off)"),
            SpecError::BadPmu(v) => write!(f, "bad value '{v}' for key 'pmu' (expected on or off)"),
            SpecError::BadVirtio(v) => write!(f, "bad value '{v}' for key 'virtio' (expected console or off)"),
            SpecError::BadNet(v) => write!(f, "bad value '{v}' for key 'net' (expected a switch name: 1-{MAX_NAME} characters of A-Z a-z 0-9 _ -)"),
            SpecError::BadDiskWord(w) => write!(
                f,
                "bad word '{w}' on a disk line (expected <vm>:disk [ro] [serial=S], S 1-{MAX_SERIAL} printable characters)"
            ),
            SpecError::BadPv(v) => write!(f, "bad value '{v}' for key 'pv' (expected kvm or off)"),
            SpecError::BadExpect(v) => {
                write!(f, "bad value '{v}' for key 'expect' (expected one of: {})", EXPECTABLE.join(" "))
            }
            SpecError::BadExpectStatus(v) => {
                write!(f, "bad value '{v}' for key 'expect' (expected exited:STATUS, a number such as 1 or 0x21)")
            }
            SpecError::BadCpus(v) => write!(f, "bad value '{v}' for key 'cpus' (expected 1-{MAX_VCPUS})"),
            SpecError::MemTooSmallForCpus { mem, cpus } => write!(
                f,
                "mem={} is too small for cpus={cpus} (at least {}: 4M + 2M per vCPU beyond the first)",
                Size(*mem),
                Size(min_mem_for(*cpus))
            ),
        }
    }
}

/// A size in bytes as the VM line writes it: `64M` when a whole number of MiB, else bytes.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 && self.0.is_multiple_of(1 << 20) {
            write!(f, "{}M", self.0 >> 20)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// If the module line is `<name>:module [command line]`, a module for multiboot kernel VM
/// `<name>`: the VM's name and the module's own command line (the rest of the line).
pub fn module_of(cmdline: &str) -> Option<(&str, &str)> {
    let line = cmdline.trim_start();
    let (first, rest) = line.split_once(|c: char| c.is_ascii_whitespace()).unwrap_or((line, ""));
    first.strip_suffix(":module").map(|vm| (vm, rest.trim()))
}

/// Whether the module line belongs to a VM rather than describing one (`:initrd`,
/// `:module`, `:disk`).
pub fn is_attachment(cmdline: &str) -> bool {
    initrd_of(cmdline).is_some() || module_of(cmdline).is_some() || disk_of(cmdline).is_some()
}

/// If the module line is `<name>:disk [ro] [serial=S]`: the VM it belongs to, and the disk
/// or why its options are wrong.
pub fn disk_of(cmdline: &str) -> Option<(&str, Result<DiskSpec<'_>, SpecError<'_>>)> {
    let mut words = cmdline.split_ascii_whitespace();
    let vm = words.next()?.strip_suffix(":disk")?;
    let mut disk = DiskSpec { vm, read_only: false, serial: vm };
    for w in words {
        match w.strip_prefix("serial=") {
            _ if w == "ro" => disk.read_only = true,
            Some(s) if (1..=MAX_SERIAL).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic()) => {
                disk.serial = s
            }
            _ => return Some((vm, Err(SpecError::BadDiskWord(w)))),
        }
    }
    Some((vm, Ok(disk)))
}

/// Whether `name` is a valid VM or switch name.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// If the module line is `<name>:initrd`, the VM it belongs to.
pub fn initrd_of(cmdline: &str) -> Option<&str> {
    let mut words = cmdline.split_ascii_whitespace();
    let first = words.next()?;
    first.strip_suffix(":initrd").filter(|_| words.next().is_none())
}

pub fn parse(cmdline: &str) -> Result<VmSpec<'_>, SpecError<'_>> {
    let (options, kernel_cmdline) = match cmdline.split_once(" -- ") {
        Some((o, k)) => (o, k.trim()),
        None => (cmdline.strip_suffix(" --").unwrap_or(cmdline), ""),
    };
    let mut words = options.split_ascii_whitespace();
    let name = words.next().ok_or(SpecError::NoName)?;
    if !valid_name(name) {
        return Err(SpecError::BadName(name));
    }
    let mut mem = DEFAULT_MEM;
    let mut timeout_s = 0;
    let mut cpus = 1;
    let mut apic = true;
    let mut expect = None;
    let mut expect_status = None;
    let mut pv = None;
    let mut floor = false;
    let mut pmu = None;
    let mut virtio_console = false;
    let mut net = None;
    for w in words {
        if let Some(v) = w.strip_prefix("virtio=") {
            virtio_console = match v {
                "console" => true,
                "off" => false,
                _ => return Err(SpecError::BadVirtio(v)),
            };
        }
        if let Some(v) = w.strip_prefix("net=") {
            net = Some(v).filter(|v| valid_name(v)).map(Some).ok_or(SpecError::BadNet(v))?;
        }
        if let Some(v) = w.strip_prefix("pmu=") {
            pmu = Some(match v {
                "on" => true,
                "off" => false,
                _ => return Err(SpecError::BadPmu(v)),
            });
        }
        if let Some(v) = w.strip_prefix("floor=") {
            floor = match v {
                "on" => true,
                "off" => false,
                _ => return Err(SpecError::BadFloor(v)),
            };
        }
        if let Some(v) = w.strip_prefix("pv=") {
            pv = Some(crate::pv::PvMode::parse(v).ok_or(SpecError::BadPv(v))?);
        }
        if let Some(v) = w.strip_prefix("expect=") {
            let (name, status) = match v.split_once(':') {
                Some(("exited", n)) => {
                    let parsed = match n.strip_prefix("0x") {
                        Some(hex) => u64::from_str_radix(hex, 16).ok(),
                        None => n.parse().ok(),
                    };
                    ("exited", Some(parsed.ok_or(SpecError::BadExpectStatus(v))?))
                }
                Some(_) => return Err(SpecError::BadExpectStatus(v)),
                None => (v, None),
            };
            expect = Some(EXPECTABLE.iter().copied().find(|e| *e == name).ok_or(SpecError::BadExpect(v))?);
            expect_status = status;
        }
        if let Some(v) = w.strip_prefix("apic=") {
            apic = match v {
                "on" => true,
                "off" => false,
                _ => return Err(SpecError::BadApic(v)),
            };
        }
        if let Some(v) = w.strip_prefix("cpus=") {
            cpus = Some(v)
                .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse().ok())
                .filter(|c| (1..=MAX_VCPUS).contains(c))
                .ok_or(SpecError::BadCpus(v))?;
        }
        if let Some(v) = w.strip_prefix("timeout=") {
            timeout_s = v.parse().ok().filter(|t| (1..=86_400).contains(t)).ok_or(SpecError::BadTimeout(v))?;
        }
        if let Some(v) = w.strip_prefix("mem=") {
            mem = parse_size(v).ok_or(SpecError::BadMem(v))?;
            if mem < MIN_MEM {
                return Err(SpecError::MemTooSmall(mem));
            }
        }
    }
    if mem < min_mem_for(cpus) {
        return Err(SpecError::MemTooSmallForCpus { mem, cpus });
    }
    Ok(VmSpec {
        name,
        mem,
        timeout_s,
        cpus,
        kernel_cmdline,
        apic,
        expect,
        expect_status,
        pv,
        floor,
        pmu,
        virtio_console,
        net,
        args: cmdline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            parse("selftest").unwrap(),
            VmSpec {
                name: "selftest",
                mem: DEFAULT_MEM,
                timeout_s: 0,
                cpus: 1,
                kernel_cmdline: "",
                apic: true,
                expect: None,
                expect_status: None,
                pv: None,
                floor: false,
                pmu: None,
                virtio_console: false,
                net: None,
                args: "selftest"
            }
        );
        assert!(parse("s virtio=console").unwrap().virtio_console);
        assert!(!parse("s virtio=off").unwrap().virtio_console);
        assert_eq!(
            parse("s virtio=net").unwrap_err().to_string(),
            "bad value 'net' for key 'virtio' (expected console or off)"
        );
        assert_eq!(parse("a net=sw0").unwrap().net, Some("sw0"));
        assert_eq!(parse("a net=").unwrap_err(), SpecError::BadNet(""));
        assert_eq!(parse("a net=s/w"), Err(SpecError::BadNet("s/w")));
        assert_eq!(disk_of("deb:disk"), Some(("deb", Ok(DiskSpec { vm: "deb", read_only: false, serial: "deb" }))));
        assert_eq!(
            disk_of("deb:disk ro serial=root-1"),
            Some(("deb", Ok(DiskSpec { vm: "deb", read_only: true, serial: "root-1" })))
        );
        assert_eq!(disk_of("deb:disk rw"), Some(("deb", Err(SpecError::BadDiskWord("rw")))));
        assert_eq!(
            disk_of("deb:disk serial=123456789012345678901"),
            Some(("deb", Err(SpecError::BadDiskWord("serial=123456789012345678901"))))
        );
        assert_eq!(disk_of("deb ro"), None);
        assert!(is_attachment("deb:disk ro") && is_attachment("deb:disk junk"));
        assert_eq!(parse("s pmu=on").unwrap().pmu, Some(true));
        assert_eq!(parse("s pmu=off").unwrap().pmu, Some(false));
        assert_eq!(parse("s pmu=yes"), Err(SpecError::BadPmu("yes")));
        assert_eq!(parse("s pmu=1").unwrap_err().to_string(), "bad value '1' for key 'pmu' (expected on or off)");
        assert!(parse("s floor=on bench=5").unwrap().floor);
        assert!(!parse("s floor=off").unwrap().floor);
        assert_eq!(parse("s floor=1"), Err(SpecError::BadFloor("1")));
        let linux = parse("deb mem=256M cpus=1 -- console=ttyS0 quiet mem=1G").unwrap();
        assert_eq!((linux.name, linux.mem, linux.kernel_cmdline), ("deb", 256 << 20, "console=ttyS0 quiet mem=1G"));
        assert_eq!(parse("deb cpus=4").unwrap().cpus, 4);
        assert_eq!(initrd_of("deb:initrd"), Some("deb"));
        assert_eq!(initrd_of("deb:initrd extra"), None);
        assert_eq!(initrd_of("deb"), None);
        assert_eq!(module_of("mb:module"), Some(("mb", "")));
        assert_eq!(module_of("mb:module  /boot/m1 x=1 "), Some(("mb", "/boot/m1 x=1")));
        assert_eq!(module_of("mb"), None);
        assert_eq!(module_of("mb:initrd"), None);
        assert!(is_attachment("mb:module a") && is_attachment("deb:initrd") && !is_attachment("deb mem=4M"));
        assert_eq!(parse("s timeout=5").unwrap().timeout_s, 5);
        assert_eq!(parse("s timeout=0"), Err(SpecError::BadTimeout("0")));
        assert_eq!(parse("s timeout=x"), Err(SpecError::BadTimeout("x")));
        assert_eq!(parse("t2 mem=32M bench=10").unwrap().mem, 32 << 20);
        assert_eq!(parse(""), Err(SpecError::NoName));
        assert_eq!(parse("bad/name"), Err(SpecError::BadName("bad/name")));
        assert_eq!(parse("x mem=lots"), Err(SpecError::BadMem("lots")));
        assert_eq!(parse("x mem=1M"), Err(SpecError::MemTooSmall(1 << 20)));
        assert!(parse(&"n".repeat(33)).is_err());
        assert_eq!(parse("c expect=triple-fault").unwrap().expect, Some("triple-fault"));
        assert_eq!(parse("c expect=crash"), Err(SpecError::BadExpect("crash")));
        let mb = parse("c expect=exited:1").unwrap();
        assert_eq!((mb.expect, mb.expect_status), (Some("exited"), Some(1)));
        assert_eq!(parse("c expect=exited:0x21").unwrap().expect_status, Some(0x21));
        assert_eq!(parse("c expect=exited").unwrap().expect_status, None);
        assert_eq!(parse("c expect=exited:x"), Err(SpecError::BadExpectStatus("exited:x")));
        assert_eq!(parse("c expect=halted:1"), Err(SpecError::BadExpectStatus("halted:1")));
        assert_eq!(parse("c pv=off").unwrap().pv, Some(crate::pv::PvMode::Off));
        assert_eq!(parse("c pv=kvm").unwrap().pv, Some(crate::pv::PvMode::Kvm));
        assert_eq!(parse("c").unwrap().pv, None);
        assert_eq!(parse("c pv=xen"), Err(SpecError::BadPv("xen")));
        assert_eq!(parse("c pv=xen").unwrap_err().to_string(), "bad value 'xen' for key 'pv' (expected kvm or off)");
    }

    #[test]
    fn cpus() {
        for n in 1..=MAX_VCPUS {
            assert_eq!(parse(&format!("v cpus={n}")).unwrap().cpus, n);
        }
        for bad in ["0", "17", "4294967296", "-1", "two", "", "1.5", "+2"] {
            let line = format!("v cpus={bad}");
            let err = parse(&line).unwrap_err();
            assert_eq!(err, SpecError::BadCpus(bad));
            assert_eq!(err.to_string(), format!("bad value '{bad}' for key 'cpus' (expected 1-16)"));
        }
        assert_eq!(parse("v").unwrap().cpus, 1, "default");
        // The memory has to hold the vCPUs, whichever comes first on the line.
        assert_eq!(min_mem_for(1), 4 << 20);
        assert_eq!(min_mem_for(16), 34 << 20);
        assert_eq!(parse("v mem=4M").unwrap().mem, 4 << 20);
        assert_eq!(parse("v mem=34M cpus=16").unwrap().cpus, 16);
        let err = parse("v cpus=16 mem=33M").unwrap_err();
        assert_eq!(err, SpecError::MemTooSmallForCpus { mem: 33 << 20, cpus: 16 });
        assert_eq!(
            err.to_string(),
            "mem=33M is too small for cpus=16 (at least 34M: 4M + 2M per vCPU beyond the first)"
        );
        let err = parse("v mem=5000K cpus=2").unwrap_err();
        assert!(err.to_string().starts_with("mem=5120000 is too small for cpus=2 (at least 6M"), "{err}");
        assert!(parse("v cpus=16").is_ok(), "the 64M default holds 16 vCPUs");
        assert_eq!(parse("v mem=1M cpus=2"), Err(SpecError::MemTooSmall(1 << 20)));
    }
}
