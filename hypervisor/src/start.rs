//! Vireo's boot sequence, from the multiboot2 entry to "nothing left to run".

use log::{info, warn};

use crate::{
    arch::{self, cpu::CpuInfo},
    bootinfo::RegionKind,
    bootinfo::{self, cmdline},
    console::{self, Bytes},
    guest::multiboot1::BootModule,
    mm::{
        self,
        host::{ImageLayout, PagingFeatures, Segment, MAX_SEGMENTS},
        pool::TablePool,
        FrameAllocator, MapFlags, PhysRange,
    },
    platform::exit,
    report, sched,
    vmm::{
        self,
        launch::{self, Hardware},
        spec,
    },
    TEST_HOOKS, VERSION,
};

/// Most ranges the frame allocator must keep out (image, boot information, modules).
const MAX_RESERVED: usize = 2 + 2 * bootinfo::MAX_MODULES;

/// Vireo's own physical extent, from the linker script.
pub fn image_range() -> PhysRange {
    image_layout().image
}

/// Vireo's sections, from the linker script and boot/entry.S.
fn image_layout() -> ImageLayout {
    extern "C" {
        static __image_start: u8;
        static __image_end: u8;
        static __text_end: u8;
        static __rodata_end: u8;
        static boot_stack_guard: u8;
    }
    let addr = |p: *const u8| p as u64;
    ImageLayout {
        image: PhysRange::new(addr(core::ptr::addr_of!(__image_start)), addr(core::ptr::addr_of!(__image_end))),
        text_end: addr(core::ptr::addr_of!(__text_end)),
        rodata_end: addr(core::ptr::addr_of!(__rodata_end)),
        guard_page: addr(core::ptr::addr_of!(boot_stack_guard)),
    }
}

