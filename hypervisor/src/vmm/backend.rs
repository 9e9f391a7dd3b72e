//! What the vendor-neutral core needs from a hardware backend (`svm::SvmVcpu`,
//! `vmx::VmxVcpu`). Backends only translate: hardware state to [`Exit`] and back. Every
//! decision (what a CPUID returns, which MSR faults) is made once, in the core.

use super::{
    exit::{Event, Exit},
    fast::{FastExits, Floor},
    regs::GuestRegs,
    state::{CpuState, SegReg, Segment},
};

/// A backend's construction or entry error, as readable text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendError(pub &'static str);

impl core::fmt::Display for BackendError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.0)
    }
}

/// One virtual CPU on one hardware backend.
pub trait Backend {
    /// Loads an architectural starting state (also used for resets).
    fn load_state(&mut self, state: &CpuState);

    /// Enters the guest with `regs` and runs it until the next exit. On return `regs`
    /// holds the guest's registers at the exit and any pending event was delivered or is
    /// still reported by [`Backend::event_pending`].
    fn run(&mut self, regs: &mut GuestRegs) -> Exit;

    /// Enters the guest like [`Backend::run`], but offers each hypercall exit by the CPU's
    /// native instruction with nothing else to report (no event delivered, interrupted or
    /// queued) to `fast` first, from the backend's own entry loop (`vmm::fast`): when it
    /// answers, the backend moves RIP past the instruction, ends an interrupt shadow and
    /// enters again at once, reading only what that needs. Returns the first exit `fast`
    /// did not answer, as [`Backend::run`] would have. The default answers none.
    fn run_fast(&mut self, regs: &mut GuestRegs, fast: &mut impl FastExits) -> Exit {
        let _ = fast;
        self.run(regs)
    }

    /// The floor of the exit path, for measurements (the VM line's `floor=on`): the guest's
    /// native-instruction PING hypercalls (RAX = `guest_abi::hypercall::nr::PING`) answered
    /// in [`Backend::run_fast`]'s loop with nothing but RAX = RBX + 1 (no privilege check,
    /// no statistics, no event delivery), at most `max` of them. Returns the first other
    /// exit, or the PING exit after `max` were answered.
    fn run_floor(&mut self, regs: &mut GuestRegs, max: u32) -> Exit {
        self.run_fast(regs, &mut Floor { left: max })
    }

    fn rip(&self) -> u64;
    fn set_rip(&mut self, rip: u64);
    fn rflags(&self) -> u64;
    fn set_rflags(&mut self, rflags: u64);
    fn cr0(&self) -> u64;
    fn cr3(&self) -> u64;
    fn cr4(&self) -> u64;
    fn efer(&self) -> u64;
    /// Sets the guest-visible EFER (already validated by the core). The backend adds what
    /// its hardware needs (SVM: EFER.SVME in the VMCB copy) and keeps it hidden from
    /// [`Backend::efer`]; VMX updates the "IA-32e mode guest" entry control from LMA.
    fn set_efer(&mut self, efer: u64);
    /// The guest's IA32_PAT as the hardware applies it (VMCB G_PAT / VMCS guest PAT).
    fn pat(&self) -> u64;
    fn set_pat(&mut self, pat: u64);
    /// The guest runs 64-bit code: EFER.LMA and CS.L (backends may answer cheaper than
    /// through [`Backend::segment`]).
    fn long_mode(&self) -> bool {
        use super::state::{SegAttr, EFER_LMA};
        self.efer() & EFER_LMA != 0 && self.segment(SegReg::Cs).attr.0 & SegAttr::LONG != 0
    }
    /// Current privilege level (SS.DPL).
    fn cpl(&self) -> u8;
    fn segment(&self, seg: SegReg) -> Segment;

    /// Queues `event` for delivery at the next entry (replacing none already queued: the
    /// core checks [`Backend::event_pending`] first).
    fn inject(&mut self, event: Event);
    /// The queued event, if any (see [`Backend::event_pending`]).
    fn pending_event(&self) -> Option<Event>;
    /// An event is queued and not yet delivered (including one re-queued because its
    /// delivery was interrupted by an exit, SDM Vol. 3C §28.2.4 / APM §15.7.2 EXITINTINFO).
    fn event_pending(&self) -> bool;
    /// The guest would take a maskable interrupt now: RFLAGS.IF = 1 and no STI/MOV SS
    /// interrupt shadow.
    fn interruptible(&self) -> bool;
    /// An STI / MOV SS interrupt shadow is in force (for diagnostics; [`Backend::interruptible`]
    /// already accounts for it).
    fn interrupt_shadow(&self) -> bool;
    /// Asks for an [`super::exit::ExitKind::InterruptWindow`] exit as soon as the guest is
    /// interruptible (VMX interrupt-window exiting; SVM V_IRQ with VINTR intercept).
    fn set_interrupt_window(&mut self, enable: bool);
    /// Bitmap of guest exception vectors that cause an `Exception` exit.
    fn set_exception_intercepts(&mut self, vectors: u32);

    /// Drops the guest's cached linear translations before the next entry (what a MOV to
    /// CR3 would have done; for a guest that skipped a TLB-shootdown IPI to this preempted
    /// vCPU, KVM's PV TLB flush).
    fn flush_guest_tlb(&mut self);

    /// The TSC by which the guest must be back in Vireo whatever it does (the slice's end,
    /// a timer), where the hardware can enforce it without a host interrupt (VMX: the
    /// VMX-preemption timer, SDM Vol. 3C §26.5.1; reported as an `ExternalInterrupt` exit).
    /// Backends without such a timer rely on the host's local APIC timer alone.
    fn set_deadline(&mut self, _tsc: Option<u64>) {}

    /// Sets the guest's CR2 (the faulting address of a #PF the core injects).
    fn set_cr2(&mut self, cr2: u64);
    /// The guest's CR2 (its last #PF's address), for reports.
    fn cr2(&self) -> u64;
    /// A slice of this vCPU starts on this host CPU: load guest state the hardware does not
    /// switch on entry (VMX: CR2, SDM Vol. 3C §27.3 / §28.5 leave it alone).
    fn slice_start(&mut self) {}
    /// The slice ends: keep that state before another vCPU runs here.
    fn slice_end(&mut self) {}

    /// The hardware PMU path (`crate::pmu::hw`): IA32_PERF_GLOBAL_CTRL to load on every VM
    /// entry (`guest`) and VM exit (`host`) while the vCPU's counters are loaded; `None`:
    /// leave it alone. Only Intel needs it (VMX: the "load IA32_PERF_GLOBAL_CTRL" entry and
    /// exit controls, which the hardware path is chosen only with); AMD counters count
    /// guest mode only by their GuestOnly bit, and this does nothing.
    fn set_perf_global_ctrl(&mut self, _switch: Option<crate::pmu::hw::GlobalCtrlSwitch>) {}
}
