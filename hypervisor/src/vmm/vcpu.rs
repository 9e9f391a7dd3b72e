//! A vCPU and the one run loop both vendors share: "what happens on a CPUID exit" (and every
//! other exit) is decided here, once, in `Vcpu::handle`.
//!
//! A vCPU owns its registers, FPU state, MSRs, pending events, exit history and statistics;
//! its local APIC lives in the VM's interrupt routing (`devices::irqchip`) so other vCPUs and
//! devices can deliver to it. A vCPU runs on one host CPU at a time, for a slice: [`Vcpu::run`]
//! returns when the slice ends, when the vCPU blocks (HLT, wait-for-SIPI) or when its VM ends.

use core::sync::atomic::{AtomicBool, Ordering};

use super::{
    backend::Backend,
    cpuid::{self, CpuidContext},
    exit::{merge, Event, Exit, ExitKind, IoAccess, Merge, NptAccess, VECTOR_DF, VECTOR_PF, VECTOR_UD},
    fast::CoreFast,
    hypercall,
    injections::{self, Injection, InjectionLog, Origin, StackFrame},
    mmio, msr,
    regs::GuestRegs,
    state::{CpuState, SegAttr, SegReg, CR4_OSXSAVE, CR4_PCE, EFER_LMA, RFLAGS_DF, RFLAGS_IF},
    stats::{ExitSource, PvCounters},
    string_io,
    vm::{rdtsc, Vm, VmOutcome},
    walk::{self, GuestPaging},
};
use crate::{
    arch::{
        fpu::{self, FpuState},
        tsc,
    },
    devices::{
        bus::{BusEffect, Space},
        lapic::{LocalApic, MSR_APIC_BASE, MSR_TSC_DEADLINE, X2APIC_MSR_FIRST, X2APIC_MSR_LAST},
        ports::{self, PortEffect},
        testdev::IrqRequest,
        time::Nanos,
    },
    pmu::{self, Pmu},
    pv::{self, VcpuPv},
};

/// Exits remembered for crash reports ("the exit that led there").
pub const HISTORY: usize = 8;

/// Where a vCPU stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Runs when its host CPU gives it a slice.
    Runnable,
    /// Executed HLT: waits for an interrupt (`if_off`: with RFLAGS.IF = 0, so only an NMI,
    /// INIT or SIPI can wake it).
    Halted { if_off: bool },
    /// After INIT (or at power-on, for APs): waits for a STARTUP IPI.
    WaitForSipi,
    /// Its VM ended.
    Stopped,
}

/// Why [`Vcpu::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceEnd {
    /// The slice is used up; the vCPU is still runnable.
    Preempted,
    /// The vCPU halted or waits for SIPI ([`Vcpu::state`] says which).
    Blocked,
    /// The VM ended (this vCPU or another stopped it).
    VmEnded,
}

/// What the dispatch decided.
enum Flow {
    Continue,
    /// Give the host CPU to another vCPU (the slice ends early).
    Yield,
    Block,
    Stop(VmOutcome),
}

/// Scheduling figures of one vCPU, in TSC ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    /// Slices given.
    pub slices: u64,
    /// Time spent in [`Vcpu::run`].
    pub run: u64,
    /// Time runnable but waiting for its host CPU (steal time).
    pub steal: u64,
    /// When it last became runnable without running (for `steal`).
    pub runnable_since: Option<u64>,
}

pub struct Vcpu {
    /// Index in its VM = its APIC ID.
    pub index: usize,
    pub regs: GuestRegs,
    pub sched: SchedStats,
    pub state: VcpuState,
    fpu: FpuState,
    msrs: msr::MsrState,
    /// A state to load into the backend before the next entry (power-on, INIT, SIPI).
    load: Option<CpuState>,
    /// Test-device interrupt raised now, and one raised later: (TSC deadline, vector).
    pending_irq: Option<u8>,
    timer: Option<(u64, u8)>,
    pending_nmi: bool,
    history: [Option<Exit>; HISTORY],
    history_next: usize,
    unassigned_reported: u32,
    /// TSC deadline the host timer is armed for.
    armed: Option<u64>,
    /// The exit fast path re-enters at once only before this TSC, and while the VM's device
    /// deadline is still the one seen then (`reenter_at_once`).
    fast_until: u64,
    device_seen: u64,
    /// Whether the last port I/O exit was answered by a device on the VM's bus (not by one
    /// of Vireo's own ports, whose test interrupt and timer the fast path does not see).
    io_on_bus: bool,
    /// What the guest registered through the KVM PV MSRs.
    pv: VcpuPv,
    wall_clock_msr: u64,
    /// The virtual PMU (`pmu=on`; off, it claims no MSR).
    pmu: Pmu,
    /// Its hardware path's state (`pmu::hw`; unused on the software path).
    pmu_hw: pmu::hw::HwVcpu,
    /// The last events queued for injection (post-mortem).
    injections: InjectionLog,
    /// Interrupt frames found on the guest stack when its VM ended badly (post-mortem).
    stack_frames: [Option<StackFrame>; STACK_FRAMES],
}

/// Interrupt frames the post-mortem looks for above the guest's RSP, and how far it looks.
pub const STACK_FRAMES: usize = 6;
const STACK_SCAN_BYTES: u64 = 16 * 1024;

/// Floor mode: PING hypercalls the backend answers before the core sees one (and its
/// deadlines, slice end and events) again.
/// #PF error code bits (SDM Vol. 3A §4.7): the access was a write; it was made at CPL 3.
const PF_WRITE: u32 = 1 << 1;
const PF_USER: u32 = 1 << 2;
const FLOOR_BATCH: u32 = 4096;

/// MSRs of the local APIC (its base, the TSC deadline, the x2APIC registers): accesses
/// change or depend on its interrupt and timer state.
fn is_lapic_msr(index: u32) -> bool {
    matches!(index, MSR_TSC_DEADLINE | MSR_APIC_BASE | X2APIC_MSR_FIRST..=X2APIC_MSR_LAST)
}

/// Reads EDX holds after INIT/RESET: the processor signature (CPUID.1:EAX).
fn processor_signature() -> u64 {
    cpuid::host(1, 0).eax as u64
}

impl Vcpu {
    /// What the guest registered through the KVM PV MSRs.
    pub fn pv(&self) -> &VcpuPv {
        &self.pv
    }

    /// vCPU `index`; `boot`: the state it starts in (`None`: an AP, waiting for SIPI).
    pub fn new(index: usize, boot: Option<CpuState>, intel: bool) -> Option<Self> {
        Some(Self {
            index,
            regs: GuestRegs::default(),
            sched: SchedStats::default(),
            state: if boot.is_some() { VcpuState::Runnable } else { VcpuState::WaitForSipi },
            fpu: FpuState::new()?,
            msrs: msr::MsrState::new(intel),
            load: boot,
            pending_irq: None,
            timer: None,
            pending_nmi: false,
            history: [None; HISTORY],
            history_next: 0,
            unassigned_reported: 0,
            armed: None,
            fast_until: 0,
            device_seen: u64::MAX,
            io_on_bus: false,
            pv: VcpuPv::default(),
            wall_clock_msr: 0,
            pmu: Pmu::new(if intel { pmu::Vendor::Intel } else { pmu::Vendor::Amd }, false),
            pmu_hw: pmu::hw::HwVcpu::default(),
            injections: InjectionLog::default(),
            stack_frames: [None; STACK_FRAMES],
        })
    }

    /// Offers the virtual PMU (`pmu=on`) or not, at RESET state.
    pub fn set_pmu(&mut self, on: bool) {
        self.pmu = Pmu::new(self.pmu.vendor(), on);
        self.pmu_hw = pmu::hw::HwVcpu::default();
        self.msrs.set_perfmon(on);
    }

    /// Puts the virtual PMU (on) on the hardware path (`pmu::hw`): the caller checked that
    /// the host PMU and the backend allow it.
    pub fn set_pmu_hardware(&mut self) {
        self.pmu = self.pmu.clone().with_hardware();
    }

    /// The virtual PMU.
    pub fn pmu(&self) -> &Pmu {
        &self.pmu
    }

    /// The virtual PMU's hardware path state (`pmu::hw`).
    pub fn pmu_hw(&self) -> &pmu::hw::HwVcpu {
        &self.pmu_hw
    }

    /// The last events queued for injection, and the counts (post-mortem).
    pub fn injections(&self) -> &InjectionLog {
        &self.injections
    }