/// Entered from boot/entry.S in 64-bit mode on the boot stack, interrupts off.
pub fn kernel_main(magic: u32, mbi_addr: u32) -> ! {
    arch::mask_legacy_pic();
    console::serial::init();
    arch::percpu::init_bsp();
    #[cfg(target_os = "none")]
    arch::idt::init();
    console::logger::init(log::LevelFilter::Info);
    report!("starting version={} build={}", VERSION, if TEST_HOOKS { "test-hooks" } else { "release" });

    // SAFETY: EBX at entry is the loader's information address; the boot page tables
    // identity-map the first 4 GiB, where a 32-bit pointer lies.
    let mbi = match unsafe { bootinfo::load(magic, mbi_addr as u64) } {
        Ok(mbi) => mbi,
        Err(e) => fatal_boot_info(e),
    };
    let image = image_range();
    let mut info = match bootinfo::parse(&mbi, image) {
        Ok(info) => info,
        Err(e) => fatal_boot_info(e),
    };

    let config = cmdline::parse(info.cmdline, TEST_HOOKS, |d| report!("cmdline error=\"{d}\""));
    exit::set_method(config.exit);
    log::set_max_level(config.log);
    report!("boot loader=\"{}\" firmware={}", info.loader, info.firmware);
    report!("cmdline \"{}\"", info.cmdline);

    if config.test_mbi == Some(cmdline::TestMbi::ModuleOverlapsImage) {
        warn!("test hook: moving the first module onto Vireo's image");
        bootinfo::corrupt_first_module_for_test(&mut info, image);
    }

    for r in info.regions() {
        log::debug!("memory {:#012x}-{:#012x} {:?}", r.range.start, r.range.end, r.kind);
    }
    if info.dropped_regions > 0 {
        warn!("{} memory map entries dropped (empty, overflowing or too many)", info.dropped_regions);
    }
    for m in info.modules() {
        report!("module index={} start={:#x} size={} cmdline=\"{}\"", m.index, m.range.start, m.range.len(), m.cmdline);
    }
    for r in info.rejected() {
        // A module that was meant as a VM (or its initrd) and cannot be used: the run is
        // not a plain success.
        sched::note_refused();
        report!(
            "module index={} rejected reason=\"{}\" start={:#x} end={:#x}",
            r.index,
            r.problem,
            r.range.start,
            r.range.end
        );
    }

    let mut reserved = [PhysRange::EMPTY; MAX_RESERVED];
    let n = info.reserved(image, &mut reserved);
    match FrameAllocator::new(info.available(), &reserved[..n]) {
        Ok(frames) => mm::set_frames(frames),
        Err(e) => {
            report!("fatal frame allocator: {e}");
            exit::fail("no usable memory");
        }
    };
    let cpu = CpuInfo::detect();
    let ram = info
        .regions()
        .filter(|r| matches!(r.kind, RegionKind::Available | RegionKind::AcpiReclaimable | RegionKind::AcpiNvs))
        .map(|r| r.range);
    let tables = match init_paging(&mut mm::frames(), ram, &cpu) {
        Ok(tables) => tables,
        Err(e) => {
            report!("fatal page tables: {e}");
            exit::fail("cannot build page tables");
        }
    };
    init_heap(&mut mm::frames(), config.heap_bytes);

    report!(
        "cpu vendor={} family={:#x} model={:#x} stepping={} brand=\"{}\" nx={} pages_1g={} phys_bits={}",
        cpu.vendor_id.as_str(),
        cpu.family,
        cpu.model,
        cpu.stepping,
        cpu.brand.as_str(),
        cpu.nx as u8,
        cpu.pages_1g as u8,
        cpu.phys_addr_bits
    );
    report!("virt {}", cpu.virt);
    report!(
        "memory total={} free={} regions={} image={:#x}-{:#x} heap={}",
        Bytes(info.available_bytes()),
        Bytes(mm::frames().free_bytes()),
        info.regions().count(),
        image.start,
        image.end,
        Bytes(config.heap_bytes)
    );
    report!(
        "paging tables={} largest_page={} nx={} guard_page={:#x}",
        tables,
        if cpu.pages_1g { "1G" } else { "2M" },
        cpu.nx as u8,
        image_layout().guard_page
    );
    report!("modules accepted={} rejected={}", info.modules().count(), info.rejected().count());
    if let Some((addr, rev)) = info.rsdp {
        info!("ACPI RSDP v{rev} copy at {addr:#x}");
    }

    if let Some(fault) = config.test_fault {
        provoke(fault);
    }
    arch::fpu::init();
    let tsc_hz = arch::tsc::calibrate();
    let lapic_hz = arch::lapic::init();
    report!("time tsc_hz={} lapic_timer_hz={}", tsc_hz, lapic_hz.unwrap_or(0));
    let hardware = match Hardware::enable(&cpu.virt, &mut mm::frames()) {
        Ok(hw) => {
            report!("virt enabled backend={}", hw.name());
            Some(hw)
        }
        Err(e) => {
            report!("virt unavailable reason=\"{e}\"");
            None
        }
    };
    // Every other CPU: started, set up like this one, then idle (sched::ap_main).
    arch::smp::start_aps(info.rsdp, config.cpus, hardware.map(|_| cpu.virt));
    report!("ready");

    // The host CPUs with virtualization enabled run vCPUs.
    if let Some(hw) = hardware {
        sched::configure(hw, config.slice_us);
    }

    static BUILDING: &str = "building VMs";
    arch::idt::set_context(&BUILDING);
    // Initramfs and multiboot modules belong to the VM they name; one naming no VM is reported.
    for m in info.modules() {
        let (vm, what) = match (spec::initrd_of(m.cmdline), spec::module_of(m.cmdline), spec::disk_of(m.cmdline)) {
            (Some(vm), _, _) => (vm, "initrd"),
            (None, Some((vm, _)), _) => (vm, "module"),
            (None, None, Some((vm, _))) => (vm, "disk"),
            (None, None, None) => continue,
        };
        let owner = info
            .modules()
            .any(|k| !spec::is_attachment(k.cmdline) && spec::parse(k.cmdline).is_ok_and(|s| s.name == vm));
        if !owner {
            report!("vm module={} not used reason=\"{what} for VM '{vm}', which no module describes\"", m.index);
        }
    }
    // Every VM is built first, then all start together.
    let mut vms = alloc::vec::Vec::new();
    // Disk modules (by module index) a VM has taken: each is one VM's alone.
    let mut disks_taken = alloc::vec::Vec::new();
    for m in info.modules() {
        if spec::is_attachment(m.cmdline) {
            continue;
        }
        // The line outlives this loop: a VM whose guest resets it is built again from it.
        let line: &'static str = alloc::boxed::Box::leak(alloc::string::String::from(m.cmdline).into_boxed_str());
        let spec = match spec::parse(line) {
            Ok(spec) => spec,
            Err(e) => {
                report!("vm module={} not started reason=\"{e}\"", m.index);
                sched::note_refused();
                continue;
            }
        };
        // A disk line for this VM with bad options stops the VM: it would run without the
        // disk its owner meant it to have.
        if let Some(e) = info.modules().find_map(|k| match spec::disk_of(k.cmdline) {
            Some((vm, Err(e))) if vm == spec.name => Some(e),
            _ => None,
        }) {
            report!("vm name={} not started reason=\"{e}\"", spec.name);
            sched::note_refused();
            continue;
        }
        let Some(hw) = &hardware else {
            report!("vm name={} not started reason=\"no usable virtualization hardware\"", spec.name);
            sched::note_refused();
            continue;
        };
        // SAFETY: the module was validated to lie in available RAM, is reserved from the
        // frame allocator, and is identity-mapped read/write by Vireo's page tables.
        let image = unsafe { module_bytes(m) };
        let initrd = info
            .modules()
            .find(|k| spec::initrd_of(k.cmdline) == Some(spec.name))
            // SAFETY: as for `image`.
            .map(|k| unsafe { module_bytes(k) });
        // A multiboot kernel's modules, in module order, each with the rest of its line; kept
        // (like the line) for a rebuild after a reset.
        let modules: alloc::vec::Vec<_> = info
            .modules()
            .filter_map(|k| {
                let (vm, args) = spec::module_of(k.cmdline)?;
                (vm == spec.name).then(|| {
                    let args: &'static str =
                        alloc::boxed::Box::leak(alloc::string::String::from(args).into_boxed_str());
                    // SAFETY: as for `image`.
                    BootModule { bytes: unsafe { module_bytes(k) }, cmdline: args }
                })
            })
            .collect();
        let modules: &'static [BootModule<'static>] = alloc::boxed::Box::leak(modules.into_boxed_slice());
        // The VM's disk: the first `<name>:disk` line naming it that no VM has taken (one
        // disk per VM; a further one is reported unused). It is made once, here: later
        // boots of the VM (after a guest reset) get the same image back.
        let mut disk = None;
        for k in info.modules() {
            let Some((vm, Ok(d))) = spec::disk_of(k.cmdline) else { continue };
            if vm != spec.name || disks_taken.contains(&k.index) {
                continue;
            }
            if disk.is_some() {
                report!("vm module={} not used reason=\"VM '{vm}' has a disk already (one disk per VM)\"", k.index);
                continue;
            }
            disks_taken.push(k.index);
            // SAFETY: the module lies in available RAM, is reserved from the frame allocator
            // and identity-mapped read/write; it is handed out mutably once only
            // (`disks_taken`), to this VM's disk, and nothing else (no image, initrd or
            // multiboot module: a disk line is none of those) reads it.
            let bytes = unsafe { module_bytes_mut(k) };
            let blk = crate::devices::virtio::blk::Blk::new(
                bytes,
                d.read_only,
                d.serial,
                crate::devices::virtio::blk::SEG_MAX,
            );
            let shared: &'static crate::devices::virtio::blk::Disk =
                alloc::boxed::Box::leak(alloc::boxed::Box::new(spin::Mutex::new(blk)));
            disk = Some(crate::devices::virtio::blk::DiskRef(shared));
        }
        let files = launch::GuestFiles { image, initrd, modules, disk };
        match launch::build_vm(hw, &mut mm::frames(), &spec, files, sched::kick, 1) {
            Ok(mut vm) => {
                vm.relaunch = Some(vmm::vm::Relaunch { spec, files, boot: 1 });
                vms.push(vm)
            }
            Err(e) => {
                report!("vm name={} not started reason=\"{e}\"", spec.name);
                sched::note_refused();
            }
        }
    }
    static RUNNING: &str = "running guests";
    arch::idt::set_context(&RUNNING);
    for vm in vms {
        sched::start_vm(vm);
    }
    match hardware {
        Some(hw) => sched::cpu_main(0, hw),
        // Without virtualization no VM ran: the verdict counts the refused lines.
        None => sched::all_ended(),
    }
}

