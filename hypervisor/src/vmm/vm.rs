//! A VM: what its vCPUs share. Guest memory, the device bus and interrupt routing, the
//! VM-wide console, lifecycle (running, ended with an outcome) and the end-of-VM report.
//! Each vCPU's private state is a [`Vcpu`] behind its own lock, taken by the one host CPU
//! that runs it; the shared parts are reached through `&Vm` with locks per device.

use alloc::{string::String, sync::Arc, vec::Vec};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use spin::Mutex;

use super::{
    exit::{Exit, ExitKind},
    guest_mem::GuestMemory,
    stats::{ExitStats, VcpuCounters},
    vcpu::{Vcpu, VcpuState},
};
use crate::{
    arch::tsc,
    devices::{
        bus::{Bus, Ctx},
        console::{print_line, GuestConsole},
        irqchip::Interrupts,
        testdev::TestDevice,
        time::Nanos,
        uart::ConsoleUart,
    },
    report,
};

/// How a VM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest asked to end (hypercall `VM_EXIT`) with this status.
    Exited { status: u64 },
    /// A vCPU triple-faulted: the machine would reset; Vireo ends the VM.
    TripleFault { vcpu: usize },
    /// Every vCPU halted with nothing that could ever wake it.
    Halted,
    /// Vireo could not go on with this guest (reason says why); the guest is stopped,
    /// Vireo and other VMs go on.
    Fatal { reason: &'static str },
    /// The VM ran out of its time limit (`timeout=` on its module line).
    TimedOut,
    /// The guest powered its machine off (ACPI S5).
    PoweredOff,
    /// The guest reset its machine (reset register, keyboard controller).
    Reset,
}

impl VmOutcome {
    /// The outcome's name on the `end` line (`outcome=...`).
    pub fn name(&self) -> &'static str {
        match self {
            VmOutcome::Exited { .. } => "exited",
            VmOutcome::TripleFault { .. } => "triple-fault",
            VmOutcome::Halted => "halted",
            VmOutcome::Fatal { .. } => "fatal",
            VmOutcome::TimedOut => "timed-out",
            VmOutcome::PoweredOff => "powered-off",
            VmOutcome::Reset => "reset",
        }
    }
}

/// Reads the TSC.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged here (CR4.TSD clear) and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// What it takes to build a VM again when its guest resets it.
#[derive(Clone, Copy)]
pub struct Relaunch {
    pub spec: super::spec::VmSpec<'static>,
    /// Its image, initramfs and multiboot modules.
    pub files: super::launch::GuestFiles<'static>,
    /// This VM's boot number (1 = first).
    pub boot: u32,
}

/// How many ports and MSRs the end-of-VM report names (`exit source` lines).
const TOP_EXIT_SOURCES: usize = 8;

pub struct Vm {
    pub name: String,
    /// Set for VMs that restart when their guest resets the machine.
    pub relaunch: Option<Relaunch>,
    pub mem: GuestMemory,
    pub bus: Bus,
    pub irq: Arc<Interrupts>,
    /// The console UART of a Linux VM (keyboard input goes there).
    pub uart: Option<Arc<Mutex<ConsoleUart>>>,
    /// Its virtio console's input (`virtio=console`): keyboard input goes there instead while
    /// the guest's driver is up.
    pub virtio_input: Option<Arc<crate::devices::virtio::console::ConsoleInput>>,
    pub vcpus: Vec<Mutex<Vcpu>>,
    /// Each vCPU's exit and scheduling figures, readable without its lock (same index).
    pub counters: Vec<VcpuCounters>,
    /// The paravirtual interfaces the VM offers and their VM-wide state.
    pub pv: crate::pv::VmPv,
    /// TSC when the VM started: guest time zero for its devices.
    pub start_tsc: u64,
    /// TSC at which the VM's time limit ends (set when it starts).
    pub deadline: Option<u64>,
    /// The VM's time limit in TSC ticks (`timeout=`), counted from its start.
    pub time_limit: Option<u64>,
    /// The CPU is AMD (VMMCALL is its native hypercall instruction).
    pub native_vmmcall: bool,
    /// The outcome the VM line expects (`expect=`), if not the default.
    pub expect: Option<&'static str>,
    /// `expect=exited:N`: the exit status expected.
    pub expect_status: Option<u64>,
    /// `floor=on`: the backend answers PING hypercalls itself (`Backend::run_floor`).
    pub floor: bool,
    /// `pmu=on`: the vCPUs offer Vireo's virtual PMU (`crate::pmu`).
    pub pmu: bool,
    /// The VM's virtio-blk disk (`<name>:disk`), for the statistics at its end.
    pub disk: Option<crate::devices::virtio::blk::DiskRef>,
    /// A Linux VM's PC platform is on the bus (test guests have none).
    platform: bool,
    /// Earliest guest time (ns) a device needs a tick; u64::MAX: none.
    device_deadline: AtomicU64,
    outcome: Mutex<Option<(VmOutcome, usize)>>,
    ended: AtomicBool,
    /// vCPUs halted with interrupts off or waiting for SIPI.
    blocked_for_good: AtomicUsize,
    /// vCPUs not yet retired after the VM ended.
    pub live_vcpus: AtomicUsize,
    console: Mutex<GuestConsole>,
    pub testdev: Mutex<TestDevice>,
}

