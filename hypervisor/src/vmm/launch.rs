//! Building VMs and vCPU backends on the virtualization hardware: the only place that names
//! both backends. Everything after construction runs through the shared `Vcpu::run`.

use core::{fmt, sync::atomic::AtomicBool};

use alloc::vec::Vec;

use super::{
    backend::BackendError,
    guest_mem::{GuestMemError, GuestMemory, NestedFormat},
    spec::VmSpec,
    vcpu::{SliceEnd, Vcpu},
    vm::Vm,
};
use crate::{
    arch::cpu::{SvmCaps, Virtualization, VmxCaps},
    console::Bytes,
    devices::{
        bus::Bus,
        irqchip::{Interrupts, KickFn},
        lapic::DEFAULT_TIMER_HZ,
        pc,
    },
    guest::{
        acpi, boot64,
        elf::{self, ElfError},
        linux::{self, LinuxError, LinuxLayout},
    },
    mm::FrameAllocator,
    pv::{PvMode, VmPv},
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
    Devices,
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
            LaunchError::Devices => f.write_str("the VM's devices overlap (a bug in Vireo)"),
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

/// Tags for ASIDs (SVM) and VPIDs (VMX): 0 belongs to the host. One counter for all host
/// CPUs: a tag is unique per vCPU until the counter wraps.
static NEXT_TAG: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(1);

fn next_tag(limit: u32) -> u32 {
    let limit = limit.max(2);
    let n = NEXT_TAG.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    1 + n.wrapping_sub(1) % (limit - 1)
}

/// A vCPU's hardware half on this CPU's virtualization hardware.
pub enum AnyBackend {
    Svm(svm::SvmVcpu),
    Vmx(vmx::VmxVcpu),
}

impl AnyBackend {
    /// Builds the backend for a vCPU of a VM whose nested tables are at `root`, on this
    /// host CPU (VMX: the VMCS becomes active here; it stays on this CPU).
    pub fn new(hw: &Hardware, frames: &mut FrameAllocator, root: u64) -> Result<Self, BackendError> {
        match hw {
            Hardware::Svm(caps) => svm::SvmVcpu::new(frames, root, next_tag(caps.asids), caps).map(AnyBackend::Svm),
            Hardware::Vmx(caps) => vmx::VmxVcpu::new(frames, root, next_tag(0xFFFF) as u16, caps).map(AnyBackend::Vmx),
        }
    }

    /// Runs `vcpu` of `vm` for a slice ending at TSC `slice_end`.
    pub fn run(&mut self, vcpu: &mut Vcpu, vm: &Vm, slice_end: u64, yield_now: &AtomicBool) -> SliceEnd {
        match self {
            AnyBackend::Svm(b) => vcpu.run(vm, b, slice_end, yield_now),
            AnyBackend::Vmx(b) => vcpu.run(vm, b, slice_end, yield_now),
        }
    }

    pub fn release(self, frames: &mut FrameAllocator) {
        match self {
            AnyBackend::Svm(b) => b.release(frames),
            AnyBackend::Vmx(b) => b.release(frames),
        }
    }
}

/// Builds the VM for `spec` from `image` (its memory, devices and vCPUs), ready to run.
///
/// `boot_number` counts the VM's boots (1 = first; a guest reset starts the next): a Linux
/// guest sees it from the second boot on as `vireo_boot=N` at the end of its kernel command line,
/// an ELF test guest at the end of its VM line.
pub fn build_vm(
    hw: &Hardware,
    frames: &mut FrameAllocator,
    spec: &VmSpec<'_>,
    image: &[u8],
    initrd: Option<&[u8]>,
    kick: KickFn,
    boot_number: u32,
) -> Result<Vm, LaunchError> {
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
            let boot = boot64::setup(&mem, 0).map_err(LaunchError::Memory)?;
            let base = if spec.kernel_cmdline.is_empty() { DEFAULT_LINUX_CMDLINE } else { spec.kernel_cmdline };
            let with_boot;
            let cmdline = if boot_number > 1 {
                with_boot = alloc::format!("{base} vireo_boot={boot_number}");
                with_boot.as_str()
            } else {
                base
            };
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
            let entry = elf::load(image, &mem, boot64::RESERVED_END).map_err(LaunchError::Image)?;
            let state = boot64::setup(&mem, entry).map_err(LaunchError::Memory)?;
            // The VM line, then ` vireo_boot=N` from the second boot on (VM_RESET), at most
            // 255 bytes and a NUL.
            let mut args = [0u8; 256];
            let with_boot;
            let line = if boot_number > 1 {
                with_boot = alloc::format!("{} vireo_boot={boot_number}", spec.args);
                with_boot.as_str()
            } else {
                spec.args
            };
            let n = line.len().min(255);
            args[..n].copy_from_slice(&line.as_bytes()[..n]);
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
    let linux = kernel.is_some();
    let cpus = spec.cpus.max(1) as usize;
    let irq = Interrupts::new(cpus, linux && spec.apic, DEFAULT_TIMER_HZ, kick);
    let mut bus = Bus::new();
    let uart = if linux {
        match pc::build(&mut bus, &irq, spec.name, RTC_EPOCH) {
            Ok(uart) => Some(uart),
            Err(e) => {
                log::warn!("vm {}: {e}", spec.name);
                mem.release(frames);
                return Err(LaunchError::Devices);
            }
        }
    } else {
        None
    };
    let intel = matches!(hw, Hardware::Vmx(_));
    let mut vcpus = Vec::with_capacity(cpus);
    for i in 0..cpus {
        // vCPU 0 starts at the entry point; the others wait for SIPI, as APs do.
        let Some(mut v) = Vcpu::new(i, (i == 0).then_some(state), intel) else {
            mem.release(frames);
            return Err(LaunchError::OutOfHeap);
        };
        if i == 0 {
            v.regs.rdi = if linux { 0 } else { size };
            v.regs.rsi = rsi;
        }
        vcpus.push(v);
    }
    let mut vm = Vm::new(spec.name, mem, bus, irq, vcpus, linux, !intel);
    vm.uart = uart;
    vm.expect = spec.expect;
    vm.floor = spec.floor;
    if spec.floor {
        log::info!("vm {}: floor=on: the backend answers PING hypercalls itself (measuring mode)", spec.name);
    }
    let pv_default = if linux && spec.apic { PvMode::Kvm } else { PvMode::Off };
    vm.pv = VmPv {
        mode: spec.pv.unwrap_or(pv_default),
        tsc_stable: crate::arch::tsc::synchronized(),
        tsc_hz: crate::arch::tsc::hz(),
        wall_at_start_ns: RTC_EPOCH.saturating_mul(1_000_000_000),
        ..VmPv::default()
    };
    if spec.timeout_s > 0 {
        if !crate::arch::lapic::available() {
            log::warn!("vm {}: timeout={} needs the host APIC timer, which is unavailable", spec.name, spec.timeout_s);
        }
        vm.time_limit = Some(crate::arch::tsc::from_nanos(spec.timeout_s.saturating_mul(1_000_000_000)));
    }
    report!(
        "vm name={} start backend={} mem={} cpus={} pv={} entry={:#x}",
        spec.name,
        hw.name(),
        Bytes(size),
        cpus,
        vm.pv.mode.name(),
        entry
    );
    Ok(vm)
}
