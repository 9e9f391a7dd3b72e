//! VM exits, from the raw VMCS exit-information fields to [`ExitKind`] (SDM Vol. 3C §28.2
//! "Recording VM-Exit Information"; Vol. 3D App. C, basic exit reasons).
//!
//! Pure: `run` reads the fields, this decides; unit-tested on the host.

use crate::vmm::exit::{ExitKind, HypercallInsn, IoAccess, NptAccess, VECTOR_UD};

/// Basic exit reasons Vireo decodes (SDM Vol. 3D Table C-1).
pub mod reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT: u16 = 3;
    pub const SIPI: u16 = 4;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const CPUID: u16 = 10;
    pub const HLT: u16 = 12;
    pub const RDPMC: u16 = 15;
    pub const VMCALL: u16 = 18;
    pub const VMCLEAR: u16 = 19;
    pub const VMXON: u16 = 27;
    pub const CR_ACCESS: u16 = 28;
    pub const IO: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const INVALID_GUEST_STATE: u16 = 33;
    pub const MSR_LOADING: u16 = 34;
    pub const PAUSE: u16 = 40;
    pub const MACHINE_CHECK_DURING_ENTRY: u16 = 41;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIG: u16 = 49;
    pub const INVEPT: u16 = 50;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const INVVPID: u16 = 53;
    pub const XSETBV: u16 = 55;
}

/// Exit reason bit 31: VM-entry failure (SDM Vol. 3C §25.9.1).
pub const EXIT_REASON_ENTRY_FAILURE: u32 = 1 << 31;

/// Interruption-information format, shared by the VM-exit interruption information,
/// IDT-vectoring information and VM-entry interruption information fields (SDM Vol. 3C
/// §25.8.3, §25.9.2, §25.9.3).
pub mod intr {
    pub const VECTOR_MASK: u32 = 0xFF;
    pub const TYPE_SHIFT: u32 = 8;
    pub const TYPE_MASK: u32 = 7 << TYPE_SHIFT;
    pub const TYPE_EXTERNAL: u32 = 0;
    pub const TYPE_NMI: u32 = 2;
    pub const TYPE_HARDWARE_EXCEPTION: u32 = 3;
    pub const TYPE_SOFTWARE_INTERRUPT: u32 = 4;
    pub const TYPE_PRIVILEGED_SOFTWARE_EXCEPTION: u32 = 5;
    pub const TYPE_SOFTWARE_EXCEPTION: u32 = 6;
    pub const ERROR_CODE_VALID: u32 = 1 << 11;
    /// Exit interruption info / EPT violation qualification bit 12: NMI unblocking due to
    /// IRET (SDM Vol. 3C §28.2.3).
    pub const NMI_UNBLOCKING: u32 = 1 << 12;
    pub const VALID: u32 = 1 << 31;

    pub const fn kind(info: u32) -> u32 {
        (info & TYPE_MASK) >> TYPE_SHIFT
    }

    /// The bits of an IDT-vectoring information value that a VM-entry interruption
    /// information field may carry (vector, type, deliver-error-code, valid; bits 30:12
    /// are reserved there).
    pub const fn requeue(idt_vectoring: u32) -> u32 {
        idt_vectoring & (VALID | ERROR_CODE_VALID | TYPE_MASK | VECTOR_MASK)
    }

    /// Software interrupts and exceptions need the instruction length at re-injection.
    pub const fn needs_instruction_length(info: u32) -> bool {
        matches!(kind(info), TYPE_SOFTWARE_INTERRUPT | TYPE_PRIVILEGED_SOFTWARE_EXCEPTION | TYPE_SOFTWARE_EXCEPTION)
    }
}

/// The VM-exit information fields one exit needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawExit {
    /// The full exit-reason field (bit 31 = entry failure).
    pub reason: u32,
    pub qualification: u64,
    /// VM-exit interruption information (exception/NMI and external-interrupt exits).
    pub intr_info: u32,
    pub intr_error: u32,
    pub instr_len: u32,
    pub rip: u64,
    /// Guest-physical address (EPT violation and misconfiguration).
    pub gpa: u64,
    /// Guest-linear address (EPT violation with qualification bit 7).
    pub gla: u64,
}

impl RawExit {
    pub const fn basic(&self) -> u16 {
        self.reason as u16
    }

    pub const fn entry_failed(&self) -> bool {
        self.reason & EXIT_REASON_ENTRY_FAILURE != 0
    }
}

/// Which exit fields beyond reason/qualification/length/RIP a basic reason needs.
pub const fn needs_intr_info(basic: u16) -> bool {
    matches!(basic, reason::EXCEPTION_OR_NMI | reason::EXTERNAL_INTERRUPT)
}