    /// Interrupt frames found on the guest's stack when its VM ended (timed out, halted,
    /// triple fault, fatal), innermost first.
    pub fn stack_frames(&self) -> impl Iterator<Item = &StackFrame> + '_ {
        self.stack_frames.iter().flatten()
    }

    /// Post-mortem: looks for interrupt frames in the 16 KiB above the guest's RSP, through
    /// its own page tables (a nested delivery shows as a frame whose RFLAGS.IF is 0).
    fn scan_stack<B: Backend>(&mut self, vm: &Vm, cpu: &B) {
        let paging = GuestPaging { cr0: cpu.cr0(), cr3: cpu.cr3(), cr4: cpu.cr4(), efer: cpu.efer() };
        let word = |va: u64| {
            let gpa = walk::translate(&vm.mem, paging, va).ok()?;
            let mut b = [0u8; 8];
            vm.mem.read(gpa, &mut b).ok()?;
            Some(u64::from_le_bytes(b))
        };
        let rsp = self.regs.rsp & !7;
        let mut n = 0;
        let mut at = rsp;
        while at < rsp.saturating_add(STACK_SCAN_BYTES) && n < STACK_FRAMES {
            let mut w = [0u64; 5];
            let ok = (0..5).all(|k| word(at + 8 * k as u64).map(|v| w[k] = v).is_some());
            if ok && injections::is_interrupt_frame(&w) {
                let [rip, cs, rflags, rsp, ss] = w;
                self.stack_frames[n] = Some(StackFrame { at, rip, cs, rflags, rsp, ss });
                n += 1;
                at += 40;
            } else {
                at += 8;
            }
        }
    }

    /// Queues `event` for the next entry, and records it with the guest's interruptibility.
    fn inject<B: Backend>(&mut self, cpu: &mut B, event: Event) {
        self.note_injection(cpu, event, Origin::Fresh, rdtsc());
        cpu.inject(event);
    }

    fn note_injection<B: Backend>(&mut self, cpu: &B, event: Event, origin: Origin, tsc: u64) {
        self.injections.record(Injection {
            event,
            origin,
            if_on: cpu.rflags() & RFLAGS_IF != 0,
            shadow: cpu.interrupt_shadow(),
            rip: cpu.rip(),
            tsc,
        });
    }

    /// The most recent exits, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &Exit> + '_ {
        (0..HISTORY).filter_map(move |i| self.history[(self.history_next + i) % HISTORY].as_ref())
    }

    /// Runs the vCPU on `cpu` until `slice_end` (TSC), a block, the VM's end, or until its
    /// host CPU raises `yield_now` (another vCPU there was woken).
    pub fn run<B: Backend>(&mut self, vm: &Vm, cpu: &mut B, slice_end: u64, yield_now: &AtomicBool) -> SliceEnd {
        if let Some(state) = self.load.take() {
            cpu.load_state(&state);
            self.regs.rsp = state.rsp;
        }
        self.fpu.restore();
        cpu.slice_start();
        self.pmu_hw_load(cpu);
        // #UD is intercepted so the other vendor's hypercall instruction works too.
        cpu.set_exception_intercepts(1 << VECTOR_UD);
        self.pv_slice_start(vm, cpu);
        let end = 'slice: loop {
            if vm.ended() {
                break SliceEnd::VmEnded;
            }
            if self.take_apic_events(vm) {
                // INIT: the vCPU waits for SIPI (its new state is loaded then).
                break SliceEnd::Blocked;
            }
            self.deliver_events(vm, cpu);
            // A host interrupt (the timer, a kick) that arrived while Vireo handled the last
            // exit is taken here, not left pending across the entry: Bochs's VMX does not
            // exit for an interrupt already pending at entry while the guest has IF = 0, and
            // a timer vector left in the IRR would block every later timer interrupt. A timer
            // taken here (or at any exit) is no longer armed.
            crate::arch::interrupts::deliver_pending();
            if crate::arch::interrupts::take_timer_fired() {
                self.armed = None;
            }
            // A kick taken just now (another vCPU here was woken) would not make the guest
            // exit any more: give the CPU back before entering.
            if yield_now.load(Ordering::Acquire) {
                break SliceEnd::Preempted;
            }
            self.arm_host_timer(vm, cpu, slice_end);
            if self.pv.pv_eoi().is_some() {
                self.pv_eoi_offer(vm);
            }
            // The exit fast path: after a cheap exit with nothing pending, the vCPU is
            // entered again from here, without the per-entry work above (which would find
            // nothing to do: see `reenter_at_once`).
            loop {
                // Guest-mode time for the virtual PMU's cycle counters: from just before the
                // entry to the exit's TSC (the backend's entry and exit instructions included).
                let timed = self.pmu.counts_guest_time();
                let entered = if timed { rdtsc() } else { 0 };
                let exit = self.enter(vm, cpu, yield_now);
                // A PMI this raised goes through the slow path (its LVTPC delivery).
                let hw = self.pmu_hw.loaded_on().is_some();
                let pmi = (timed || hw || self.pmu.counts_exits()) && self.pmu_account(vm, cpu, &exit, entered);
                if exit.events.interrupted.is_some() {
                    if let Some(event) = cpu.pending_event() {
                        self.note_injection(cpu, event, Origin::Requeue, exit.tsc);
                    }
                }
                let offered = self.pv.eoi_offered.is_some();
                if offered {
                    self.pv_eoi_check(vm);
                }
                self.history[self.history_next] = Some(exit);
                self.history_next = (self.history_next + 1) % HISTORY;
                let flow = match vm.deadline {
                    Some(d) if exit.tsc >= d => Flow::Stop(VmOutcome::TimedOut),
                    _ => self.handle(vm, cpu, &exit),
                };
                let now = rdtsc();
                let counters = &vm.counters[self.index];
                counters.exits.record(&exit.kind, now.wrapping_sub(exit.tsc));
                // RDMSR and WRMSR leave RCX (the MSR number) as the guest had it.
                if let Some(source) = ExitSource::of(&exit.kind, self.regs.rcx) {
                    counters.sources.record(source);
                }
                match flow {
                    Flow::Continue => {}
                    Flow::Yield => break 'slice SliceEnd::Preempted,
                    Flow::Block => break 'slice SliceEnd::Blocked,
                    Flow::Stop(outcome) => {
                        if !matches!(outcome, VmOutcome::Exited { .. } | VmOutcome::PoweredOff | VmOutcome::Reset) {
                            self.scan_stack(vm, cpu);
                        }
                        vm.stop(outcome);
                        break 'slice SliceEnd::VmEnded;
                    }
                }
                if now >= slice_end || yield_now.load(Ordering::Relaxed) {
                    break 'slice SliceEnd::Preempted;
                }
                // A PV EOI offer was outstanding: it is renewed (or not) by the slow path.
                if offered || pmi || !self.reenter_at_once(vm, cpu, &exit, now, yield_now) {
                    continue 'slice;
                }
            }
        };
        crate::arch::lapic::disarm();
        self.armed = None;
        self.pmu_hw_save(cpu);
        cpu.slice_end();
        self.fpu.save();
        if end == SliceEnd::Preempted {
            if let Some(gpa) = self.pv.steal() {
                // The area was checked at registration; RAM does not shrink.
                if pv::steal::preempted(&vm.mem, gpa).is_ok() {
                    PvCounters::bump(&vm.counters[self.index].pv.preempted, 1);
                }
            }
        }
        end
    }

    /// One entry through the backend, up to the next exit the run loop handles: hypercalls
    /// the fast path answers (`vmm::fast`) are answered in the backend's entry loop. Floor
    /// mode (a measuring mode, `floor=on`) answers PING there with nothing else.
    #[inline]
    fn enter<B: Backend>(&mut self, vm: &Vm, cpu: &mut B, yield_now: &AtomicBool) -> Exit {
        if vm.floor {
            return cpu.run_floor(&mut self.regs, FLOOR_BATCH);
        }
        // Not where an exit must be seen by the run loop: the virtual PMU counts guest time
        // or exits (in software, or in loaded hardware counters whose overflow is polled at
        // exits), a PV EOI offer is outstanding, a test interrupt or NMI waits.
        if self.pmu.counts_guest_time()
            || self.pmu.counts_exits()
            || self.pmu_hw.loaded_on().is_some()
            || self.pv.eoi_offered.is_some()
            || self.pending_irq.is_some()
            || self.pending_nmi
        {
            return cpu.run(&mut self.regs);
        }
        let mut fast = CoreFast {
            vm,
            until: self.fast_until,
            device_seen: self.device_seen,
            yield_now,
            exits: &vm.counters[self.index].exits,
        };
        cpu.run_fast(&mut self.regs, &mut fast)
    }

    /// The exit fast path's test, after `exit` was handled (`now`: the TSC since): whether
    /// the vCPU may be entered again at once, without the per-entry work of the slice loop.
    ///
    /// That work (APIC events, event delivery, device ticks, the host timer, the PV EOI
    /// offer) depends on nothing a cheap exit changes: a hypercall, CPUID, or an MSR access
    /// outside the local APIC's MSRs changes no interrupt state of this vCPU or its VM
    /// (whatever such a hypercall does to another vCPU, e.g. an IPI to itself, raises
    /// `attention`; a write to a PMU MSR, which may move the next counter overflow, is not
    /// cheap); an IN or OUT answered by a device on the bus changes it only in ways seen
    /// below (see the `Io` arm). What else could change it is checked here, each with one load:
    /// - something was delivered to this vCPU (interrupt, NMI, INIT, SIPI; PIC output):
    ///   `Interrupts::notify` sets its `attention` (and the slow path clears it before it
    ///   looks);
    /// - a deadline passed: `fast_until` is the earliest of the slice end, the VM's time
    ///   limit, the devices', the local APIC timer's and the test timer's, as the last slow
    ///   pass computed them; a device deadline another vCPU moved since is seen as a change
    ///   of the stored value;
    /// - a host interrupt (the host timer, a kick) or a request to yield the host CPU;
    /// - the VM ended; an event is queued (a #GP the exit injected, an event the exit
    ///   interrupted) or a test interrupt or NMI waits.
    ///
    /// A PV EOI offer skipped this way is harmless: without it the guest writes its EOI.
    #[inline]
    fn reenter_at_once<B: Backend>(&self, vm: &Vm, cpu: &B, exit: &Exit, now: u64, yield_now: &AtomicBool) -> bool {
        let cheap = match exit.kind {
            ExitKind::Hypercall(_) | ExitKind::Cpuid => true,
            ExitKind::Rdmsr => !is_lapic_msr(self.regs.rcx as u32),
            // A PMU write may move the next counter overflow (the host timer's deadline).
            ExitKind::Wrmsr => !is_lapic_msr(self.regs.rcx as u32) && !self.pmu.claims(self.regs.rcx as u32),
            // IN or OUT (not string I/O) answered by a device on the bus. What a device does
            // to the rest of the VM goes where the checks below see it: an interrupt line it
            // raises reaches the PIC (whose rising output notifies vCPU 0) and the I/O APIC
            // (whose deliveries notify their vCPUs), a timer it starts lowers the VM's device
            // deadline (`note_device_deadline`), the end of the VM is a `Flow::Stop`. A line
            // it lowers withdraws nothing this vCPU's slow path would have done: an
            // interrupt already delivered stays in the local APIC's IRR, and an interrupt
            // window asked for stays asked for in both paths (`deliver_events` does not
            // cancel it when nothing is pending).
            ExitKind::Io(io) => !io.string && self.io_on_bus,
            _ => false,
        };
        if !cheap || now >= self.fast_until || self.pending_irq.is_some() || self.pending_nmi || cpu.event_pending() {
            return false;
        }
        // As in the slow path: a host interrupt that arrived meanwhile is taken now.
        crate::arch::interrupts::deliver_pending();
        !(crate::arch::interrupts::timer_fired()
            || yield_now.load(Ordering::Acquire)
            || vm.ended()
            || vm.irq.apic(self.index).attention.load(Ordering::Acquire)
            || vm.device_deadline_raw() != self.device_seen)
    }

    /// Counts a guest run and its exit in the virtual PMU (before the exit is handled: a
    /// counter read by this very exit includes it) and raises a PMI that overflow asked for.
    /// Returns whether it raised a PMI.
    fn pmu_account<B: Backend>(&mut self, vm: &Vm, cpu: &B, exit: &Exit, entered: u64) -> bool {
        let cpl = if self.pmu.needs_cpl() { cpu.cpl() } else { 0 };
        if self.pmu.counts_guest_time() {
            self.pmu.guest_ran(exit.tsc.saturating_sub(entered), cpl);
        }
        self.pmu.count_exit(exit.kind.index(), cpl);
        if self.pmu_hw.loaded_on().is_some() {
            // Hardware counters: an overflow since the last exit (the host takes no PMI for
            // them, so it is found here, at the next exit).
            let index = crate::arch::percpu::index();
            pmu::hw::with_this_cpu(index, |_, host| self.pmu_hw.poll(&mut self.pmu, host));
        }
        if self.pmu.take_pmi() && vm.irq.has_lapics() {
            // Through the LVT performance counter entry (a Linux guest programs it as NMI);
            // a VM without local APICs has nowhere to take it.
            let mut lapic = vm.irq.apic(self.index).lapic.lock();
            lapic.performance_interrupt(self.pmu.pmi_masks_lvtpc());
            return true;
        }
        false
    }

    /// The hardware PMU path at the start of a slice: loads the vCPU's counters on this
    /// host CPU if a live one counts in hardware (nothing otherwise: lazy), and tells the
    /// backend what IA32_PERF_GLOBAL_CTRL is on each side of the world switch.
    fn pmu_hw_load<B: Backend>(&mut self, cpu: &mut B) {
        if !self.pmu.counts_in_hardware() {
            return;
        }
        let key = self as *const Self as u64;
        let index = crate::arch::percpu::index();
        let switch =
            pmu::hw::with_this_cpu(index, |slot, host| self.pmu_hw.slice_start(&self.pmu, slot, host, index, key));
        cpu.set_perf_global_ctrl(switch);
    }

    /// The hardware PMU path at the end of a slice: saves and disables the loaded counters
    /// (none loaded: nothing to do).
    fn pmu_hw_save<B: Backend>(&mut self, cpu: &mut B) {
        if self.pmu_hw.loaded_on().is_none() {
            return;
        }
        let index = crate::arch::percpu::index();
        pmu::hw::with_this_cpu(index, |slot, host| self.pmu_hw.slice_end(&mut self.pmu, slot, host));
        cpu.set_perf_global_ctrl(None);
    }

    /// Before the guest reads a PMU register (RDMSR, RDPMC): the loaded counters' values.
    fn pmu_hw_sync(&mut self) {
        if self.pmu_hw.loaded_on().is_some() {
            let index = crate::arch::percpu::index();
            pmu::hw::with_this_cpu(index, |_, host| self.pmu_hw.poll(&mut self.pmu, host));
        }
    }

    /// At the start of a slice: publish the steal time, clear `preempted`, and flush the
    /// guest TLB if another vCPU asked for it meanwhile (KVM PV TLB flush).
    fn pv_slice_start<B: Backend>(&mut self, vm: &Vm, cpu: &mut B) {
        if self.publish_steal(vm) {
            cpu.flush_guest_tlb();
            PvCounters::bump(&vm.counters[self.index].pv.tlb_flushes, 1);
        }
    }

    /// Writes the steal time into the guest's registered area and marks the vCPU running;
    /// returns whether the guest asked for a TLB flush meanwhile (false: no area).
    fn publish_steal(&self, vm: &Vm) -> bool {
        let Some(gpa) = self.pv.steal() else { return false };
        matches!(pv::steal::enter(&vm.mem, gpa, tsc::to_nanos(self.sched.steal)), Ok(true))
    }

    /// Before an entry (KVM PV EOI): when the one interrupt in service may be ended without
    /// an EOI write, set the guest's flag saying so; [`Self::pv_eoi_check`] sees after the
    /// exit whether the guest took the offer (it clears the flag instead of writing EOI).
    fn pv_eoi_offer(&mut self, vm: &Vm) {
        let Some(gpa) = self.pv.pv_eoi() else { return };
        if self.pv.eoi_offered.is_some() || !vm.irq.has_lapics() {
            return;
        }
        let Some(vector) = vm.irq.apic(self.index).lapic.lock().pv_eoi_candidate() else { return };
        if vm.mem.write(gpa, &1u32.to_le_bytes()).is_ok() {
            self.pv.eoi_offered = Some(vector);
        }
    }

    /// After an exit: if the guest cleared the PV EOI flag it ended the interrupt, and Vireo
    /// does the EOI for it; otherwise the offer is withdrawn (the guest's next EOI is a
    /// normal write) and renewed before the next entry if it still holds.
    fn pv_eoi_check(&mut self, vm: &Vm) {
        let Some(_vector) = self.pv.eoi_offered.take() else { return };
        let Some(gpa) = self.pv.pv_eoi() else { return };
        let mut word = [0u8; 4];
        if vm.mem.read(gpa, &mut word).is_err() {
            return;
        }
        if u32::from_le_bytes(word) & 1 != 0 {
            let _ = vm.mem.write(gpa, &0u32.to_le_bytes());
            return;
        }
        let mut lapic = vm.irq.apic(self.index).lapic.lock();
        lapic.eoi();
        self.after_lapic(vm, lapic);
        PvCounters::bump(&vm.counters[self.index].pv.pv_eois, 1);
    }

    /// Moves INIT, SIPI and NMI requests from the local APIC into the vCPU. Returns true if
    /// an INIT reset the vCPU (it now waits for SIPI).
    fn take_apic_events(&mut self, vm: &Vm) -> bool {
        // Cleared before anything is looked at (the PIC included, which raises it too), so
        // a delivery from now on is seen by the exit fast path (`reenter_at_once`).
        let apic = vm.irq.apic(self.index);
        apic.attention.store(false, Ordering::Relaxed);
        if !vm.irq.has_lapics() {
            return false;
        }
        let mut lapic = apic.lapic.lock();
        let init = lapic.take_init();
        let wait = lapic.waiting_for_sipi();
        let sipi = lapic.take_sipi();
        if lapic.take_nmi() {
            self.pending_nmi = true;
        }
        drop(lapic);
        if init {
            // INIT (SDM Vol. 3A §10.1.1, Table 10-1): the registers reset (RDX = the
            // processor signature); an AP waits for SIPI, the BSP restarts at the reset
            // vector. Pending test interrupts and NMIs are forgotten.
            self.regs = GuestRegs { rdx: processor_signature(), ..GuestRegs::default() };
            self.pending_irq = None;
            self.timer = None;
            self.pending_nmi = false;
            if wait {
                vm.set_state(self, VcpuState::WaitForSipi);
                return true;
            }
            // (What INIT keeps and RESET clears, CR0.CD/NW and PAT, is reset too: Vireo
            // does not read the old state back from the backend here.)
            self.load = Some(CpuState::reset());
            vm.set_state(self, VcpuState::Runnable);
        }
        if let Some(vector) = sipi {
            // STARTUP (SDM Vol. 3A §9.4.4.1): real mode at vector << 12.
            self.regs = GuestRegs { rdx: processor_signature(), ..GuestRegs::default() };
            self.load = Some(CpuState::sipi(vector));
            vm.set_state(self, VcpuState::Runnable);
        }
        false
    }

    /// While the vCPU is blocked: whether something woke it (interrupt, NMI, SIPI, INIT,
    /// test timer). Brings its local APIC and the VM's devices to now.
    pub fn poll(&mut self, vm: &Vm) -> bool {
        if vm.ended() {
            return true;
        }
        // The VM's time limit ends it even while every vCPU is blocked (no exit would
        // come to end it): the host timer woke this CPU at the limit (`wake_deadline`).
        if vm.deadline.is_some_and(|d| rdtsc() >= d) {
            vm.stop(VmOutcome::TimedOut);
            return true;
        }
        let init = self.take_apic_events(vm);
        match self.state {
            VcpuState::Runnable => return true,
            VcpuState::Stopped => return false,
            VcpuState::WaitForSipi => return false,
            VcpuState::Halted { .. } if init => return false,
            VcpuState::Halted { if_off } => {
                if self.pending_nmi || vm.irq.apic(self.index).pv_unhalt.swap(false, Ordering::AcqRel) {
                    vm.set_state(self, VcpuState::Runnable);
                    return true;
                }
                if if_off {
                    return false;
                }
            }
        }
        if let Some((deadline, vector)) = self.timer {
            if rdtsc() >= deadline {
                self.pending_irq = Some(vector);
                self.timer = None;
            }
        }
        let now = vm.now();
        vm.tick_devices(now);
        if self.pending_irq.is_some() || self.pending_interrupt(vm, now).is_some() {
            vm.set_state(self, VcpuState::Runnable);
            return true;
        }
        false
    }

    /// The TSC at which a blocked vCPU must be looked at again (its local APIC timer, the
    /// test timer, the VM's devices and time limit).
    pub fn wake_deadline(&self, vm: &Vm) -> Option<u64> {
        let lapic = if vm.irq.has_lapics() {
            vm.irq.apic(self.index).lapic.lock().next_deadline().map(|t| vm.tsc_at(t))
        } else {
            None
        };
        let timer = self.timer.map(|(t, _)| t);
        [lapic, timer, vm.device_deadline_tsc(), vm.deadline].into_iter().flatten().min()
    }

    /// Keeps the host's one-shot timer at the earliest moment Vireo must regain control
    /// from a guest that does not exit by itself: the slice's end, the VM's time limit, a
    /// device timer, the local APIC timer.
    fn arm_host_timer<B: Backend>(&mut self, vm: &Vm, cpu: &mut B, slice_end: u64) {
        // The self-test device's timer is deliberately left out: it fires at the guest's next
        // exit or HLT after its delay (guest-abi), which keeps `sti; hlt` tests deterministic.
        let lapic = if vm.irq.has_lapics() {
            vm.irq.apic(self.index).lapic.lock().next_deadline().map(|t| vm.tsc_at(t))
        } else {
            None
        };
        let device_raw = vm.device_deadline_raw();
        let device = (device_raw != u64::MAX).then(|| vm.tsc_at(Nanos(device_raw)));
        // A cycle counter that will overflow with a PMI: the guest must exit by then.
        let pmu = self.pmu.ticks_to_overflow().map(|t| rdtsc().saturating_add(t));
        let want = [vm.deadline, device, lapic, pmu].into_iter().flatten().fold(slice_end, u64::min);
        cpu.set_deadline(Some(want));
        if Some(want) != self.armed {
            crate::arch::lapic::arm(want);
            self.armed = Some(want);
        }
        // The exit fast path goes back to the slow path by then (the test timer included).
        self.device_seen = device_raw;
        self.fast_until = self.timer.map_or(want, |(t, _)| t.min(want));
    }

    /// The interrupt vector the vCPU would take now: its local APIC's when enabled, the
    /// PIC's (vCPU 0 only) when the APIC passes it on (disabled, or LINT0 in ExtINT mode).
    fn pending_interrupt(&self, vm: &Vm, now: Nanos) -> Option<u8> {
        let pic = |vm: &Vm| if self.index == 0 { vm.irq.pic_pending() } else { None };
        if !vm.irq.has_lapics() {
            return pic(vm);
        }
        let mut lapic = vm.irq.apic(self.index).lapic.lock();
        lapic.tick(now);
        let (pending, enabled, extint) =
            (lapic.pending(), lapic.hw_enabled() && lapic.sw_enabled(), lapic.accepts_pic_interrupts());
        self.after_lapic(vm, lapic);
        match (enabled, extint) {
            (true, false) => pending,
            (true, true) => pending.or_else(|| pic(vm)),
            _ => pic(vm),
        }
    }

    /// The interrupt acknowledge cycle for [`Vcpu::pending_interrupt`].
    fn acknowledge(&self, vm: &Vm) -> Option<u8> {
        let pic = |vm: &Vm| if self.index == 0 { vm.irq.pic_acknowledge() } else { None };
        if !vm.irq.has_lapics() {
            return pic(vm);
        }
        let mut lapic = vm.irq.apic(self.index).lapic.lock();
        let enabled = lapic.hw_enabled() && lapic.sw_enabled();
        if enabled && lapic.pending().is_some() {
            return lapic.acknowledge();
        }
        let extint = lapic.accepts_pic_interrupts();
        drop(lapic);
        if enabled && !extint {
            None
        } else {
            pic(vm)
        }
    }

    /// After a local APIC access: IPIs it sent go out, EOIs of level-triggered vectors go to
    /// the I/O APIC (both after the APIC's lock is released: lock order).
    fn after_lapic<'a>(&self, vm: &'a Vm, mut lapic: spin::MutexGuard<'a, LocalApic>) {
        loop {
            let mut eois = [0u8; 4];
            let mut ipis = [None; 4];
            let n_eoi = eois.iter_mut().map_while(|e| lapic.eoi_broadcast_vector().map(|v| *e = v)).count();
            let n_ipi = ipis.iter_mut().map_while(|i| lapic.take_ipi().map(|m| *i = Some(m))).count();
            drop(lapic);
            for v in &eois[..n_eoi] {
                vm.irq.eoi(*v);
            }
            for ipi in ipis.iter().flatten() {
                vm.irq.deliver(Some(self.index), ipi);
            }
            if n_eoi < eois.len() && n_ipi < ipis.len() {
                return;
            }
            lapic = vm.irq.apic(self.index).lapic.lock();
        }
    }

    /// Injects a pending event if the guest can take it, else asks for a window.
    fn deliver_events<B: Backend>(&mut self, vm: &Vm, cpu: &mut B) {
        if let Some((deadline, vector)) = self.timer {
            if rdtsc() >= deadline {
                self.pending_irq = Some(vector);
                self.timer = None;
            }
        }
        if cpu.event_pending() {
            return;
        }
        if self.pending_nmi {
            // NMI blocking (until IRET) is not tracked: Linux sends NMIs only for backtraces.
            self.pending_nmi = false;
            self.inject(cpu, Event::Nmi);
            return;
        }
        let now = vm.now();
        vm.tick_devices(now);
        let device = self.pending_interrupt(vm, now);
        if device.is_none() && self.pending_irq.is_none() {
            return;
        }
        if !cpu.interruptible() {
            cpu.set_interrupt_window(true);
            return;
        }
        cpu.set_interrupt_window(false);
        if device.is_some() {
            if let Some(vector) = self.acknowledge(vm) {
                self.inject(cpu, Event::Interrupt { vector });
                return;
            }
        }
        if let Some(vector) = self.pending_irq.take() {
            self.inject(cpu, Event::Interrupt { vector });
        }
    }

    /// The one exit dispatch.
    fn handle<B: Backend>(&mut self, vm: &Vm, cpu: &mut B, exit: &Exit) -> Flow {
        match exit.kind {
            ExitKind::Cpuid => {
                let (leaf, subleaf) = (self.regs.rax as u32, self.regs.rcx as u32);
                let ctx = CpuidContext {
                    osxsave: cpu.cr4() & CR4_OSXSAVE != 0,
                    apic_id: self.index as u8,
                    native_vmmcall: vm.native_vmmcall,
                    tsc_khz: tsc::hz() / 1000,
                    apic: vm.irq.has_lapics(),
                    kvm_pv: vm.pv.kvm(),
                    pmu: self.pmu.on(),
                    pmu_hw: if self.pmu.hardware() { pmu::hw::host() } else { None },
                };
                let r = match pv::kvm::cpuid(leaf, &vm.pv) {
                    Some(r) => r,
                    None => cpuid::filter(leaf, subleaf, cpuid::host(leaf, subleaf), &ctx),
                };
                self.regs.rax = r.eax as u64;
                self.regs.rbx = r.ebx as u64;
                self.regs.rcx = r.ecx as u64;
                self.regs.rdx = r.edx as u64;
                cpu.set_rip(exit.next_rip);
            }
            ExitKind::Rdmsr => {
                let msr_index = self.regs.rcx as u32;
                let outcome = match msr_index {
                    MSR_TSC_DEADLINE | MSR_APIC_BASE | X2APIC_MSR_FIRST..=X2APIC_MSR_LAST if vm.irq.has_lapics() => {
                        let now = vm.now();
                        let mut lapic = vm.irq.apic(self.index).lapic.lock();
                        let r = if msr_index == MSR_TSC_DEADLINE {
                            Ok(lapic.read_tsc_deadline(now))
                        } else {
                            lapic.msr_read(msr_index, now).map_err(|_| ())
                        };
                        drop(lapic);
                        match r {
                            Ok(v) => msr::MsrOutcome::Ok(v),
                            Err(()) => msr::MsrOutcome::Fault,
                        }
                    }
                    msr::IA32_EFER => msr::MsrOutcome::Ok(cpu.efer()),
                    msr::IA32_PAT => msr::MsrOutcome::Ok(cpu.pat()),
                    i if pv::kvm::is_pv_msr(&vm.pv, i) => {
                        msr::MsrOutcome::Ok(pv::kvm::rdmsr(&self.pv, self.wall_clock_msr, i))
                    }
                    guest_abi::hypercall::page::MSR => msr::MsrOutcome::Ok(pv::page::read(&vm.pv)),
                    // The hardware path: the loaded counters' values first.
                    i if self.pmu_hw.loaded_on().is_some() && self.pmu.claims(i) => {
                        self.pmu_hw_sync();
                        match self.pmu.read(i) {
                            pmu::Access::Ok(v) => msr::MsrOutcome::Ok(v),
                            _ => msr::MsrOutcome::Fault,
                        }
                    }
                    i => match self.pmu.read(i) {
                        pmu::Access::Ok(v) => msr::MsrOutcome::Ok(v),
                        pmu::Access::Gp => msr::MsrOutcome::Fault,
                        pmu::Access::NotPmu => msr::read(&self.msrs, i, rdtsc()),
                    },
                };
                match outcome {
                    msr::MsrOutcome::Ok(v) => {
                        self.regs.rax = v & 0xFFFF_FFFF;
                        self.regs.rdx = v >> 32;
                        cpu.set_rip(exit.next_rip);
                    }
                    msr::MsrOutcome::Fault => self.inject(cpu, Event::GP0),
                }
            }
            ExitKind::Wrmsr => {
                let msr_index = self.regs.rcx as u32;
                let value = (self.regs.rdx << 32) | (self.regs.rax & 0xFFFF_FFFF);
                let outcome = match msr_index {
                    MSR_TSC_DEADLINE | MSR_APIC_BASE | X2APIC_MSR_FIRST..=X2APIC_MSR_LAST if vm.irq.has_lapics() => {
                        let now = vm.now();
                        let mut lapic = vm.irq.apic(self.index).lapic.lock();
                        let r = if msr_index == MSR_TSC_DEADLINE {
                            // A TSC_DEADLINE value is a TSC reading (the guest runs on the host TSC).
                            let at = Nanos(tsc::to_nanos(value.saturating_sub(vm.start_tsc)));
                            lapic.write_tsc_deadline(value, at, now);
                            Ok(())
                        } else {
                            lapic.msr_write(msr_index, value, now).map_err(|_| ())
                        };
                        self.after_lapic(vm, lapic);
                        match r {
                            Ok(()) => msr::MsrOutcome::Ok(value),
                            Err(()) => msr::MsrOutcome::Fault,
                        }
                    }
                    msr::IA32_EFER => {
                        let r = msr::write_efer(cpu.efer(), value, cpu.cr0());
                        if let msr::MsrOutcome::Ok(efer) = r {
                            cpu.set_efer(efer);
                        }
                        r
                    }
                    msr::IA32_PAT if msr::valid_pat(value) => {
                        cpu.set_pat(value);
                        msr::MsrOutcome::Ok(value)
                    }
                    msr::IA32_PAT => msr::MsrOutcome::Fault,
                    i if pv::kvm::is_pv_msr(&vm.pv, i) => self.pv_wrmsr(vm, i, value),
                    guest_abi::hypercall::page::MSR => match pv::page::write(&vm.pv, &vm.mem, value, vm.native_vmmcall)
                    {
                        Ok(()) => msr::MsrOutcome::Ok(value),
                        Err(pv::Gp) => msr::MsrOutcome::Fault,
                    },
                    // The hardware path: the counters are saved before the write and loaded
                    // again after it (if one is live then).
                    i if self.pmu.hardware() && self.pmu.claims(i) => {
                        self.pmu_hw_save(cpu);
                        let r = self.pmu.write(i, value);
                        self.pmu_hw_load(cpu);
                        match r {
                            pmu::Access::Ok(v) => msr::MsrOutcome::Ok(v),
                            _ => msr::MsrOutcome::Fault,
                        }
                    }
                    i => match self.pmu.write(i, value) {
                        pmu::Access::Ok(v) => msr::MsrOutcome::Ok(v),
                        pmu::Access::Gp => msr::MsrOutcome::Fault,
                        pmu::Access::NotPmu => msr::write(&mut self.msrs, i, value),
                    },
                };
                match outcome {
                    msr::MsrOutcome::Ok(_) => cpu.set_rip(exit.next_rip),
                    msr::MsrOutcome::Fault => self.inject(cpu, Event::GP0),
                }
            }
            ExitKind::Rdpmc => {
                // CR4.PCE = 0 makes RDPMC privileged (SDM Vol. 2B RDPMC; the CPU checks this
                // before the exit, checked again here); an index naming no counter is #GP.
                let allowed = cpu.cpl() == 0 || cpu.cr4() & CR4_PCE != 0;
                self.pmu_hw_sync();
                match self.pmu.rdpmc(self.regs.rcx as u32).filter(|_| allowed) {
                    Some(v) => {
                        self.regs.rax = v & 0xFFFF_FFFF;
                        self.regs.rdx = v >> 32;
                        cpu.set_rip(exit.next_rip);
                    }
                    None => self.inject(cpu, Event::GP0),
                }
            }
            ExitKind::Io(io) => return self.port_io(vm, cpu, io, exit),
            ExitKind::Hypercall(_) => return self.hypercall(vm, cpu, exit.next_rip),
            ExitKind::Hlt => {
                cpu.set_rip(exit.next_rip);
                return self.halt(vm, cpu);
            }
            ExitKind::Xsetbv => self.xsetbv(cpu, exit),
            ExitKind::NestedPageFault(access) => return self.mmio_access(vm, cpu, access, exit),
            ExitKind::Exception { vector: VECTOR_UD, .. } => {
                // The other vendor's hypercall instruction faults with #UD: accept it.
                let mut insn = [0u8; 3];
                if self.fetch(vm, cpu, exit.rip, &mut insn) == 3
                    && matches!(insn, [0x0F, 0x01, 0xC1] | [0x0F, 0x01, 0xD9])
                {
                    return self.hypercall(vm, cpu, exit.rip.wrapping_add(3));
                }
                return self.reflect(cpu, VECTOR_UD, None);
            }
            ExitKind::Exception { vector, error_code } => return self.reflect(cpu, vector, error_code),
            ExitKind::TripleFault => {
                self.report_fault_state(vm, cpu, exit);
                return Flow::Stop(VmOutcome::TripleFault { vcpu: self.index });
            }
            // A host interrupt (timer, kick) or NMI: the exit itself was all that was needed.
            // A host interrupt: the hardware acknowledged it (VMX), so it is handled here;
            // one still pending in the APIC (SVM) is taken before the next entry.
            ExitKind::ExternalInterrupt { vector: Some(v) } => crate::arch::interrupts::handle(v),
            // A host interrupt still pending, a host NMI, PAUSE or a CR access the backend
            // completed: the exit itself was all that was needed.
            ExitKind::ExternalInterrupt { vector: None } | ExitKind::Nmi | ExitKind::ControlRegister => {}
            // A spin loop (pause-loop exiting): PAUSE is done, and the rest of the slice goes
            // to another vCPU of this host CPU, perhaps the lock holder the spinner waits for.
            ExitKind::Pause => {
                cpu.set_rip(exit.next_rip);
                return Flow::Yield;
            }
            // The window is open: the request is fulfilled (left set, SVM's V_IRQ would keep
            // exiting); the pending interrupt is injected before the next entry.
            ExitKind::InterruptWindow => cpu.set_interrupt_window(false),
            // Physical INIT/SIPI signals (not the guest's: those go through its local APIC).
            ExitKind::Init | ExitKind::Sipi { .. } => {}
            ExitKind::EntryFailed { reason, .. } => return Flow::Stop(VmOutcome::Fatal { reason }),
            ExitKind::Unhandled => return Flow::Stop(VmOutcome::Fatal { reason: "exit Vireo does not handle" }),
        }
        Flow::Continue
    }

    /// For a guest that shut down: its control registers, and whether its own page tables,
    /// read from its RAM, map the RIP it died at (if they do, the CPU saw something else
    /// than what is in memory; if not, the tables or CR3 are what broke).
    fn report_fault_state<B: Backend>(&self, vm: &Vm, cpu: &B, exit: &Exit) {
        let paging = GuestPaging { cr0: cpu.cr0(), cr3: cpu.cr3(), cr4: cpu.cr4(), efer: cpu.efer() };
        let walk = walk::translate(&vm.mem, paging, exit.rip);
        // The last #PF's address, and what the tables in RAM say of it now.
        let cr2 = cpu.cr2();
        let cr2_walk = walk::translate(&vm.mem, paging, cr2);
        let cs = cpu.segment(SegReg::Cs);
        let tr = cpu.segment(SegReg::Tr);
        crate::report!(
            "vm name={} fault-state vcpu={} rip={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} rflags={:#x} cpl={} cs={:#x} tr_base={:#x} rip_walk={:?} cr2={:#x} cr2_walk={:?}",
            vm.name,
            self.index,
            exit.rip,
            paging.cr0,
            paging.cr3,
            paging.cr4,
            paging.efer,
            cpu.rflags(),
            cpu.cpl(),
            cs.selector,
            tr.base,
            walk,
            cr2,
            cr2_walk
        );
    }

    /// Delivers an intercepted exception to the guest. If the exit interrupted the delivery
    /// of another event, the two combine as the CPU would combine them (#DF, or shutdown);
    /// an interrupted external interrupt is kept pending and delivered after.
    fn reflect<B: Backend>(&mut self, cpu: &mut B, vector: u8, error_code: Option<u32>) -> Flow {
        if let Some(first) = cpu.pending_event() {
            match merge(first, vector) {
                Merge::TripleFault => return Flow::Stop(VmOutcome::TripleFault { vcpu: self.index }),
                Merge::DoubleFault => {
                    self.inject(cpu, Event::Exception { vector: VECTOR_DF, error_code: Some(0) });
                    return Flow::Continue;
                }
                Merge::Serial => {
                    if let Event::Interrupt { vector } = first {
                        self.pending_irq = Some(vector);
                    }
                }
            }
        }
        self.inject(cpu, Event::Exception { vector, error_code });
        Flow::Continue
    }

    fn port_io<B: Backend>(&mut self, vm: &Vm, cpu: &mut B, io: IoAccess, exit: &Exit) -> Flow {
        if io.string {
            return self.string_io(vm, cpu, io, exit);
        }
        let mask = match io.size {
            1 => 0xFF,
            2 => 0xFFFF,
            _ => 0xFFFF_FFFF,
        };
        if io.write {
            if let Some(stop) = self.port_out(vm, io.port, io.size, self.regs.rax & mask) {
                return stop;
            }
        } else {
            let v = self.port_in(vm, io.port, io.size);
            // IN AL/AX keeps the other bits; IN EAX zero-extends into RAX.
            self.regs.rax = if io.size == 4 { v & mask } else { (self.regs.rax & !mask) | (v & mask) };
        }
        cpu.set_rip(exit.next_rip);
        Flow::Continue
    }

    /// One OUT of `size` bytes of `value` to `port`: a device on the bus, or Vireo's own
    /// ports. `Some`: the write ended the VM (power-off, reset, debug exit).
    fn port_out(&mut self, vm: &Vm, port: u16, size: u8, value: u64) -> Option<Flow> {
        let cx = vm.ctx();
        let done = vm.bus.write_with_deadline(Space::Port, port as u64, size, value, &cx);
        self.io_on_bus = done.is_some();
        match done {
            Some((effect, deadline)) => {
                vm.note_device_deadline(deadline);
                match effect {
                    BusEffect::PowerOff => return Some(Flow::Stop(VmOutcome::PoweredOff)),
                    BusEffect::Reset => return Some(Flow::Stop(VmOutcome::Reset)),
                    BusEffect::Exit(status) => return Some(Flow::Stop(VmOutcome::Exited { status })),
                    BusEffect::None => {}
                }
            }
            None => self.simple_port_write(vm, port, size, value as u32),
        }
        None
    }

    /// One IN of `size` bytes from `port`.
    fn port_in(&mut self, vm: &Vm, port: u16, size: u8) -> u64 {
        let cx = vm.ctx();
        let done = vm.bus.read_with_deadline(Space::Port, port as u64, size, &cx);
        self.io_on_bus = done.is_some();
        match done {
            Some((v, deadline)) => {
                vm.note_device_deadline(deadline);
                v
            }
            None => ports::read(port, size, vm.testdev.lock().read()) as u64,
        }
    }

    /// INS/OUTS, with or without REP: the instruction is decoded for its address size,
    /// segment and length (`string_io`), each element goes through the guest's segment base
    /// and page tables to its RAM. A REP with many elements is done in batches: the vCPU
    /// re-executes the instruction for the rest (RIP stays), as the CPU allows interrupts
    /// between iterations, so neither a huge rCX nor pending interrupts wait on it.
    /// An element on a not-present page gets the guest a #PF; segment limits are not checked;
    /// an element on guest-physical space without RAM stops the VM.
    fn string_io<B: Backend>(&mut self, vm: &Vm, cpu: &mut B, io: IoAccess, exit: &Exit) -> Flow {
        const BATCH: u64 = 4096;
        let mut bytes = [0u8; 15];
        let n = self.fetch(vm, cpu, exit.rip, &mut bytes);
        let cs = cpu.segment(SegReg::Cs);
        let long = cpu.efer() & EFER_LMA != 0 && cs.attr.0 & SegAttr::LONG != 0;
        let bitness = if long {
            64
        } else if cs.attr.0 & SegAttr::DB != 0 {
            32
        } else {
            16
        };
        let op = match string_io::decode(&bytes[..n], bitness) {
            Ok(op) if op.size == io.size && op.ins != io.write => op,
            Ok(_) => return Flow::Stop(VmOutcome::Fatal { reason: "string I/O exit does not match its instruction" }),
            Err(e) => {
                log::warn!("vm {}: at rip {:#x}: {e}", vm.name, exit.rip);
                return Flow::Stop(VmOutcome::Fatal { reason: "cannot decode the string I/O instruction" });
            }
        };
        let amask = string_io::mask(op.addr_size);
        let mut left = if op.rep { self.regs.rcx & amask } else { 1 };
        // In 64-bit mode only FS and GS have bases.
        let base = if long && !matches!(op.seg, SegReg::Fs | SegReg::Gs) { 0 } else { cpu.segment(op.seg).base };
        let paging = GuestPaging { cr0: cpu.cr0(), cr3: cpu.cr3(), cr4: cpu.cr4(), efer: cpu.efer() };
        let step: i64 = if cpu.rflags() & RFLAGS_DF != 0 { -(op.size as i64) } else { op.size as i64 };
        let mut done = 0;
        while left > 0 && done < BATCH {
            let index = if op.ins { self.regs.rdi } else { self.regs.rsi };
            let mut linear = base.wrapping_add(index & amask);
            if !long {
                linear &= 0xFFFF_FFFF;
            }
            // Each byte through the page tables (an element may straddle a page).
            let mut gpas = [0u64; 4];
            for (i, g) in gpas[..op.size as usize].iter_mut().enumerate() {
                let at = linear.wrapping_add(i as u64);
                match walk::translate(&vm.mem, paging, at) {
                    Ok(gpa) => *g = gpa,
                    Err(walk::WalkError::NotPresent) => {
                        // A #PF as the CPU raises it for this element (SDM Vol. 3A §4.7: W for
                        // INS's store, U at CPL 3, P clear); the elements done so far stay
                        // done, RIP stays on the instruction (a fault).
                        let code = (PF_WRITE * op.ins as u32) | (PF_USER * (cpu.cpl() == 3) as u32);
                        cpu.set_cr2(at);
                        return self.reflect(cpu, VECTOR_PF, Some(code));
                    }
                    Err(_) => {
                        return Flow::Stop(VmOutcome::Fatal {
                            reason: "string I/O through guest page tables outside RAM or in an unwalked mode",
                        })
                    }
                }
            }
            let mut data = [0u8; 4];
            if op.ins {
                let v = self.port_in(vm, io.port, op.size);
                data = (v as u32).to_le_bytes();
                for (i, g) in gpas[..op.size as usize].iter().enumerate() {
                    if vm.mem.write(*g, &data[i..i + 1]).is_err() {
                        return Flow::Stop(VmOutcome::Fatal {
                            reason: "string I/O to guest-physical space with no RAM",
                        });
                    }
                }
                self.regs.rdi = string_io::add(self.regs.rdi, op.addr_size, step);
            } else {
                for (i, g) in gpas[..op.size as usize].iter().enumerate() {
                    if vm.mem.read(*g, &mut data[i..i + 1]).is_err() {
                        return Flow::Stop(VmOutcome::Fatal {
                            reason: "string I/O from guest-physical space with no RAM",
                        });
                    }
                }
                self.regs.rsi = string_io::add(self.regs.rsi, op.addr_size, step);
            }
            left -= 1;
            done += 1;
            if op.rep {
                self.regs.rcx = string_io::add(self.regs.rcx, op.addr_size, -1);
            }
            if !op.ins {
                if let Some(stop) = self.port_out(vm, io.port, op.size, u32::from_le_bytes(data) as u64) {
                    return stop;
                }
            }
        }
        if left == 0 {
            cpu.set_rip(exit.rip.wrapping_add(op.len as u64));
        }
        Flow::Continue
    }

    /// Port writes outside the bus: Vireo's debug console and test devices; the rest behave
    /// like an empty ISA bus.
    fn simple_port_write(&mut self, vm: &Vm, port: u16, size: u8, value: u32) {
        match ports::write(port, size, value) {
            PortEffect::ConsoleByte(b) => vm.console_write(&[b]),
            PortEffect::TestDevice(v) => vm.testdev.lock().write(v),
            PortEffect::TestIrq(v) => match IrqRequest::decode(v) {
                Some(IrqRequest { vector, delay_tsc: 0 }) => self.pending_irq = Some(vector),
                Some(IrqRequest { vector, delay_tsc }) => self.timer = Some((rdtsc() + delay_tsc, vector)),
                None => {}
            },
            PortEffect::None => {}
        }
    }

    /// WRMSR of a KVM PV MSR.
    fn pv_wrmsr(&mut self, vm: &Vm, index: u32, value: u64) -> msr::MsrOutcome {
        match pv::kvm::wrmsr(&vm.pv, &vm.mem, &mut self.pv, vm.start_tsc, index, value) {
            Ok(effect) => {
                match effect {
                    pv::kvm::MsrEffect::StealEnabled => {
                        // A fresh area: nothing can have asked for a flush through it yet.
                        self.publish_steal(vm);
                    }
                    pv::kvm::MsrEffect::WallClock(v) => self.wall_clock_msr = v,
                    pv::kvm::MsrEffect::None => {}
                }
                msr::MsrOutcome::Ok(value)
            }
            Err(pv::Gp) => msr::MsrOutcome::Fault,
        }
    }

    fn hypercall<B: Backend>(&mut self, vm: &Vm, cpu: &mut B, next_rip: u64) -> Flow {
        // Outside 64-bit mode only the low 32 bits of each register count.
        let long = cpu.long_mode();
        let t = |v: u64| if long { v } else { v & 0xFFFF_FFFF };
        let r = self.regs;
        let (number, args) = (t(r.rax), [t(r.rbx), t(r.rcx), t(r.rdx), t(r.rsi)]);
        let cpl = cpu.cpl();
        if let Some(call) = pv::kvm::hypercall(&vm.pv, number, args, cpl, vm.vcpus.len()) {
            let c = &vm.counters[self.index].pv;
            let (ret, flow) = match call {
                pv::kvm::Hypercall::Return(v) => (v, Flow::Continue),
                pv::kvm::Hypercall::Yield(v) => {
                    PvCounters::bump(&c.yields, 1);
                    (v, Flow::Yield)
                }
                pv::kvm::Hypercall::Kick(n) => {
                    vm.irq.pv_kick(n);
                    PvCounters::bump(&c.kicks, 1);
                    (0, Flow::Continue)
                }
                pv::kvm::Hypercall::SendIpi(mask, msg) => {
                    let n = vm.irq.deliver_mask(mask, &msg);
                    PvCounters::bump(&c.pv_ipis, 1);
                    PvCounters::bump(&c.pv_ipi_targets, n as u64);
                    (n as i64, Flow::Continue)
                }
            };
            self.regs.rax = t(ret as u64);
            cpu.set_rip(next_rip);
            return flow;
        }
        // The calls that need no context (PING, VERSION) are answered without building it.
        if let Some(hypercall::Outcome::Return(v)) = hypercall::handle_simple(number, args, cpl) {
            self.regs.rax = t(v as u64);
            cpu.set_rip(next_rip);
            return Flow::Continue;
        }
        let mut out = |bytes: &[u8]| vm.console_write(bytes);
        let mut cx = hypercall::Context {
            mem: &vm.mem,
            counters: &vm.counters,
            vcpu: self.index,
            start_tsc: vm.start_tsc,
            now_tsc: rdtsc(),
            tsc_khz: tsc::hz() / 1000,
            features: cpuid::vireo_features(vm.pv.kvm()),
            console: &mut out,
        };
        match hypercall::handle(number, args, cpl, &mut cx) {
            hypercall::Outcome::Return(v) => {
                self.regs.rax = t(v as u64);
                cpu.set_rip(next_rip);
                Flow::Continue
            }
            hypercall::Outcome::Exit(status) => Flow::Stop(VmOutcome::Exited { status }),
            hypercall::Outcome::Reset => Flow::Stop(VmOutcome::Reset),
        }
    }

    /// HLT (RIP already past it): the vCPU blocks until an interrupt it can take arrives.
    fn halt<B: Backend>(&mut self, vm: &Vm, cpu: &mut B) -> Flow {
        // A KICK_CPU that came before the HLT (PV spinlocks): the wait is already over.
        if vm.pv.kvm() && vm.irq.apic(self.index).pv_unhalt.swap(false, Ordering::AcqRel) {
            return Flow::Continue;
        }
        let if_off = cpu.rflags() & RFLAGS_IF == 0;
        if !if_off && (self.pending_irq.is_some() || self.pending_interrupt(vm, vm.now()).is_some()) {
            return Flow::Continue;
        }
        let wakeable = vm.irq.has_lapics() || vm.has_platform() || self.timer.is_some();
        if !if_off && !wakeable {
            // No interrupt source exists that could ever wake it.
            return Flow::Stop(VmOutcome::Halted);
        }
        vm.set_state(self, VcpuState::Halted { if_off });
        if vm.all_blocked_for_good() {
            // Every vCPU halted with interrupts off or waits for SIPI: nothing can wake any.
            return Flow::Stop(VmOutcome::Halted);
        }
        Flow::Block
    }

    fn xsetbv<B: Backend>(&mut self, cpu: &mut B, exit: &Exit) {
        if cpu.cr4() & CR4_OSXSAVE == 0 {
            self.inject(cpu, Event::UD);
            return;
        }
        let value = (self.regs.rdx << 32) | (self.regs.rax & 0xFFFF_FFFF);
        if cpu.cpl() != 0 || self.regs.rcx as u32 != 0 || !fpu::valid_xcr0(value, fpu::supported_xcr0()) {
            self.inject(cpu, Event::GP0);
            return;
        }
        // SAFETY: validated against the CPU's supported components; Vireo is soft-float,
        // so the guest's XCR0 can stay loaded while Vireo runs.
        unsafe { fpu::xsetbv(value) };
        self.fpu.xcr0 = value;
        cpu.set_rip(exit.next_rip);
    }

    /// Copies up to `buf.len()` instruction bytes at guest-virtual `rip`; returns how many
    /// could be read (stops at an unmapped page or the end of RAM).
    fn fetch<B: Backend>(&self, vm: &Vm, cpu: &B, rip: u64, buf: &mut [u8]) -> usize {
        let paging = GuestPaging { cr0: cpu.cr0(), cr3: cpu.cr3(), cr4: cpu.cr4(), efer: cpu.efer() };
        let mut done = 0;
        while done < buf.len() {
            let va = rip.wrapping_add(done as u64);
            let Ok(pa) = walk::translate(&vm.mem, paging, va) else { break };
            let in_page = (0x1000 - (va & 0xFFF)) as usize;
            let n = in_page.min(buf.len() - done);
            if vm.mem.read(pa, &mut buf[done..done + n]).is_err() {
                break;
            }
            done += n;
        }
        done
    }

    /// A guest access to guest-physical space with no RAM: this vCPU's local APIC page, a
    /// device on the bus, or nothing (reads return all ones, writes are dropped, as an empty
    /// PC bus does), after decoding the instruction.
    fn mmio_access<B: Backend>(&mut self, vm: &Vm, cpu: &mut B, access: NptAccess, exit: &Exit) -> Flow {
        if vm.mem.contains(access.gpa, 1) {
            // First touch of a lazily populated chunk of RAM: zero and map it, then let the
            // guest retry the access (or the event delivery the backend re-queued).
            if vm.mem.populate_at(access.gpa) && vm.mem.host_addr_populated(access.gpa) {
                return Flow::Continue;
            }
            return Flow::Stop(VmOutcome::Fatal { reason: "nested page fault inside guest RAM" });
        }
        if access.fetch {
            return Flow::Stop(VmOutcome::Fatal { reason: "instruction fetch from guest-physical space with no RAM" });
        }
        let mut bytes = [0u8; 15];
        let n = self.fetch(vm, cpu, exit.rip, &mut bytes);
        let cs = cpu.segment(SegReg::Cs);
        let bitness = if cpu.efer() & EFER_LMA != 0 && cs.attr.0 & SegAttr::LONG != 0 {
            64
        } else if cs.attr.0 & SegAttr::DB != 0 {
            32
        } else {
            16
        };
        let decoded = match mmio::decode(&bytes[..n], exit.rip, bitness, &self.regs) {
            Ok(d) => d,
            Err(e) => {
                log::warn!("vm {}: at rip {:#x} gpa {:#x}: {e}", vm.name, exit.rip, access.gpa);
                return Flow::Stop(VmOutcome::Fatal { reason: "cannot emulate the instruction of an MMIO access" });
            }
        };
        let mut effect = BusEffect::None;
        let gpa = access.gpa;
        let result = match decoded.access {
            mmio::Access::Load { size, dest } => {
                let v = self.device_access(vm, gpa, size, None, &mut effect);
                mmio::complete_load(&mut self.regs, size, dest, v.unwrap_or(u64::MAX));
                v
            }
            mmio::Access::Store { size, value } => self.device_access(vm, gpa, size, Some(value), &mut effect),
            mmio::Access::Alu { size, op, operand, to } => {
                // One read, then one write for the forms that write the device back.
                let v = self.device_access(vm, gpa, size, None, &mut effect);
                let mut rflags = cpu.rflags();
                let back =
                    mmio::complete_alu(&mut self.regs, &mut rflags, size, op, operand, to, v.unwrap_or(u64::MAX));
                cpu.set_rflags(rflags);
                if let Some(w) = back {
                    self.device_access(vm, gpa, size, Some(w), &mut effect);
                }
                v
            }
            mmio::Access::Exchange { size, dest, value } => {
                let v = self.device_access(vm, gpa, size, None, &mut effect);
                mmio::complete_load(&mut self.regs, size, dest, v.unwrap_or(u64::MAX));
                self.device_access(vm, gpa, size, Some(value), &mut effect);
                v
            }
        };
        if result.is_none() && self.unassigned_reported < 4 {
            self.unassigned_reported += 1;
            log::info!(
                "vm {}: {} unassigned guest-physical {:#x} at rip {:#x}: {}",
                vm.name,
                if access.write { "write to" } else { "read from" },
                access.gpa,
                exit.rip,
                if access.write { "dropped" } else { "reads all ones" }
            );
        }
        cpu.set_rip(exit.rip.wrapping_add(decoded.len as u64));
        match effect {
            BusEffect::PowerOff => Flow::Stop(VmOutcome::PoweredOff),
            BusEffect::Reset => Flow::Stop(VmOutcome::Reset),
            BusEffect::Exit(status) => Flow::Stop(VmOutcome::Exited { status }),
            BusEffect::None => Flow::Continue,
        }
    }

    /// One device access of an emulated MMIO instruction: a read (`value` None) or a write,
    /// to this vCPU's local APIC or the bus. `None`: nothing decodes `gpa` (a read gets all
    /// ones). A bus effect (power off, reset, exit) is kept in `effect`.
    fn device_access(
        &mut self,
        vm: &Vm,
        gpa: u64,
        size: u8,
        value: Option<u64>,
        effect: &mut BusEffect,
    ) -> Option<u64> {
        if let Some(v) = self.lapic_mmio(vm, gpa, value) {
            return Some(v);
        }
        let cx = vm.ctx();
        let done = match value {
            Some(v) => vm.bus.write_with_deadline(Space::Mmio, gpa, size, v, &cx).map(|(e, d)| {
                if !matches!(e, BusEffect::None) {
                    *effect = e;
                }
                (0, d)
            }),
            None => vm.bus.read_with_deadline(Space::Mmio, gpa, size, &cx),
        };
        done.map(|(v, deadline)| {
            vm.note_device_deadline(deadline);
            v
        })
    }

    /// An access to this vCPU's xAPIC page, if `gpa` is in it (each vCPU sees its own local
    /// APIC at the same address).
    fn lapic_mmio(&self, vm: &Vm, gpa: u64, value: Option<u64>) -> Option<u64> {
        if !vm.irq.has_lapics() {
            return None;
        }
        let mut lapic = vm.irq.apic(self.index).lapic.lock();
        let base = lapic.mmio_base()?;
        if !(base..base + 0x1000).contains(&gpa) {
            return None;
        }
        let offset = (gpa & 0xFFF) as u32;
        let now = vm.now();
        let r = match value {
            Some(v) => {
                lapic.mmio_write(offset, v as u32, now);
                0
            }
            None => lapic.mmio_read(offset, now) as u64,
        };
        self.after_lapic(vm, lapic);
        Some(r)
    }
}

#[cfg(test)]
mod tests;