impl Vm {
    /// Ends the VM's life but for its RAM, which it returns: devices, vCPUs and the rest are
    /// dropped first, because a device may hold host addresses in this RAM for other host
    /// CPUs to write (virtio-net's posted receive chains, withdrawn when the NIC drops).
    pub fn into_memory(self) -> GuestMemory {
        let Vm { mem, bus, .. } = self;
        drop(bus);
        mem
    }

    /// A VM over `mem`, `bus` and `irq` with `vcpus` (index order); `platform`: a PC
    /// platform is on the bus.
    pub fn new(
        name: &str,
        mem: GuestMemory,
        bus: Bus,
        irq: Arc<Interrupts>,
        vcpus: Vec<Vcpu>,
        platform: bool,
        native_vmmcall: bool,
    ) -> Self {
        let n = vcpus.len();
        let waiting = vcpus.iter().filter(|v| v.state == VcpuState::WaitForSipi).count();
        let vm = Self {
            name: String::from(name),
            relaunch: None,
            mem,
            bus,
            irq,
            uart: None,
            virtio_input: None,
            vcpus: vcpus.into_iter().map(Mutex::new).collect(),
            counters: (0..n).map(|_| VcpuCounters::default()).collect(),
            pv: crate::pv::VmPv::default(),
            start_tsc: rdtsc(),
            deadline: None,
            time_limit: None,
            native_vmmcall,
            expect: None,
            expect_status: None,
            floor: false,
            pmu: false,
            disk: None,
            platform,
            device_deadline: AtomicU64::new(0),
            outcome: Mutex::new(None),
            ended: AtomicBool::new(false),
            blocked_for_good: AtomicUsize::new(waiting),
            live_vcpus: AtomicUsize::new(n),
            console: Mutex::new(GuestConsole::default()),
            testdev: Mutex::new(TestDevice::default()),
        };
        vm.refresh_device_deadline();
        vm
    }

    /// Starts the VM's clock: guest time zero and the time limit count from now.
    pub fn start_clock(&mut self) {
        self.start_tsc = rdtsc();
        self.deadline = self.time_limit.map(|t| self.start_tsc.saturating_add(t));
        self.refresh_device_deadline();
    }

    pub fn has_platform(&self) -> bool {
        self.platform
    }

    /// Guest time: nanoseconds since the VM started.
    pub fn now(&self) -> Nanos {
        Nanos(tsc::to_nanos(rdtsc().wrapping_sub(self.start_tsc)))
    }

    /// TSC value at guest time `t`.
    pub fn tsc_at(&self, t: Nanos) -> u64 {
        self.start_tsc.saturating_add(tsc::from_nanos(t.0))
    }

