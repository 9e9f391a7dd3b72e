//! Building VMs and vCPU backends on the virtualization hardware: the only place that names
//! both backends. Everything after construction runs through the shared `Vcpu::run`.

use core::{fmt, sync::atomic::AtomicBool};

use alloc::vec::Vec;

use super::{
    backend::BackendError,
    guest_mem::{GuestMemError, GuestMemory, NestedFormat},
    regs::GuestRegs,
    spec::VmSpec,
    state::{CpuState, DescriptorTable},
    vcpu::{SliceEnd, Vcpu},
    vm::{rdtsc, Vm},
};
use crate::{
    arch::cpu::{SvmCaps, Virtualization, VmxCaps},
    console::Bytes,
    devices::{
        bus::Bus,
        irqchip::{Interrupts, KickFn},
        lapic::DEFAULT_TIMER_HZ,
        pc,
        virtio::blk::DiskRef,
    },
    guest::{
        acpi, boot64,
        elf::{self, ElfError},
        linux::{self, LinuxError, LinuxLayout},
        multiboot1::{self, BootModule, Mb1Error},
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
    Multiboot(Mb1Error),
    /// A 32-bit ELF without a multiboot header: nothing says how to start it.
    NoMultibootHeader,
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
                f.write_str("module is not a guest image Vireo can load (expected a Linux bzImage, a multiboot kernel or an x86-64 ELF)")
            }
            LaunchError::Multiboot(e) => write!(f, "multiboot kernel: {e}"),
            LaunchError::NoMultibootHeader => f.write_str(
                "32-bit ELF without a multiboot header (magic 0x1badb002, 4-byte aligned, in the first 8192 bytes)",
            ),
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

/// The modules a VM is built from: its image, a Linux kernel's initramfs (`<name>:initrd`),
/// a multiboot kernel's modules (`<name>:module` lines), its disk (`<name>:disk`), which
/// every boot of the VM shares.
#[derive(Clone, Copy, Debug)]
pub struct GuestFiles<'a> {
    pub image: &'a [u8],
    pub initrd: Option<&'a [u8]>,
    pub modules: &'a [BootModule<'a>],
    pub disk: Option<DiskRef>,
}