pub const fn needs_gpa(basic: u16) -> bool {
    matches!(basic, reason::EPT_VIOLATION | reason::EPT_MISCONFIG)
}

/// Exits caused by an instruction whose length the exit reports (SDM Vol. 3C §28.2.4,
/// "VM-exit instruction length"): only these get `next_rip = rip + length`.
pub const fn is_instruction_exit(basic: u16) -> bool {
    matches!(
        basic,
        reason::CPUID
            | reason::HLT
            | reason::RDPMC
            | reason::VMCALL
            | reason::CR_ACCESS
            | reason::IO
            | reason::RDMSR
            | reason::WRMSR
            | reason::PAUSE
            | reason::XSETBV
            | reason::VMCLEAR..=reason::VMXON | reason::INVEPT | reason::INVVPID
    )
}

/// EPT-violation exit qualification (SDM Vol. 3C §28.2.1, Table 28-7). Bit 0 (read) is
/// implied when neither write nor fetch is set.
pub fn ept_violation(qualification: u64, gpa: u64, gla: u64) -> NptAccess {
    const WRITE: u64 = 1 << 1;
    const FETCH: u64 = 1 << 2;
    const PERMISSIONS: u64 = 0b111 << 3;
    const GLA_VALID: u64 = 1 << 7;
    NptAccess {
        gpa,
        write: qualification & WRITE != 0,
        fetch: qualification & FETCH != 0,
        present: qualification & PERMISSIONS != 0,
        gla: (qualification & GLA_VALID != 0).then_some(gla),
    }
}

/// I/O-instruction exit qualification (SDM Vol. 3C §28.2.1, Table 28-5).
pub const fn io_access(qualification: u64) -> IoAccess {
    IoAccess {
        port: (qualification >> 16) as u16,
        size: ((qualification & 7) + 1) as u8,
        write: qualification & (1 << 3) == 0,
        string: qualification & (1 << 4) != 0,
        rep: qualification & (1 << 5) != 0,
    }
}

/// The instruction exits that need no exit-information field beyond the instruction length
/// (CPUID, VMCALL, RDMSR, WRMSR): their kind from the full exit reason, as [`decode`] gives
/// it; `None` for every other exit and for VM-entry failures.
#[inline]
pub fn simple_instruction_exit(reason: u32) -> Option<ExitKind> {
    match reason {
        r if r == u32::from(reason::CPUID) => Some(ExitKind::Cpuid),
        r if r == u32::from(reason::VMCALL) => Some(ExitKind::Hypercall(HypercallInsn::Vmcall)),
        r if r == u32::from(reason::RDMSR) => Some(ExitKind::Rdmsr),
        r if r == u32::from(reason::WRMSR) => Some(ExitKind::Wrmsr),
        _ => None,
    }
}

