//! The one exit type both backends translate their hardware exits into.

use core::fmt;

/// How a hypercall was issued (Vireo accepts both instructions on both vendors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallInsn {
    /// 0F 01 C1 (Intel).
    Vmcall,
    /// 0F 01 D9 (AMD).
    Vmmcall,
}

/// A port I/O access (IN/OUT/INS/OUTS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub write: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub rep: bool,
}

/// A guest-physical access the nested page tables did not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NptAccess {
    pub gpa: u64,
    pub write: bool,
    pub fetch: bool,
    /// A translation existed (permission fault) rather than none at all.
    pub present: bool,
    /// Guest-linear address, where the hardware reports it.
    pub gla: Option<u64>,
}

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    Cpuid,
    /// RDMSR; the MSR number is in guest ECX.
    Rdmsr,
    /// WRMSR; MSR in ECX, value in EDX:EAX.
    Wrmsr,
    Io(IoAccess),
    Hypercall(HypercallInsn),
    Hlt,
    /// XSETBV; XCR number in ECX, value in EDX:EAX.
    Xsetbv,
    NestedPageFault(NptAccess),
    /// An intercepted guest exception (e.g. #UD, to accept the other vendor's hypercall).
    Exception {
        vector: u8,
        error_code: Option<u32>,
    },
    /// The guest triple-faulted (SVM SHUTDOWN, VMX triple fault).
    TripleFault,
    /// A physical interrupt arrived while the guest ran (or the backend's own deadline
    /// timer expired). `vector`: the hardware acknowledged it on exit (VMX "acknowledge
    /// interrupt on exit") and the core must hand it to the host handler; `None`: it is
    /// still pending in the local APIC (SVM INTR) and is taken through the IDT.
    ExternalInterrupt {
        vector: Option<u8>,
    },
    /// The guest became interruptible (requested with `Backend::set_interrupt_window`).
    InterruptWindow,
    Nmi,
    Init,
    Sipi {
        vector: u8,
    },
    Pause,
    /// VM entry failed: `reason` is readable text, `code` the hardware's number.
    EntryFailed {
        reason: &'static str,
        code: u64,
    },
    /// An exit Vireo does not handle (hardware code in `Exit::raw`).
    Unhandled,
    /// A control-register access the backend already emulated in full (VMX CR0/CR4
    /// guest/host-mask exits): an artifact of the hardware, reported only to be counted.
    /// `next_rip` is already applied; the core does nothing else.
    ControlRegister,
    /// RDPMC; the counter index is in guest ECX (answered from the virtual PMU).
    Rdpmc,
}

/// Number of [`ExitKind`] classes (for per-reason statistics).
pub const EXIT_KINDS: usize = guest_abi::stats::KINDS;

impl ExitKind {
    /// Dense index for statistics tables.
    pub fn index(&self) -> usize {
        match self {
            ExitKind::Cpuid => 0,
            ExitKind::Rdmsr => 1,
            ExitKind::Wrmsr => 2,
            ExitKind::Io(_) => 3,
            ExitKind::Hypercall(_) => 4,
            ExitKind::Hlt => 5,
            ExitKind::Xsetbv => 6,
            ExitKind::NestedPageFault(_) => 7,
            ExitKind::Exception { .. } => 8,
            ExitKind::TripleFault => 9,
            ExitKind::ExternalInterrupt { .. } => 10,
            ExitKind::InterruptWindow => 11,
            ExitKind::Nmi => 12,
            ExitKind::Init => 13,
            ExitKind::Sipi { .. } => 14,
            ExitKind::Pause => 15,
            ExitKind::EntryFailed { .. } => 16,
            ExitKind::Unhandled => 17,
            ExitKind::ControlRegister => 18,
            ExitKind::Rdpmc => 19,
        }
    }

    /// Name of a statistics class (the guest-visible names, `guest_abi::stats`).
    pub fn class_name(index: usize) -> &'static str {
        guest_abi::stats::KIND_NAMES.get(index).copied().unwrap_or("other")
    }
}