/// What kind of guest a module holds.
enum Kind<'a> {
    Linux(linux::BzImage<'a>),
    /// A multiboot (v1) kernel: the PC platform, QEMU's test devices, 32-bit entry.
    Multiboot,
    /// A static x86-64 ELF (Vireo's test guests): 64-bit entry, no PC platform.
    TestElf,
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
    files: GuestFiles<'_>,
    kick: KickFn,
    boot_number: u32,
) -> Result<Vm, LaunchError> {
    let GuestFiles { image, initrd, modules, disk } = files;
    // A Linux kernel is recognised by its setup header, a multiboot kernel by its header's
    // magic; anything that claims to be one and fails validation is reported as a bad
    // kernel of that kind, not as an unknown file.
    let kind = if image.get(0x202..0x206) == Some(b"HdrS") {
        Kind::Linux(linux::parse(image).map_err(LaunchError::Kernel)?)
    } else if multiboot1::has_magic(image) {
        Kind::Multiboot
    } else if image.get(..5) == Some(b"\x7fELF\x01") {
        return Err(LaunchError::NoMultibootHeader);
    } else if elf::is_elf(image) {
        Kind::TestElf
    } else {
        return Err(LaunchError::NotAnImage);
    };
    if !matches!(kind, Kind::Linux(_)) && initrd.is_some() {
        log::warn!("vm {}: an initrd is given but the guest is not a Linux kernel; ignored", spec.name);
    }
    if !matches!(kind, Kind::Multiboot) && !modules.is_empty() {
        log::warn!("vm {}: modules are given but the guest is not a multiboot kernel; ignored", spec.name);
    }
    let format = match hw {
        Hardware::Svm(_) => NestedFormat::Npt,
        Hardware::Vmx(_) => NestedFormat::Ept,
    };
    let mut mem = GuestMemory::new(frames, spec.mem, format).map_err(LaunchError::Memory)?;
    let size = mem.size();
    let prepared = (|| match &kind {
        Kind::Linux(kernel) => {
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
            // ACPI tables in the BIOS area, reported to Linux through the zero page. The PCI
            // root bridge's MMIO window lies above RAM, where nothing is mapped.
            let mut tables = alloc::vec![0u8; acpi::MAX_LEN];
            let config = acpi::AcpiConfig::pc_with_pci(spec.cpus, size);
            let (rsdp, used) = acpi::build(&config, ACPI_GPA, &mut tables).map_err(LaunchError::Acpi)?;
            mem.write(ACPI_GPA, &tables[..used]).map_err(LaunchError::Memory)?;
            let reserved = [linux::ReservedRange::acpi(ACPI_GPA, ACPI_GPA + used as u64)];
            let layout = LinuxLayout { ram: size, cmdline, initrd, rsdp: Some(rsdp), reserved: &reserved };
            let loaded = linux::load(kernel, &mut mem, &layout).map_err(LaunchError::Kernel)?;
            let mut state = boot;
            state.rip = loaded.entry;
            Ok((loaded.entry, state, GuestRegs { rsi: loaded.boot_params, ..GuestRegs::default() }))
        }
        Kind::Multiboot => {
            // The command line: the VM's name in the place of the kernel's path (as GRUB and
            // QEMU pass "path arguments"), then the text after ` -- `.
            let cmdline = if spec.kernel_cmdline.is_empty() {
                alloc::string::String::from(spec.name)
            } else {
                alloc::format!("{} {}", spec.name, spec.kernel_cmdline)
            };
            let plan = multiboot1::plan(image, size, &cmdline, modules)
                .map_err(LaunchError::Multiboot)?
                .ok_or(LaunchError::NotAnImage)?;
            // The ACPI tables in the BIOS area (the plan keeps it free), found by the RSDP scan.
            let mut tables = alloc::vec![0u8; acpi::MAX_LEN];
            let config = acpi::AcpiConfig::pc_with_pci(spec.cpus, size);
            let (_rsdp, used) = acpi::build(&config, ACPI_GPA, &mut tables).map_err(LaunchError::Acpi)?;
            mem.write(ACPI_GPA, &tables[..used]).map_err(LaunchError::Memory)?;
            multiboot1::write(&plan, &mem).map_err(LaunchError::Memory)?;
            let gdt = DescriptorTable { base: plan.gdt.0, limit: plan.gdt.1 };
            let state = CpuState::protected_mode_flat(plan.entry as u64, plan.stack_top, gdt);
            let regs = GuestRegs { rax: multiboot1::BOOT_MAGIC as u64, rbx: plan.info_gpa, ..GuestRegs::default() };
            log::info!(
                "vm {}: multiboot kernel header_offset={:#x} flags={:#x} info={:#x} modules={}",
                spec.name,
                plan.header_offset,
                plan.header.flags,
                plan.info_gpa,
                plan.modules.len()
            );
            Ok((plan.entry as u64, state, regs))
        }
        Kind::TestElf => {
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
            Ok((entry, state, GuestRegs { rdi: size, rsi: ARGS_GPA, ..GuestRegs::default() }))
        }
    })();
    let (entry, state, regs) = match prepared {
        Ok(p) => p,
        Err(e) => {
            mem.release(frames);
            return Err(e);
        }
    };
    let linux = matches!(kind, Kind::Linux(_));
    let multiboot = matches!(kind, Kind::Multiboot);
    // Linux and multiboot kernels get the PC platform; test ELFs talk to Vireo directly.
    let platform = linux || multiboot;
    let cpus = spec.cpus.max(1) as usize;
    let irq = Interrupts::new(cpus, platform && spec.apic, DEFAULT_TIMER_HZ, kick);
    let mut bus = Bus::new();
    let consoles = if platform {
        // BARs decode in the root bridge's 32-bit window, the one the DSDT gives the guest.
        let mmio32 = acpi::pci_mmio32_window(size).map(|w| (u64::from(w.base), u64::from(w.last)));
        let pci_options =
            pc::PciOptions { mmio32, virtio_console: spec.virtio_console, virtio_blk: disk, net: spec.net };
        let built = pc::build(&mut bus, &irq, spec.name, RTC_EPOCH, pci_options).and_then(|consoles| {
            if multiboot {
                // QEMU's test devices, which kernels written for `qemu -kernel` use.
                pc::add_qemu_test_devices(&mut bus, &irq, size, cpus as u16, spec.kernel_cmdline, spec.name)?;
            }
            Ok(consoles)
        });
        match built {
            Ok(consoles) => Some(consoles),
            Err(e) => {
                log::warn!("vm {}: {e}", spec.name);
                // Devices before the RAM they may hold addresses of (`Vm::into_memory`).
                drop(bus);
                mem.release(frames);
                return Err(LaunchError::Devices);
            }
        }
    } else {
        if let Some(sw) = spec.net {
            log::warn!("vm {}: net={sw} ignored: only Linux and multiboot VMs have a PCI bus", spec.name);
        }
        None
    };
    let intel = matches!(hw, Hardware::Vmx(_));
    let mut vcpus = Vec::with_capacity(cpus);
    for i in 0..cpus {
        // vCPU 0 starts at the entry point; the others wait for SIPI, as APs do.
        let Some(mut v) = Vcpu::new(i, (i == 0).then_some(state), intel) else {
            drop(bus);
            mem.release(frames);
            return Err(LaunchError::OutOfHeap);
        };
        if i == 0 {
            v.regs = regs;
        }
        vcpus.push(v);
    }
    let mut vm = Vm::new(spec.name, mem, bus, irq, vcpus, platform, !intel);
    if let Some(c) = consoles {
        vm.uart = Some(c.uart);
        vm.virtio_input = c.virtio_input;
    }
    vm.expect = spec.expect;
    vm.expect_status = spec.expect_status;
    vm.floor = spec.floor;
    vm.disk = if platform { disk } else { None };
    if spec.floor {
        log::info!("vm {}: floor=on: the backend answers PING hypercalls itself (measuring mode)", spec.name);
    }
    // The virtual PMU: on for Linux VMs unless the line says otherwise.
    vm.pmu = spec.pmu.unwrap_or(linux);
    // The hardware path where the host has a working PMU (`crate::pmu::hw`; emulators have
    // none) and the backend can make its counters count guest mode only (VMX: the "load
    // IA32_PERF_GLOBAL_CTRL" controls; SVM: always, by GuestOnly). Otherwise the software
    // counters.
    let vendor = if intel { crate::pmu::Vendor::Intel } else { crate::pmu::Vendor::Amd };
    let pmu_hw = vm.pmu
        && crate::pmu::hw::detect(vendor).is_some()
        && match &hw {
            Hardware::Vmx(caps) => caps.perf_global_ctrl,
            Hardware::Svm(_) => true,
        };
    for v in &vm.vcpus {
        let mut v = v.lock();
        v.set_pmu(vm.pmu);
        if pmu_hw {
            v.set_pmu_hardware();
        }
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
        "vm name={} start backend={} mem={} cpus={} pv={} pmu={} pmu_counters={} entry={:#x} host_ram={:#x}-{:#x} tsc={}",
        spec.name,
        hw.name(),
        Bytes(size),
        cpus,
        vm.pv.mode.name(),
        if vm.pmu { "on" } else { "off" },
        match (vm.pmu, pmu_hw) {
            (false, _) => "none",
            (true, false) => "software",
            (true, true) => "hardware",
        },
        entry,
        vm.mem.host_range().start,
        vm.mem.host_range().end,
        rdtsc()
    );
    if let Some(DiskRef(d)) = vm.disk {
        let d = d.lock();
        report!(
            "vm name={} virtio-blk slot=00:{:02x}.0 sectors={} size={} ro={} serial={}",
            spec.name,
            pc::VIRTIO_BLK_SLOT,
            d.capacity(),
            Bytes(d.capacity() * crate::devices::virtio::blk::SECTOR_SIZE),
            u8::from(d.read_only()),
            d.serial()
        );
    } else if disk.is_some() {
        log::warn!("vm {}: a disk is given but the guest has no PCI bus (not Linux or multiboot); ignored", spec.name);
    }
    Ok(vm)
}