/// Decodes an exit into the vendor-neutral kind and the RIP after the instruction.
///
/// Control-register accesses decode to [`ExitKind::ControlRegister`]; `run` emulates them
/// before returning. Invalid-guest-state failures decode with a generic reason that `run`
/// may sharpen with [`super::check`].
#[inline]
pub fn decode(raw: &RawExit) -> (ExitKind, u64) {
    let basic = raw.basic();
    let next_rip = if is_instruction_exit(basic) { raw.rip.wrapping_add(raw.instr_len as u64) } else { raw.rip };
    if raw.entry_failed() {
        let reason = match basic {
            reason::INVALID_GUEST_STATE => "invalid guest state",
            reason::MSR_LOADING => "VM-entry failure due to MSR loading",
            reason::MACHINE_CHECK_DURING_ENTRY => "VM-entry failure due to machine-check event",
            _ => "VM-entry failure (unknown exit reason)",
        };
        return (ExitKind::EntryFailed { reason, code: basic as u64 }, raw.rip);
    }
    let kind = match basic {
        reason::EXCEPTION_OR_NMI => {
            let vector = (raw.intr_info & intr::VECTOR_MASK) as u8;
            if intr::kind(raw.intr_info) == intr::TYPE_NMI {
                ExitKind::Nmi
            } else {
                let error_code = (raw.intr_info & intr::ERROR_CODE_VALID != 0).then_some(raw.intr_error);
                ExitKind::Exception { vector, error_code }
            }
        }
        // The VMX-preemption timer stands in for the host timer (see Backend::set_deadline).
        reason::EXTERNAL_INTERRUPT => ExitKind::ExternalInterrupt {
            vector: (raw.intr_info & intr::VALID != 0).then_some((raw.intr_info & intr::VECTOR_MASK) as u8),
        },
        reason::PREEMPTION_TIMER => ExitKind::ExternalInterrupt { vector: None },
        reason::TRIPLE_FAULT => ExitKind::TripleFault,
        reason::INIT => ExitKind::Init,
        reason::SIPI => ExitKind::Sipi { vector: raw.qualification as u8 },
        reason::INTERRUPT_WINDOW => ExitKind::InterruptWindow,
        reason::CPUID => ExitKind::Cpuid,
        reason::HLT => ExitKind::Hlt,
        reason::RDPMC => ExitKind::Rdpmc,
        reason::VMCALL => ExitKind::Hypercall(HypercallInsn::Vmcall),
        // VMX is hidden from guests: its instructions are undefined opcodes to them.
        reason::VMCLEAR..=reason::VMXON | reason::INVEPT | reason::INVVPID => {
            ExitKind::Exception { vector: VECTOR_UD, error_code: None }
        }
        reason::CR_ACCESS => ExitKind::ControlRegister,
        reason::IO => ExitKind::Io(io_access(raw.qualification)),
        reason::RDMSR => ExitKind::Rdmsr,
        reason::WRMSR => ExitKind::Wrmsr,
        reason::INVALID_GUEST_STATE => ExitKind::EntryFailed { reason: "invalid guest state", code: basic as u64 },
        reason::MSR_LOADING => {
            ExitKind::EntryFailed { reason: "VM-entry failure due to MSR loading", code: basic as u64 }
        }
        reason::PAUSE => ExitKind::Pause,
        reason::EPT_VIOLATION => ExitKind::NestedPageFault(ept_violation(raw.qualification, raw.gpa, raw.gla)),
        reason::EPT_MISCONFIG => ExitKind::EntryFailed {
            reason: "EPT misconfiguration (a malformed EPT entry for the guest-physical address)",
            code: basic as u64,
        },
        reason::XSETBV => ExitKind::Xsetbv,
        _ => ExitKind::Unhandled,
    };
    (kind, next_rip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(reason: u32) -> RawExit {
        RawExit { reason, rip: 0x1000, instr_len: 2, ..RawExit::default() }
    }

    #[test]
    fn simple_instruction_exits_decode_as_the_full_decoder() {
        for r in 0..=64u32 {
            for reason in [r, r | EXIT_REASON_ENTRY_FAILURE] {
                if let Some(kind) = simple_instruction_exit(reason) {
                    assert!(is_instruction_exit(reason as u16), "{reason}");
                    assert_eq!(decode(&raw(reason)), (kind, 0x1002), "{reason}");
                }
            }
        }
        assert_eq!(
            simple_instruction_exit(u32::from(reason::VMCALL)),
            Some(ExitKind::Hypercall(HypercallInsn::Vmcall))
        );
        assert_eq!(simple_instruction_exit(u32::from(reason::VMCALL) | EXIT_REASON_ENTRY_FAILURE), None);
        assert_eq!(simple_instruction_exit(u32::from(reason::IO)), None);
    }

    #[test]
    fn instruction_exits_advance_rip() {
        for (r, kind) in [
            (10, ExitKind::Cpuid),
            (12, ExitKind::Hlt),
            (15, ExitKind::Rdpmc),
            (18, ExitKind::Hypercall(HypercallInsn::Vmcall)),
            (31, ExitKind::Rdmsr),
            (32, ExitKind::Wrmsr),
            (40, ExitKind::Pause),
            (55, ExitKind::Xsetbv),
        ] {
            let mut e = raw(r);
            e.instr_len = 3;
            assert_eq!(decode(&e), (kind, 0x1003), "reason {r}");
        }
        assert_eq!(decode(&raw(7)), (ExitKind::InterruptWindow, 0x1000));
        assert_eq!(decode(&raw(1)), (ExitKind::ExternalInterrupt { vector: None }, 0x1000));
        assert_eq!(decode(&raw(2)), (ExitKind::TripleFault, 0x1000));
        assert_eq!(decode(&raw(3)), (ExitKind::Init, 0x1000));
        assert_eq!(decode(&raw(28)), (ExitKind::ControlRegister, 0x1002));
        assert_eq!(decode(&raw(9)), (ExitKind::Unhandled, 0x1000));
    }

    #[test]
    fn exceptions_and_nmi() {
        let mut e = raw(0);
        e.intr_info = intr::VALID | (intr::TYPE_HARDWARE_EXCEPTION << 8) | intr::ERROR_CODE_VALID | 14;
        e.intr_error = 0x6;
        assert_eq!(decode(&e).0, ExitKind::Exception { vector: 14, error_code: Some(6) });
        e.intr_info = intr::VALID | (intr::TYPE_HARDWARE_EXCEPTION << 8) | 6;
        assert_eq!(decode(&e).0, ExitKind::Exception { vector: 6, error_code: None });
        e.intr_info = intr::VALID | (intr::TYPE_NMI << 8) | 2;
        assert_eq!(decode(&e).0, ExitKind::Nmi);
        // INT3 is a software exception, still an exception exit.
        e.intr_info = intr::VALID | (intr::TYPE_SOFTWARE_EXCEPTION << 8) | 3;
        assert_eq!(decode(&e), (ExitKind::Exception { vector: 3, error_code: None }, 0x1000));
    }

    #[test]
    fn sipi_vector_from_qualification() {
        let mut e = raw(4);
        e.qualification = 0x9A;
        assert_eq!(decode(&e).0, ExitKind::Sipi { vector: 0x9A });
    }

    #[test]
    fn vmx_instructions_are_undefined_opcodes() {
        for r in (19..=27).chain([50, 53]) {
            assert_eq!(decode(&raw(r)).0, ExitKind::Exception { vector: 6, error_code: None }, "reason {r}");
        }
    }

    #[test]
    fn io_qualification() {
        let mut e = raw(30);
        // OUT DX, AL to 0x3F8: size 0 (1 byte), direction 0 (out).
        e.qualification = 0x03F8_0000;
        assert_eq!(
            decode(&e),
            (ExitKind::Io(IoAccess { port: 0x3F8, size: 1, write: true, string: false, rep: false }), 0x1002)
        );
        // REP INSW from 0x1F0: size 1, in, string, rep.
        e.qualification = 0x01F0_0000 | 1 | (1 << 3) | (1 << 4) | (1 << 5);
        assert_eq!(
            decode(&e).0,
            ExitKind::Io(IoAccess { port: 0x1F0, size: 2, write: false, string: true, rep: true })
        );
        // IN EAX, imm8 (operand encoding bit 6 set).
        e.qualification = 0x0071_0000 | 3 | (1 << 3) | (1 << 6);
        assert_eq!(
            decode(&e).0,
            ExitKind::Io(IoAccess { port: 0x71, size: 4, write: false, string: false, rep: false })
        );
    }

    #[test]
    fn ept_violations() {
        let mut e = raw(48);
        e.gpa = 0xFEE0_0000;
        e.gla = 0xFFFF_8000_FEE0_0000;
        // Write to an unmapped page, linear address valid.
        e.qualification = (1 << 1) | (1 << 7) | (1 << 8);
        let (kind, next) = decode(&e);
        assert_eq!(next, 0x1000);
        assert_eq!(
            kind,
            ExitKind::NestedPageFault(NptAccess {
                gpa: 0xFEE0_0000,
                write: true,
                fetch: false,
                present: false,
                gla: Some(e.gla)
            })
        );
        // Fetch from a readable, non-executable page, no linear address.
        e.qualification = (1 << 2) | (1 << 3);
        assert_eq!(
            decode(&e).0,
            ExitKind::NestedPageFault(NptAccess {
                gpa: 0xFEE0_0000,
                write: false,
                fetch: true,
                present: true,
                gla: None
            })
        );
    }

    #[test]
    fn entry_failures() {
        let e = raw(EXIT_REASON_ENTRY_FAILURE | 33);
        assert_eq!(decode(&e), (ExitKind::EntryFailed { reason: "invalid guest state", code: 33 }, 0x1000));
        let e = raw(EXIT_REASON_ENTRY_FAILURE | 34);
        assert!(matches!(decode(&e).0, ExitKind::EntryFailed { code: 34, .. }));
        let e = raw(EXIT_REASON_ENTRY_FAILURE | 41);
        assert!(matches!(decode(&e).0, ExitKind::EntryFailed { code: 41, .. }));
        assert!(matches!(decode(&raw(49)).0, ExitKind::EntryFailed { code: 49, .. }));
    }

    #[test]
    fn idt_vectoring_requeue() {
        // #PF with error code, plus a reserved bit 12 that must not reach the entry field.
        let info = intr::VALID | (1 << 12) | intr::ERROR_CODE_VALID | (3 << 8) | 14;
        assert_eq!(intr::requeue(info), intr::VALID | intr::ERROR_CODE_VALID | (3 << 8) | 14);
        assert!(!intr::needs_instruction_length(info));
        assert!(intr::needs_instruction_length(intr::VALID | (4 << 8) | 0x80));
    }
}