/// One exit, as the core sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub kind: ExitKind,
    /// Guest RIP of the instruction that exited (or was interrupted).
    pub rip: u64,
    /// RIP after the intercepted instruction: valid for instruction exits (CPUID, RDMSR,
    /// WRMSR, RDPMC, IN/OUT, VMCALL/VMMCALL, HLT, XSETBV). Backends fill it from the VMX
    /// instruction-length field, SVM nRIP-save, the IOIO exit's EXITINFO2, or the known
    /// length of the instruction when the CPU has no nRIP-save (QEMU TCG).
    pub next_rip: u64,
    /// The hardware's exit code (VMX basic exit reason, SVM EXITCODE), for reports.
    pub raw: u64,
    /// TSC read right after the exit, for the exit statistics.
    pub tsc: u64,
    /// Events around this exit, for post-mortem reports.
    pub events: ExitEvents,
}

/// The event Vireo injected at the entry that ended in an exit, and the one whose delivery
/// the exit interrupted (SVM EXITINTINFO, APM Vol. 2 §15.7.2; VMX IDT-vectoring
/// information, SDM Vol. 3C §28.2.4), for the post-mortem of a crashed guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitEvents {
    pub injected: Option<Event>,
    pub interrupted: Option<Event>,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} rip={:#x} raw={:#x}", self.kind, self.rip, self.raw)
    }
}

/// An event to deliver to the guest at the next entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A hardware exception (vector < 32), with its error code where the architecture
    /// defines one (#DF, #TS, #NP, #SS, #GP, #PF, #AC).
    Exception {
        vector: u8,
        error_code: Option<u32>,
    },
    /// An external (maskable) interrupt.
    Interrupt {
        vector: u8,
    },
    Nmi,
}

pub const VECTOR_DE: u8 = 0;
pub const VECTOR_DB: u8 = 1;
pub const VECTOR_BP: u8 = 3;
pub const VECTOR_UD: u8 = 6;
pub const VECTOR_DF: u8 = 8;
pub const VECTOR_GP: u8 = 13;
pub const VECTOR_PF: u8 = 14;
pub const VECTOR_AC: u8 = 17;
pub const VECTOR_MC: u8 = 18;

/// Exception vectors whose delivery pushes an error code: #DF, #TS, #NP, #SS, #GP, #PF, #AC
/// (SDM Vol. 3A §7.3 Table 7-1, Vol. 3C §27.2.1.3), #CP (CET), and AMD's #VC and #SX (APM
/// Vol. 2 §8.2). Both backends use this one definition, for intercepted exceptions and for
/// injection.
pub const fn exception_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Exception classes for delivering one exception while another is being delivered
/// (SDM Vol. 3A §7.15, Tables 7-4 and 7-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Deliver the second event; the first is handled serially afterwards.
    Serial,
    /// Deliver #DF(0) instead.
    DoubleFault,
    /// A fault while delivering #DF: the CPU shuts down (triple fault).
    TripleFault,
}

fn contributory(vector: u8) -> bool {
    matches!(vector, 0 | 10 | 11 | 12 | 13)
}

/// What the CPU does when exception `second` arises while delivering `first`.
pub fn merge(first: Event, second: u8) -> Merge {
    let Event::Exception { vector: first, .. } = first else { return Merge::Serial };
    let second_bad = contributory(second) || second == VECTOR_PF;
    match first {
        VECTOR_DF if second_bad => Merge::TripleFault,
        VECTOR_PF if second_bad => Merge::DoubleFault,
        v if contributory(v) && contributory(second) => Merge::DoubleFault,
        _ => Merge::Serial,
    }
}