    /// What a device access gets to see.
    pub fn ctx(&self) -> Ctx<'_> {
        Ctx { now: self.now(), mem: &self.mem }
    }

    /// Ticks the devices whose deadline has passed (cheap when none has). Another vCPU's
    /// access may lower the deadline meanwhile ([`Vm::note_device_deadline`]): then the
    /// new value is not overwritten, the devices are looked at again.
    pub fn tick_devices(&self, now: Nanos) {
        let mut woken = self.irq.take_device_wake();
        loop {
            let seen = self.device_deadline.load(Ordering::Acquire);
            if now.0 < seen && !woken {
                return;
            }
            woken = false;
            let next = self.bus.tick(&Ctx { now, mem: &self.mem }).map_or(u64::MAX, |t| t.0);
            if self.device_deadline.compare_exchange(seen, next, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return;
            }
        }
    }

    /// Recomputes the earliest device deadline (after an access may have changed one).
    pub fn refresh_device_deadline(&self) {
        let next = self.bus.next_deadline();
        self.device_deadline.store(next.map_or(u64::MAX, |t| t.0), Ordering::Release);
    }

    /// A device's deadline after an access: the VM's earliest deadline moves up to it if it
    /// is sooner (a later one is found at the next tick, which recomputes them all).
    pub fn note_device_deadline(&self, t: Option<Nanos>) {
        if let Some(t) = t {
            self.device_deadline.fetch_min(t.0, Ordering::AcqRel);
        }
    }

    /// The earliest device deadline as stored (guest ns; u64::MAX: none), to tell whether it
    /// changed since it was last looked at.
    #[inline]
    pub fn device_deadline_raw(&self) -> u64 {
        self.device_deadline.load(Ordering::Acquire)
    }

    /// The earliest device deadline as a TSC value.
    pub fn device_deadline_tsc(&self) -> Option<u64> {
        match self.device_deadline.load(Ordering::Acquire) {
            u64::MAX => None,
            ns => Some(self.tsc_at(Nanos(ns))),
        }
    }

    /// Bytes for the VM's own console (debug port 0xE9, the console hypercall).
    pub fn console_write(&self, bytes: &[u8]) {
        let name = &self.name;
        self.console.lock().push(bytes, &mut |l| print_line(name, l));
    }

    /// Prints partial console lines (the guest may be waiting at a prompt).
    pub fn flush_console(&self) {
        let name = &self.name;
        self.console.lock().flush(&mut |l| print_line(name, l));
        if let Some(uart) = &self.uart {
            uart.lock().flush();
        }
    }

    /// Changes a vCPU's state, keeping count of vCPUs nothing but NMI/INIT/SIPI can wake.
    pub fn set_state(&self, vcpu: &mut Vcpu, state: VcpuState) {
        let stuck = |s: VcpuState| matches!(s, VcpuState::WaitForSipi | VcpuState::Halted { if_off: true });
        match (stuck(vcpu.state), stuck(state)) {
            (false, true) => {
                self.blocked_for_good.fetch_add(1, Ordering::AcqRel);
            }
            (true, false) => {
                self.blocked_for_good.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
        vcpu.state = state;
    }

    /// Every vCPU halted with interrupts off or waits for SIPI.
    pub fn all_blocked_for_good(&self) -> bool {
        self.blocked_for_good.load(Ordering::Acquire) >= self.vcpus.len()
    }

    /// Ends the VM with `outcome` (the first outcome wins) and wakes its vCPUs so their
    /// host CPUs retire them.
    pub fn stop_by(&self, outcome: VmOutcome, vcpu: usize) {
        {
            let mut o = self.outcome.lock();
            if o.is_none() {
                *o = Some((outcome, vcpu));
            }
        }
        self.ended.store(true, Ordering::Release);
        for i in 0..self.irq.vcpus() {
            self.irq.notify(i);
        }
    }

    /// [`Vm::stop_by`] from no vCPU in particular (vCPU 0 is named in reports).
    pub fn stop(&self, outcome: VmOutcome) {
        let vcpu = match outcome {
            VmOutcome::TripleFault { vcpu } => vcpu,
            _ => 0,
        };
        self.stop_by(outcome, vcpu);
    }

    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// How the VM ended (and which vCPU ended it), once it has.
    pub fn outcome(&self) -> Option<(VmOutcome, usize)> {
        *self.outcome.lock()
    }

    /// Exit statistics summed over the vCPUs.
    pub fn stats(&self) -> ExitStats {
        let mut total = ExitStats::new();
        for c in &self.counters {
            total.add(&c.exits.snapshot());
        }
        total
    }

    /// The end-of-VM report: outcome, exit table, per-vCPU figures, and for crashes the
    /// exits that led there and the registers of the vCPU that ended it.
    pub fn report_end(&self) {
        self.flush_console();
        let name = &self.name;
        let (outcome, culprit) = self.outcome().unwrap_or((VmOutcome::Halted, 0));
        let stats = self.stats();
        let total = stats.total();
        // Fresh external interrupts injected while the guest could not take them (a Vireo
        // bug: `vmm::injections`); 0 in a healthy run.
        let masked: u64 = self.vcpus.iter().map(|v| v.lock().injections().masked).sum();
        match outcome {
            VmOutcome::Exited { status } => {
                report!(
                    "vm name={name} end outcome=exited status={status} exits={} injected_masked={masked}",
                    total.count
                )
            }
            VmOutcome::TripleFault { vcpu } => {
                report!(
                    "vm name={name} end outcome=triple-fault vcpu={vcpu} exits={} injected_masked={masked}",
                    total.count
                )
            }
            VmOutcome::Fatal { reason } => {
                report!(
                    "vm name={name} end outcome=fatal reason=\"{reason}\" exits={} injected_masked={masked}",
                    total.count
                )
            }
            o => report!("vm name={name} end outcome={} exits={} injected_masked={masked}", o.name(), total.count),
        }
        if let Some(disk) = self.disk {
            // Counted since Vireo started: the disk outlives the VM's boots.
            let s = disk.0.lock().stats;
            report!(
                "vm name={name} virtio-blk reads={} writes={} flushes={} bytes_read={} bytes_written={} errors={}",
                s.reads,
                s.writes,
                s.flushes,
                s.bytes_read,
                s.bytes_written,
                s.errors
            );
        }
        // RAM is populated on first touch (2 MiB chunks): how much the guest ever touched.
        // zero_us: the time spent zeroing those chunks, all vCPUs together (within the
        // nested page fault exits of first touches, or Vireo's own accesses).
        report!(
            "vm name={name} memory ram_mib={} touched_mib={} zero_us={}",
            self.mem.size() >> 20,
            (self.mem.populated_chunks() as u64 * crate::mm::LARGE_PAGE_SIZE) >> 20,
            tsc::to_nanos(self.mem.zero_cycles()) / 1000
        );
        for (class, s) in stats.nonzero() {
            report!(
                "vm name={name} exit reason={class} count={} cycles={} avg_cycles={}",
                s.count,
                s.cycles,
                s.cycles / s.count
            );
        }
        // The ports and MSRs most exits were for, all vCPUs together: which device or
        // register to make cheaper. Sources beyond a vCPU's table count as `other`.
        let mut sources = Vec::new();
        let other: u64 = self.counters.iter().map(|c| c.sources.add_to(&mut sources)).sum();
        for (source, count) in super::stats::top_sources(sources, TOP_EXIT_SOURCES) {
            report!("vm name={name} exit source {source} count={count}");
        }
        if other > 0 {
            report!("vm name={name} exit source kind=other count={other}");
        }
        for v in &self.vcpus {
            let v = v.lock();
            report!(
                "vm name={name} vcpu={} exits={} slices={} run_us={} steal_us={}",
                v.index,
                self.counters[v.index].exits.snapshot().total().count,
                v.sched.slices,
                tsc::to_nanos(v.sched.run) / 1000,
                tsc::to_nanos(v.sched.steal) / 1000
            );
            if v.pmu().hardware() {
                // The hardware PMU path (`crate::pmu::hw`): slices that loaded the counters
                // (0: the guest never enabled one, the lazy case) and PMIs raised.
                report!(
                    "vm name={name} pmu vcpu={} counters=hardware loads={} saves={} pmis={}",
                    v.index,
                    v.pmu_hw().loads,
                    v.pmu_hw().saves,
                    v.pmu().pmis
                );
            }
            if self.irq.has_lapics() {
                use core::sync::atomic::Ordering::Relaxed;
                let c = &self.counters[v.index].pv;
                let p = v.pv();
                let eoi_writes = self.irq.apic(v.index).lapic.lock().eoi_writes();
                report!(
                    "vm name={name} pv vcpu={} mode={} kvmclock={} steal_time={} pv_eoi={} eoi_exits={eoi_writes} pv_eois={} kicks={} pv_ipis={} pv_ipi_targets={} yields={} tlb_flushes={} preempted={}",
                    v.index,
                    self.pv.mode.name(),
                    OnOff(p.system_time().is_some()),
                    OnOff(p.steal().is_some()),
                    OnOff(p.pv_eoi().is_some()),
                    c.pv_eois.load(Relaxed),
                    c.kicks.load(Relaxed),
                    c.pv_ipis.load(Relaxed),
                    c.pv_ipi_targets.load(Relaxed),
                    c.yields.load(Relaxed),
                    c.tlb_flushes.load(Relaxed),
                    c.preempted.load(Relaxed)
                );
            }
        }
        if matches!(outcome, VmOutcome::Exited { .. } | VmOutcome::PoweredOff | VmOutcome::Reset) {
            return;
        }
        let Some(v) = self.vcpus.get(culprit) else { return };
        let v = v.lock();
        // Consecutive identical exits (same kind and RIP) are folded into one line.
        let mut items: [(Option<Exit>, u32); 8] = [(None, 0); 8];
        let mut n = 0;
        for e in v.history() {
            match items[..n].last_mut() {
                Some((Some(prev), count)) if prev.kind == e.kind && prev.rip == e.rip && prev.events == e.events => {
                    *count += 1
                }
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
                    "vm name={name} last-exit n={i} exception vector={vector} error={error_code:?} rip={:#x} raw={:#x} times={count}{}",
                    e.rip,
                    e.raw,
                    EventsNote(&e.events)
                );
            } else {
                report!(
                    "vm name={name} last-exit n={i} kind={:?} rip={:#x} raw={:#x} times={count}{}",
                    e.kind,
                    e.rip,
                    e.raw,
                    EventsNote(&e.events)
                );
            }
        }
        let log = v.injections();
        report!("vm name={name} injections vcpu={} total={} masked={}", v.index, log.total, log.masked);
        for (i, inj) in log.iter().enumerate() {
            report!("vm name={name} inject vcpu={} n={i} {inj}", v.index);
        }
        for (i, f) in v.stack_frames().enumerate() {
            report!("vm name={name} stack-frame vcpu={} n={i} {f}", v.index);
        }
        if self.irq.has_lapics() {
            for (i, a) in (0..self.irq.vcpus()).map(|i| (i, self.irq.apic(i))) {
                let state = if i == v.index { Some(v.state) } else { self.vcpus[i].try_lock().map(|w| w.state) };
                report!(
                    "vm name={name} lapic vcpu={i} state={state:?} now_ns={} {}",
                    self.now().0,
                    a.lapic.lock().post_mortem()
                );
            }
        }
        let r = &v.regs;
        report!(
            "vm name={name} regs vcpu={} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rsp={:#x} rbp={:#x}",
            v.index,
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

/// ` injected=... interrupted=...` for a post-mortem line, only the events there were.
struct EventsNote<'a>(&'a crate::vmm::exit::ExitEvents);

impl core::fmt::Display for EventsNote<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if let Some(e) = self.0.injected {
            write!(f, " injected={e:?}")?;
        }
        if let Some(e) = self.0.interrupted {
            write!(f, " interrupted={e:?}")?;
        }
        Ok(())
    }
}

/// `on` / `off` in report lines.
struct OnOff(bool);

impl core::fmt::Display for OnOff {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(if self.0 { "on" } else { "off" })
    }
}