fn fatal_boot_info(e: bootinfo::BootInfoError) -> ! {
    report!("fatal boot information: {e}");
    exit::fail("bad boot information")
}

/// A validated module's bytes.
///
/// # Safety
/// The module must have passed boot-information validation (inside available RAM,
/// reserved from the frame allocator) and Vireo's page tables must map it.
unsafe fn module_bytes(m: &bootinfo::Module<'_>) -> &'static [u8] {
    // SAFETY: per the caller, the range is mapped, never handed out, and never written.
    unsafe { core::slice::from_raw_parts(m.range.start as *const u8, m.range.len() as usize) }
}

/// A validated module's bytes, to write.
///
/// # Safety
/// As for [`module_bytes`], and no other reference to the module's bytes may exist or be
/// made while the returned one lives (it lives for ever: the module must be given out once).
unsafe fn module_bytes_mut(m: &bootinfo::Module<'_>) -> &'static mut [u8] {
    // SAFETY: per the caller, the range is mapped writable, never handed out by the frame
    // allocator, and this is the only reference to it.
    unsafe { core::slice::from_raw_parts_mut(m.range.start as *mut u8, m.range.len() as usize) }
}

/// Builds Vireo's own page tables and switches to them; returns the number of tables.
fn init_paging(
    frames: &mut FrameAllocator,
    ram: impl Iterator<Item = PhysRange>,
    cpu: &CpuInfo,
) -> Result<usize, mm::MapError> {
    let layout = image_layout();
    let features = PagingFeatures { nx: cpu.nx, pages_1g: cpu.pages_1g };
    let mut segments = [Segment { range: PhysRange::EMPTY, flags: MapFlags::empty() }; MAX_SEGMENTS];
    let n = mm::host::plan(ram, &layout, features, &mut segments)?;
    let segments = &segments[..n];
    let count = mm::host::tables_needed(segments);
    // Below 4 GiB: the boot page tables, still live while these are built, map only that.
    let base = frames.alloc_below(count as u64 * mm::PAGE_SIZE, mm::PAGE_SIZE, 1 << 32)?;
    // SAFETY: the frames were just taken from the allocator (never handed out again) and
    // are identity-mapped by the boot tables.
    let mut pool = unsafe { TablePool::identity(base, count) };
    let tables = mm::host::build(&mut pool, segments, &layout, features)?;
    for s in segments {
        log::debug!("map {:#012x}-{:#012x} {:?}", s.range.start, s.range.end, s.flags);
    }
    arch::paging::activate(tables.root(), cpu.nx);
    report!("paging pool={:#x}-{:#x} used={}", base, base + count as u64 * mm::PAGE_SIZE, pool.used());
    Ok(pool.used())
}

fn init_heap(frames: &mut FrameAllocator, bytes: u64) {
    match frames.alloc(bytes, mm::PAGE_SIZE) {
        Ok(_start) => {
            report!("heap range={:#x}-{:#x}", _start, _start + bytes);
            // SAFETY: the frames were just taken from the allocator, are identity-mapped
            // and writable, and are never handed out again.
            #[cfg(target_os = "none")]
            unsafe {
                mm::heap::init(_start, bytes)
            };
        }
        Err(e) => {
            report!("fatal heap of {}: {e}", Bytes(bytes));
            exit::fail("no memory for the heap");
        }
    }
}

/// Test hook: provokes a CPU exception so tests can see the crash dump.
fn provoke(fault: cmdline::TestFault) {
    use cmdline::TestFault::*;
    warn!("test hook: provoking {fault:?}");
    static CONTEXT: &str = "test hook test.fault";
    arch::idt::set_context(&CONTEXT);
    // SAFETY: each arm deliberately faults; the exception handler never returns here.
    unsafe {
        match fault {
            InvalidOpcode => core::arch::asm!("ud2"),
            GeneralProtection => {
                core::ptr::read_volatile(0x8000_0000_0000_0000u64 as *const u64);
            }
            PageFault => core::ptr::write_volatile(0x0000_7000_0000_0000u64 as *mut u64, 0xdead),
            DivideError => core::arch::asm!("xor ecx, ecx", "div ecx", out("eax") _, out("ecx") _, out("edx") _),
            Breakpoint => core::arch::asm!("int3"),
            StackOverflow => recurse(0),
        }
    }
}

#[inline(never)]
fn recurse(depth: u64) {
    if depth == u64::MAX {
        return;
    }
    let pad = [depth; 64];
    core::hint::black_box(&pad);
    recurse(depth + 1);
    core::hint::black_box(&pad);
}