/// Bits of the event encoding VMX (VM-entry interruption information, SDM Vol. 3C §25.8.3)
/// and SVM (EVENTINJ, APM Vol. 2 §15.20) share.
pub mod encoding {
    pub const VECTOR: u32 = 0xFF;
    pub const TYPE_SHIFT: u32 = 8;
    pub const TYPE_EXTERNAL: u32 = 0;
    pub const TYPE_NMI: u32 = 2;
    pub const ERROR_VALID: u32 = 1 << 11;
    pub const VALID: u32 = 1 << 31;
}

impl Event {
    /// Decodes the shared encoding (`info`, with the error code alongside).
    pub fn decode(info: u32, error_code: u32) -> Option<Event> {
        use encoding::*;
        if info & VALID == 0 {
            return None;
        }
        let vector = (info & VECTOR) as u8;
        Some(match (info >> TYPE_SHIFT) & 7 {
            TYPE_EXTERNAL => Event::Interrupt { vector },
            TYPE_NMI => Event::Nmi,
            _ => Event::Exception { vector, error_code: (info & ERROR_VALID != 0).then_some(error_code) },
        })
    }
}

impl Event {
    /// #GP(0), the answer to an unknown MSR.
    pub const GP0: Event = Event::Exception { vector: VECTOR_GP, error_code: Some(0) };
    pub const UD: Event = Event::Exception { vector: VECTOR_UD, error_code: None };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_fault_rules() {
        let ex = |vector| Event::Exception { vector, error_code: None };
        assert_eq!(merge(ex(VECTOR_GP), VECTOR_GP), Merge::DoubleFault);
        assert_eq!(merge(ex(VECTOR_PF), VECTOR_PF), Merge::DoubleFault);
        assert_eq!(merge(ex(VECTOR_PF), VECTOR_GP), Merge::DoubleFault);
        assert_eq!(merge(ex(VECTOR_GP), VECTOR_PF), Merge::Serial);
        assert_eq!(merge(ex(VECTOR_DF), VECTOR_GP), Merge::TripleFault);
        assert_eq!(merge(ex(VECTOR_UD), VECTOR_GP), Merge::Serial);
        assert_eq!(merge(Event::Interrupt { vector: 0x40 }, VECTOR_GP), Merge::Serial);
        assert_eq!(merge(ex(VECTOR_DF), VECTOR_UD), Merge::Serial);
    }

    #[test]
    fn shared_event_encoding() {
        assert_eq!(Event::decode(0, 0), None);
        assert_eq!(Event::decode(0x8000_0040, 0), Some(Event::Interrupt { vector: 0x40 }));
        assert_eq!(Event::decode(0x8000_0202, 0), Some(Event::Nmi));
        assert_eq!(Event::decode(0x8000_0B0D, 7), Some(Event::Exception { vector: 13, error_code: Some(7) }));
        assert_eq!(Event::decode(0x8000_0306, 7), Some(Event::Exception { vector: 6, error_code: None }));
    }

    #[test]
    fn indices_are_dense_and_named() {
        let kinds = [
            ExitKind::Cpuid,
            ExitKind::Rdmsr,
            ExitKind::Wrmsr,
            ExitKind::Io(IoAccess { port: 0, size: 1, write: false, string: false, rep: false }),
            ExitKind::Hypercall(HypercallInsn::Vmcall),
            ExitKind::Hlt,
            ExitKind::Xsetbv,
            ExitKind::NestedPageFault(NptAccess { gpa: 0, write: false, fetch: false, present: false, gla: None }),
            ExitKind::Exception { vector: 6, error_code: None },
            ExitKind::TripleFault,
            ExitKind::ExternalInterrupt { vector: None },
            ExitKind::InterruptWindow,
            ExitKind::Nmi,
            ExitKind::Init,
            ExitKind::Sipi { vector: 0 },
            ExitKind::Pause,
            ExitKind::EntryFailed { reason: "", code: 0 },
            ExitKind::Unhandled,
            ExitKind::ControlRegister,
            ExitKind::Rdpmc,
        ];
        for (i, k) in kinds.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_ne!(ExitKind::class_name(i), "other");
        }
    }
}
