//! The exit fast path: the cheapest exits answered from inside the backend's entry loop.
//!
//! A backend's [`super::backend::Backend::run_fast`] enters the guest like `run`, but when the
//! exit is a hypercall with nothing else to report (no event delivered or interrupted, none
//! queued) it asks a [`FastExits`] handler first. When the handler answers, the backend moves
//! RIP past the instruction and enters again at once: no [`super::exit::Exit`] is built, no
//! VMCS field or VMCB area beyond what the re-entry needs is touched, and the core's run loop
//! (event delivery, device ticks, the host timer, the exit history) is not run. Otherwise the
//! exit goes to the run loop as [`super::backend::Backend::run`]'s would.
//!
//! What the guest sees is decided here, in the vendor-neutral core, for both vendors:
//! [`CoreFast`] is the policy of a normal VM, [`Floor`] the measuring mode `floor=on`.

use core::sync::atomic::{AtomicBool, Ordering};

use guest_abi::hypercall::nr::PING;

use super::{
    exit::{ExitKind, HypercallInsn},
    regs::GuestRegs,
    stats::ExitCounters,
    vm::Vm,
};

/// The core's side of a backend's fast entry loop.
pub trait FastExits {
    /// A hypercall exit by the CPU's native instruction `insn`, at TSC `tsc`, with nothing
    /// else to report. `cpl` reads the guest's privilege level (a backend may need a VMREAD
    /// for it, so it is asked only when needed). Returns true when the call was answered
    /// (the result is in `regs`): the backend advances RIP past the instruction, ends an
    /// interrupt shadow, and enters again. False: the exit goes to the core's run loop,
    /// untouched.
    fn hypercall(&mut self, regs: &mut GuestRegs, insn: HypercallInsn, cpl: impl FnOnce() -> u8, tsc: u64) -> bool;
}

/// Floor mode (`floor=on`, a measuring mode): PING answered with RAX = RBX + 1 and nothing
/// else (no privilege check, no statistics, no look at pending work), at most `left` times
/// before the core sees one again.
pub struct Floor {
    pub left: u32,
}

impl FastExits for Floor {
    #[inline(always)]
    fn hypercall(&mut self, regs: &mut GuestRegs, _insn: HypercallInsn, _cpl: impl FnOnce() -> u8, _tsc: u64) -> bool {
        if regs.rax != PING || self.left == 0 {
            return false;
        }
        self.left -= 1;
        regs.rax = regs.rbx.wrapping_add(1);
        true
    }
}

/// The fast path of a normal VM: PING, answered exactly as the run loop would
/// (`hypercall::handle_simple`) and counted in the vCPU's exit statistics, while nothing
/// waits for the run loop. Built by the run loop before each entry (`Vcpu::enter`), only
/// where no exit may bypass it: not while the virtual PMU counts guest time or exits (its
/// event 0x56 counts every exit), nor while a PV EOI offer, a test interrupt or an NMI is
/// outstanding.
///
/// Whether the run loop has work is seen with two loads and the exit's TSC:
/// - `yield_now`, this host CPU's pending-work word: `sched::kick` sets it, and everything
///   that needs this vCPU's run loop kicks its host CPU: a delivery to the vCPU (interrupt,
///   NMI, INIT, SIPI, PIC output: `Interrupts::notify` raises its `attention`, then kicks),
///   the VM's end (`Vm::stop_by` notifies every vCPU), another vCPU woken on this CPU;
/// - `until`, the earliest of the slice end, the VM's time limit, the devices', the local
///   APIC timer's and the test timer's, as the run loop's last pass computed them (the host
///   timer is armed no earlier, so a host timer interrupt means this deadline passed);
/// - the VM's device deadline, which another vCPU may have moved closer since
///   (`device_seen`: the value seen then).
///
/// So a pending interrupt, a kick, a stop request or the slice end is seen at the first
/// hypercall exit after it, as in the run loop (`Vcpu::reenter_at_once`). A host interrupt
/// that arrives meanwhile stays pending in the host's local APIC and makes the next entry
/// exit (external-interrupt exiting, the SVM INTR intercept; Bochs's VMX waits for the guest's
/// RFLAGS.IF): what it announces is in the yield word or past `until` already.
pub struct CoreFast<'a> {
    pub vm: &'a Vm,
    pub until: u64,
    pub device_seen: u64,
    pub yield_now: &'a AtomicBool,
    pub exits: &'a ExitCounters,
}

impl FastExits for CoreFast<'_> {
    #[inline(always)]
    fn hypercall(&mut self, regs: &mut GuestRegs, insn: HypercallInsn, cpl: impl FnOnce() -> u8, tsc: u64) -> bool {
        // PING's answer (RBX + 1) is the same in every mode when RAX is PING in full and RBX
        // + 1 fits in 32 bits: no need to know whether the guest runs 64-bit code (outside it
        // only the low halves count). Anything else goes to the run loop.
        if regs.rax != PING
            || regs.rbx >= u64::from(u32::MAX)
            || tsc >= self.until
            || self.yield_now.load(Ordering::Acquire)
            || self.vm.device_deadline_raw() != self.device_seen
            || cpl() != 0
        {
            return false;
        }
        regs.rax = regs.rbx + 1;
        // Counted, not timed: answering takes a few dozen instructions.
        self.exits.count(&ExitKind::Hypercall(insn));
        true
    }
}
