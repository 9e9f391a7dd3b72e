//! Starting VMs on this CPU's virtualization hardware: the only place that names both
//! backends. Everything after construction runs through the shared `Vm::run`.

use core::fmt;

use super::{
    backend::{Backend, BackendError},
    exit::ExitKind,
    guest_mem::{GuestMemError, GuestMemory, NestedFormat},
    spec::VmSpec,
    vm::{Vm, VmOutcome},
};
use crate::{
    arch::cpu::{SvmCaps, Virtualization, VmxCaps},
    console::Bytes,
    devices::pc::PcPlatform,
    guest::{
        acpi, boot64,
        elf::{self, ElfError},
        linux::{self, LinuxError, LinuxLayout},
    },
    mm::FrameAllocator,
    report, svm, vmx,
};

/// The virtualization hardware Vireo drives on this CPU.
#[derive(Clone, Copy, Debug)]
pub enum Hardware {
    Svm(SvmCaps),
    Vmx(VmxCaps),
}

impl Hardware {
    /// Turns on SVM or VMX on this CPU; `Err` says why it cannot be used.
    pub fn enable(virt: &Virtualization, frames: &mut FrameAllocator) -> Result<Self, BackendError> {
        match virt {
            Virtualization::Svm(caps) => svm::enable(frames, caps).map(|()| Hardware::Svm(*caps)),
            Virtualization::Vmx(caps) => vmx::enable(frames, caps).map(|()| Hardware::Vmx(*caps)),
            Virtualization::None => Err(BackendError("this CPU offers neither VMX nor SVM")),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Hardware::Svm(_) => "svm",
            Hardware::Vmx(_) => "vmx",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum LaunchError {
    Memory(GuestMemError),
    Image(ElfError),
    NotAnImage,
    Kernel(LinuxError),
    Acpi(acpi::AcpiError),
    Backend(BackendError),
    OutOfHeap,
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchError::Memory(e) => write!(f, "guest memory: {e}"),
            LaunchError::Image(e) => write!(f, "guest image: {e}"),
            LaunchError::NotAnImage => {
                f.write_str("module is not a guest image Vireo can load (expected a Linux bzImage or an x86-64 ELF)")
            }
            LaunchError::Kernel(e) => write!(f, "Linux kernel: {e}"),
            LaunchError::Acpi(e) => write!(f, "ACPI tables: {e}"),
            LaunchError::Backend(e) => write!(f, "virtualization hardware: {e}"),
            LaunchError::OutOfHeap => f.write_str("out of heap for the VM's state"),
        }
    }
}

/// Guest-physical address where the guest's argument string is placed (inside the area
/// boot64 reserves).
const ARGS_GPA: u64 = 0x8000;

/// Where a Linux VM's ACPI tables live (the BIOS area, reserved in its e820 map).
const ACPI_GPA: u64 = 0xE_0000;

/// A Linux guest's kernel command line when its module line gives none.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1";

/// Wall-clock time a VM's RTC starts at (2026-01-01T00:00:00Z) until Vireo reads the host's.
const RTC_EPOCH: u64 = 1_767_225_600;

/// Tags for ASIDs (SVM) and VPIDs (VMX): 0 belongs to the host.
pub struct TagAllocator(u32);

impl Default for TagAllocator {
    fn default() -> Self {
        Self(1)
    }
}

impl TagAllocator {
    fn next(&mut self, limit: u32) -> u32 {
        let tag = self.0;
        self.0 = if self.0 + 1 >= limit { 1 } else { self.0 + 1 };
        tag
    }
}

/// Builds the VM for `spec` from `image`, runs it to its end, reports, and frees it.
pub fn run_guest(
    hw: &Hardware,
    frames: &mut FrameAllocator,
    tags: &mut TagAllocator,
    spec: &VmSpec<'_>,
    image: &[u8],
    initrd: Option<&[u8]>,
) -> Result<VmOutcome, LaunchError> {
    // A Linux kernel is recognised by its setup header; anything that claims to be one and
    // fails validation is reported as a bad kernel, not as an unknown file.
    let kernel = if image.get(0x202..0x206) == Some(b"HdrS") {
        Some(linux::parse(image).map_err(LaunchError::Kernel)?)
    } else if elf::is_elf(image) {
        None
    } else {
        return Err(LaunchError::NotAnImage);
    };
    if kernel.is_none() && initrd.is_some() {
        log::warn!("vm {}: an initrd is given but the guest is not a Linux kernel; ignored", spec.name);
    }
    let format = match hw {
        Hardware::Svm(_) => NestedFormat::Npt,
        Hardware::Vmx(_) => NestedFormat::Ept,
    };
    let mut mem = GuestMemory::new(frames, spec.mem, format).map_err(LaunchError::Memory)?;
    let size = mem.size();
    let prepared = (|| match &kernel {
        Some(kernel) => {
            // boot64's identity map and GDT are what the 64-bit boot protocol asks for;
            // the zero page goes above them (guest/linux.rs layout).
            let boot = boot64::setup(&mut mem, 0).map_err(LaunchError::Memory)?;
            let cmdline = if spec.kernel_cmdline.is_empty() { DEFAULT_LINUX_CMDLINE } else { spec.kernel_cmdline };
            // ACPI tables in the BIOS area, reported to Linux through the zero page.
            let mut tables = alloc::vec![0u8; acpi::MAX_LEN];
            let (rsdp, used) =
                acpi::build(&acpi::AcpiConfig::pc(spec.cpus), ACPI_GPA, &mut tables).map_err(LaunchError::Acpi)?;
            mem.write(ACPI_GPA, &tables[..used]).map_err(LaunchError::Memory)?;
            let reserved = [linux::ReservedRange::acpi(ACPI_GPA, ACPI_GPA + used as u64)];
            let layout = LinuxLayout { ram: size, cmdline, initrd, rsdp: Some(rsdp), reserved: &reserved };
            let loaded = linux::load(kernel, &mut mem, &layout).map_err(LaunchError::Kernel)?;
            let mut state = boot;
            state.rip = loaded.entry;
            Ok((loaded.entry, state, loaded.boot_params))
        }
        None => {
            let entry = elf::load(image, &mut mem, boot64::RESERVED_END).map_err(LaunchError::Image)?;
            let state = boot64::setup(&mut mem, entry).map_err(LaunchError::Memory)?;
            let mut args = [0u8; 256];
            let n = spec.args.len().min(255);
            args[..n].copy_from_slice(&spec.args.as_bytes()[..n]);
            mem.write(ARGS_GPA, &args).map_err(LaunchError::Memory)?;
            Ok((entry, state, ARGS_GPA))
        }
    })();
    let (entry, state, rsi) = match prepared {
        Ok(p) => p,
        Err(e) => {
            mem.release(frames);
            return Err(e);
        }
    };
    let root = mem.nested_root();
    let Some(mut vm) = Vm::new(spec.name, mem, matches!(hw, Hardware::Svm(_))) else {
        return Err(LaunchError::OutOfHeap);
    };
    vm.regs.rdi = size;
    vm.regs.rsi = rsi;
    if kernel.is_some() {
        vm.platform = Some(PcPlatform::new(RTC_EPOCH, spec.apic));
        vm.regs.rdi = 0;
    }
    if spec.timeout_s > 0 {
        if !crate::arch::lapic::available() {
            log::warn!("vm {}: timeout={} needs the host APIC timer, which is unavailable", spec.name, spec.timeout_s);
        }
        let ticks = crate::arch::tsc::from_nanos(spec.timeout_s.saturating_mul(1_000_000_000));
        vm.deadline = Some(crate::arch::tsc::rdtsc().saturating_add(ticks));
    }
    report!("vm name={} start backend={} mem={} entry={:#x}", spec.name, hw.name(), Bytes(size), entry);
    let outcome = match hw {
        Hardware::Svm(caps) => {
            let asid = tags.next(caps.asids.max(2));
            match svm::SvmVcpu::new(frames, root, asid, caps) {
                Ok(mut cpu) => {
                    let o = start(&mut vm, &mut cpu, &state);
                    cpu.release(frames);
                    Ok(o)
                }
                Err(e) => Err(LaunchError::Backend(e)),
            }
        }
        Hardware::Vmx(caps) => {
            let vpid = tags.next(0xFFFF) as u16;
            match vmx::VmxVcpu::new(frames, root, vpid, caps) {
                Ok(mut cpu) => {
                    let o = start(&mut vm, &mut cpu, &state);
                    cpu.release(frames);
                    Ok(o)
                }
                Err(e) => Err(LaunchError::Backend(e)),
            }
        }
    };
    if let Ok(o) = &outcome {
        report_end(&vm, o);
    }
    vm.mem.release(frames);
    outcome
}

fn start<B: Backend>(vm: &mut Vm, cpu: &mut B, state: &super::state::CpuState) -> VmOutcome {
    cpu.load_state(state);
    vm.regs.rsp = state.rsp;
    vm.run(cpu)
}

/// The end-of-VM report: outcome, exit table, and for crashes the exits that led there.
fn report_end(vm: &Vm, outcome: &VmOutcome) {
    let name = &vm.name;
    let total = vm.stats.total();
    match outcome {
        VmOutcome::Exited { status } => {
            report!("vm name={name} end outcome=exited status={status} exits={}", total.count)
        }
        VmOutcome::TripleFault => report!("vm name={name} end outcome=triple-fault exits={}", total.count),
        VmOutcome::Halted => report!("vm name={name} end outcome=halted exits={}", total.count),
        VmOutcome::Fatal { reason } => {
            report!("vm name={name} end outcome=fatal reason=\"{reason}\" exits={}", total.count)
        }
        VmOutcome::TimedOut => report!("vm name={name} end outcome=timed-out exits={}", total.count),
        VmOutcome::PoweredOff => report!("vm name={name} end outcome=powered-off exits={}", total.count),
        VmOutcome::Reset => report!("vm name={name} end outcome=reset exits={}", total.count),
    }
    for (class, s) in vm.stats.nonzero() {
        report!(
            "vm name={name} exit reason={class} count={} cycles={} avg_cycles={}",
            s.count,
            s.cycles,
            s.cycles / s.count
        );
    }
    if !matches!(outcome, VmOutcome::Exited { .. }) {
        // Consecutive identical exits (same kind and RIP) are folded into one line.
        let mut items: [(Option<super::exit::Exit>, u32); 8] = [(None, 0); 8];
        let mut n = 0;
        for e in vm.history() {
            match items[..n].last_mut() {
                Some((Some(prev), count)) if prev.kind == e.kind && prev.rip == e.rip => *count += 1,
                _ => {
                    items[n] = (Some(*e), 1);
                    n += 1;
                }
            }
        }
        for (i, (e, count)) in items[..n].iter().enumerate() {
            let Some(e) = e else { continue };
            if let ExitKind::Exception { vector, error_code } = e.kind {
                report!(
                    "vm name={name} last-exit n={i} exception vector={vector} error={error_code:?} rip={:#x} raw={:#x} times={count}",
                    e.rip,
                    e.raw
                );
            } else {
                report!(
                    "vm name={name} last-exit n={i} kind={:?} rip={:#x} raw={:#x} times={count}",
                    e.kind,
                    e.rip,
                    e.raw
                );
            }
        }
        let r = &vm.regs;
        report!(
            "vm name={name} regs rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rsp={:#x} rbp={:#x}",
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rsp,
            r.rbp
        );
    }
}
