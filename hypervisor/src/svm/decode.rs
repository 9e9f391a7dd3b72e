//! #VMEXIT decoding: EXITCODE / EXITINFO1 / EXITINFO2 (APM Vol. 2 §15.6, §15.7 and
//! Appendix C) into the vendor-neutral [`ExitKind`], plus the RIP after the intercepted
//! instruction. Pure functions, unit-tested on the host.

use crate::vmm::exit::{ExitKind, HypercallInsn, IoAccess, NptAccess, VECTOR_UD};

/// SVM exit codes (APM Vol. 2 Appendix C, Table C-1) that Vireo names.
pub mod code {
    /// 0x40 + vector: an intercepted exception.
    pub const EXCEPTION_BASE: u64 = 0x40;
    pub const EXCEPTION_LAST: u64 = 0x5F;
    pub const INTR: u64 = 0x60;
    pub const NMI: u64 = 0x61;
    pub const SMI: u64 = 0x62;
    pub const INIT: u64 = 0x63;
    pub const VINTR: u64 = 0x64;
    pub const RDPMC: u64 = 0x6F;
    pub const PAUSE: u64 = 0x77;
    pub const CPUID: u64 = 0x72;
    pub const HLT: u64 = 0x78;
    pub const INVLPGA: u64 = 0x7A;
    pub const IOIO: u64 = 0x7B;
    pub const MSR: u64 = 0x7C;
    pub const SHUTDOWN: u64 = 0x7F;
    pub const VMRUN: u64 = 0x80;
    pub const VMMCALL: u64 = 0x81;
    pub const VMLOAD: u64 = 0x82;
    pub const VMSAVE: u64 = 0x83;
    pub const STGI: u64 = 0x84;
    pub const CLGI: u64 = 0x85;
    pub const SKINIT: u64 = 0x86;
    pub const XSETBV: u64 = 0x8D;
    pub const RDPRU: u64 = 0x8E;
    /// Nested page fault (§15.25.6).
    pub const NPF: u64 = 0x400;
    /// VMRUN found illegal guest state (§15.5.1).
    pub const INVALID: u64 = -1i64 as u64;
    /// VMRUN found the VMSA busy (SEV-ES).
    pub const BUSY: u64 = -2i64 as u64;
}

/// Instruction lengths for CPUs without nRIP-save (QEMU TCG), without prefixes:
/// CPUID 0F A2, RDMSR 0F 32, WRMSR 0F 30, RDPMC 0F 33, HLT F4, VMMCALL 0F 01 D9, XSETBV 0F 01 D1.
pub mod insn_len {
    pub const CPUID: u64 = 2;
    pub const RDMSR: u64 = 2;
    pub const WRMSR: u64 = 2;
    pub const RDPMC: u64 = 2;
    pub const HLT: u64 = 1;
    pub const VMMCALL: u64 = 3;
    pub const XSETBV: u64 = 3;
    pub const PAUSE: u64 = 2;
}

/// EXITCODE as a 64-bit value. The negative codes (VMEXIT_INVALID = -1, VMEXIT_BUSY = -2)
/// are 64-bit on hardware and Bochs; QEMU TCG stores them as 32-bit values, zero-extended
/// (0xFFFF_FFFF). Every positive code fits in 31 bits, so sign-extending the low half gives
/// the same code on all of them.
pub fn normalize(exitcode: u64) -> u64 {
    exitcode as u32 as i32 as i64 as u64
}

/// What the hardware reported at a #VMEXIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawExit {
    pub code: u64,
    pub info1: u64,
    pub info2: u64,
    /// Guest RIP at the exit (the intercepted instruction).
    pub rip: u64,
    /// The VMCB nRIP field where the CPU has nRIP-save, `None` where it has not.
    pub nrip: Option<u64>,
}

/// For intercepted exceptions that push an error code, EXITINFO1 holds it (APM Vol. 2 §15.12).
use crate::vmm::exit::exception_has_error_code as has_error_code;

/// Decodes an IOIO intercept's EXITINFO1 (APM Vol. 2 §15.10.2, Figure 15-2): bit 0 IN,
/// bit 2 string, bit 3 REP, bits 6:4 operand size one-hot (8/16/32), bits 31:16 port.
pub fn decode_ioio(info1: u64) -> IoAccess {
    let size = if info1 & (1 << 6) != 0 {
        4
    } else if info1 & (1 << 5) != 0 {
        2
    } else {
        1
    };
    IoAccess {
        port: (info1 >> 16) as u16,
        size,
        write: info1 & 1 == 0,
        string: info1 & (1 << 2) != 0,
        rep: info1 & (1 << 3) != 0,
    }
}

/// Decodes a nested page fault (APM Vol. 2 §15.25.6): EXITINFO1 is a #PF-style error code
/// (bit 0 present, bit 1 write, bit 4 instruction fetch), EXITINFO2 the guest-physical
/// address. SVM reports no guest-linear address.
pub fn decode_npf(info1: u64, info2: u64) -> NptAccess {
    NptAccess {
        gpa: info2,
        write: info1 & (1 << 1) != 0,
        fetch: info1 & (1 << 4) != 0,
        present: info1 & 1 != 0,
        gla: None,
    }
}

/// The RIP after an intercepted instruction of `len` bytes: nRIP where the CPU saves it
/// (§15.7.1), else the instruction's known length.
fn after(raw: &RawExit, len: u64) -> u64 {
    next_rip(raw.rip, raw.nrip, len)
}

/// The instruction intercepts that need nothing but their code (and EXITINFO1 for MSR
/// accesses) to decode: CPUID, VMMCALL, RDMSR, WRMSR, with their length for a CPU without
/// nRIP-save. `code` normalized; `None` for every other exit.
#[inline]
pub fn simple_instruction_exit(code: u64, info1: u64) -> Option<(ExitKind, u64)> {
    match code {
        code::CPUID => Some((ExitKind::Cpuid, insn_len::CPUID)),
        code::VMMCALL => Some((ExitKind::Hypercall(HypercallInsn::Vmmcall), insn_len::VMMCALL)),
        code::MSR if info1 & 1 == 0 => Some((ExitKind::Rdmsr, insn_len::RDMSR)),
        code::MSR => Some((ExitKind::Wrmsr, insn_len::WRMSR)),
        _ => None,
    }
}

/// The exits that [`decode`] translates from EXITCODE, EXITINFO1/2 and the RIPs alone and
/// that never interrupt an event delivery: the [`simple_instruction_exit`]s and IN/OUT
/// (IOIO: EXITINFO1 describes the access, EXITINFO2 is the next RIP on every CPU, APM Vol. 2
/// §15.10.2). Their kind and next RIP as [`decode`] gives them; `None` for every other exit.
#[inline]
pub fn cheap_exit(code: u64, info1: u64, info2: u64, rip: u64, nrip: Option<u64>) -> Option<(ExitKind, u64)> {
    if code == self::code::IOIO {
        return Some((ExitKind::Io(decode_ioio(info1)), info2));
    }
    simple_instruction_exit(code, info1).map(|(kind, len)| (kind, next_rip(rip, nrip, len)))
}

/// The RIP after an intercepted instruction of `len` bytes at `rip`: `nrip` where the CPU
/// saved one (§15.7.1), else the instruction's known length.
#[inline]
pub fn next_rip(rip: u64, nrip: Option<u64>, len: u64) -> u64 {
    match nrip {
        Some(nrip) if nrip != 0 => nrip,
        _ => rip.wrapping_add(len),
    }
}

/// Translates one exit. Returns the kind and the next RIP (equal to `raw.rip` for exits
/// that are not instruction intercepts). VMEXIT_INVALID comes back as `EntryFailed` with a
/// generic reason; the caller names the failing consistency check ([`super::check`]).
#[inline]
pub fn decode(raw: &RawExit) -> (ExitKind, u64) {
    let rip = raw.rip;
    match normalize(raw.code) {
        c @ code::EXCEPTION_BASE..=code::EXCEPTION_LAST => {
            let vector = (c - code::EXCEPTION_BASE) as u8;
            let error_code = has_error_code(vector).then_some(raw.info1 as u32);
            (ExitKind::Exception { vector, error_code }, rip)
        }
        code::INTR => (ExitKind::ExternalInterrupt { vector: None }, rip),
        code::NMI => (ExitKind::Nmi, rip),
        code::INIT => (ExitKind::Init, rip),
        code::VINTR => (ExitKind::InterruptWindow, rip),
        // PAUSE is F3 90 (intercepted with the pause filter: pause-loop exiting).
        code::PAUSE => (ExitKind::Pause, after(raw, insn_len::PAUSE)),
        code::CPUID => (ExitKind::Cpuid, after(raw, insn_len::CPUID)),
        code::RDPMC => (ExitKind::Rdpmc, after(raw, insn_len::RDPMC)),
        code::HLT => (ExitKind::Hlt, after(raw, insn_len::HLT)),
        // IOIO: EXITINFO2 is the next RIP on every CPU (§15.10.2).
        code::IOIO => (ExitKind::Io(decode_ioio(raw.info1)), raw.info2),
        code::MSR => {
            if raw.info1 & 1 == 0 {
                (ExitKind::Rdmsr, after(raw, insn_len::RDMSR))
            } else {
                (ExitKind::Wrmsr, after(raw, insn_len::WRMSR))
            }
        }
        code::SHUTDOWN => (ExitKind::TripleFault, rip),
        code::VMMCALL => (ExitKind::Hypercall(HypercallInsn::Vmmcall), after(raw, insn_len::VMMCALL)),
        code::XSETBV => (ExitKind::Xsetbv, after(raw, insn_len::XSETBV)),
        // Vireo hides SVM (and RDPRU) from its guests: these instructions #UD, which the
        // core reflects. The #UD faults at the instruction, so RIP stays.
        code::VMRUN
        | code::VMLOAD
        | code::VMSAVE
        | code::STGI
        | code::CLGI
        | code::SKINIT
        | code::INVLPGA
        | code::RDPRU => (ExitKind::Exception { vector: VECTOR_UD, error_code: None }, rip),
        code::NPF => (ExitKind::NestedPageFault(decode_npf(raw.info1, raw.info2)), rip),
        code::INVALID => (ExitKind::EntryFailed { reason: "VMRUN failed: VMEXIT_INVALID", code: code::INVALID }, rip),
        code::BUSY => {
            (ExitKind::EntryFailed { reason: "VMRUN failed: VMEXIT_BUSY (VMSA in use)", code: code::BUSY }, rip)
        }
        _ => (ExitKind::Unhandled, rip),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(code: u64, info1: u64, info2: u64, nrip: Option<u64>) -> RawExit {
        RawExit { code, info1, info2, rip: 0x1000, nrip }
    }

    fn d(code: u64, info1: u64, info2: u64, nrip: Option<u64>) -> (ExitKind, u64) {
        decode(&raw(code, info1, info2, nrip))
    }

    #[test]
    fn instruction_exits_without_nrip_use_known_lengths() {
        assert_eq!(d(0x72, 0, 0, None), (ExitKind::Cpuid, 0x1002));
        assert_eq!(d(0x78, 0, 0, None), (ExitKind::Hlt, 0x1001));
        assert_eq!(d(0x7C, 0, 0, None), (ExitKind::Rdmsr, 0x1002));
        assert_eq!(d(0x7C, 1, 0, None), (ExitKind::Wrmsr, 0x1002));
        assert_eq!(d(0x81, 0, 0, None), (ExitKind::Hypercall(HypercallInsn::Vmmcall), 0x1003));
        assert_eq!(d(0x8D, 0, 0, None), (ExitKind::Xsetbv, 0x1003));
    }

    #[test]
    fn simple_instruction_exits_decode_as_the_full_decoder() {
        for code in 0..0x100u64 {
            for info1 in [0, 1] {
                for nrip in [None, Some(0), Some(0x1007)] {
                    if let Some((kind, len)) = simple_instruction_exit(code, info1) {
                        assert_eq!(d(code, info1, 0, nrip), (kind, next_rip(0x1000, nrip, len)), "{code:#x}");
                    }
                }
            }
        }
        assert_eq!(simple_instruction_exit(0x81, 0), Some((ExitKind::Hypercall(HypercallInsn::Vmmcall), 3)));
        assert_eq!(simple_instruction_exit(0x7B, 0), None, "IOIO");
        assert_eq!(simple_instruction_exit(code::INVALID, 0), None);
    }

    #[test]
    fn cheap_exits_decode_as_the_full_decoder() {
        let infos = [
            0,
            1,
            (0x3F8 << 16) | (1 << 4),
            (0x3FD << 16) | (1 << 4) | 1,
            (0x70 << 16) | (1 << 6) | (1 << 3) | (1 << 2),
        ];
        for code in 0..0x100u64 {
            for info1 in infos {
                for nrip in [None, Some(0), Some(0x1007)] {
                    if let Some(cheap) = cheap_exit(code, info1, 0x1002, 0x1000, nrip) {
                        assert_eq!(d(code, info1, 0x1002, nrip), cheap, "{code:#x} {info1:#x}");
                    }
                }
            }
        }
        assert!(cheap_exit(0x7B, 0, 0x1002, 0x1000, None).is_some(), "IOIO");
        assert_eq!(cheap_exit(code::NPF, 0, 0, 0x1000, None), None);
        assert_eq!(cheap_exit(code::INVALID, 0, 0, 0x1000, None), None);
    }

    #[test]
    fn instruction_exits_with_nrip_use_it() {
        // A prefixed CPUID (3 bytes): only nRIP gets it right.
        assert_eq!(d(0x72, 0, 0, Some(0x1003)), (ExitKind::Cpuid, 0x1003));
        assert_eq!(d(0x81, 0, 0, Some(0x1004)).1, 0x1004);
        assert_eq!(d(0x7C, 1, 0, Some(0x1005)), (ExitKind::Wrmsr, 0x1005));
        // A zero nRIP (never valid for an instruction exit) falls back to the length.
        assert_eq!(d(0x78, 0, 0, Some(0)), (ExitKind::Hlt, 0x1001));
    }

    #[test]
    fn ioio_decoding() {
        // OUT DX, AL to 0x3F8: size 8, not IN.
        let info1 = (0x3F8 << 16) | (1 << 4);
        let (kind, next) = d(0x7B, info1, 0x1001, None);
        assert_eq!(kind, ExitKind::Io(IoAccess { port: 0x3F8, size: 1, write: true, string: false, rep: false }));
        assert_eq!(next, 0x1001, "IOIO next RIP is EXITINFO2 even without nRIP");
        // REP INSW from 0x1F0 with a 64-bit address size (bit 9).
        let info1 = (0x1F0 << 16) | (1 << 9) | (1 << 5) | (1 << 3) | (1 << 2) | 1;
        assert_eq!(decode_ioio(info1), IoAccess { port: 0x1F0, size: 2, write: false, string: true, rep: true });
        // IN EAX, 0xF4 (32-bit), nRIP present but EXITINFO2 still wins.
        let (kind, next) = d(0x7B, (0xF4 << 16) | (1 << 6) | 1, 0x1002, Some(0x9999));
        assert_eq!(kind, ExitKind::Io(IoAccess { port: 0xF4, size: 4, write: false, string: false, rep: false }));
        assert_eq!(next, 0x1002);
        assert_eq!(decode_ioio(0xFFFF_0000 | (1 << 4)).port, 0xFFFF);
    }

    #[test]
    fn exceptions_carry_error_codes_only_where_defined() {
        assert_eq!(d(0x40 + 6, 0x55, 0, None), (ExitKind::Exception { vector: 6, error_code: None }, 0x1000));
        assert_eq!(d(0x40 + 13, 0x18, 0, None).0, ExitKind::Exception { vector: 13, error_code: Some(0x18) });
        assert_eq!(d(0x40 + 14, 0x6, 0xdead_b000, None).0, ExitKind::Exception { vector: 14, error_code: Some(6) });
        assert_eq!(d(0x40 + 8, 0, 0, None).0, ExitKind::Exception { vector: 8, error_code: Some(0) });
        assert_eq!(d(0x40 + 3, 0, 0, None).0, ExitKind::Exception { vector: 3, error_code: None });
        assert_eq!(d(0x5F, 0, 0, None).0, ExitKind::Exception { vector: 31, error_code: None });
        assert!(has_error_code(17) && has_error_code(21) && !has_error_code(18) && !has_error_code(1));
    }

    #[test]
    fn svm_instructions_become_ud() {
        for c in [0x80, 0x82, 0x83, 0x84, 0x85, 0x86, 0x7A, 0x8E] {
            assert_eq!(
                d(c, 0, 0, Some(0x1003)),
                (ExitKind::Exception { vector: 6, error_code: None }, 0x1000),
                "{c:#x}"
            );
        }
    }

    #[test]
    fn npf_decoding() {
        // Write to a not-present page.
        let (kind, next) = d(0x400, 0b10 | (1 << 32), 0xFEE0_0030, None);
        assert_eq!(
            kind,
            ExitKind::NestedPageFault(NptAccess {
                gpa: 0xFEE0_0030,
                write: true,
                fetch: false,
                present: false,
                gla: None
            })
        );
        assert_eq!(next, 0x1000);
        // Fetch from a present (no-execute) page.
        assert_eq!(
            decode_npf(0b1_0001, 0x20_0000),
            NptAccess { gpa: 0x20_0000, write: false, fetch: true, present: true, gla: None }
        );
    }

    #[test]
    fn events_and_failures() {
        assert_eq!(d(0x60, 0, 0, None).0, ExitKind::ExternalInterrupt { vector: None });
        assert_eq!(d(0x61, 0, 0, None).0, ExitKind::Nmi);
        assert_eq!(d(0x63, 0, 0, None).0, ExitKind::Init);
        assert_eq!(d(0x64, 0, 0, None).0, ExitKind::InterruptWindow);
        assert_eq!(d(0x7F, 0, 0, None).0, ExitKind::TripleFault);
        assert_eq!(d(0x77, 0, 0, None), (ExitKind::Pause, 0x1002));
        assert_eq!(d(0x6F, 0, 0, None), (ExitKind::Rdpmc, 0x1002));
        assert!(matches!(d(u64::MAX, 0, 0, None).0, ExitKind::EntryFailed { code: u64::MAX, .. }));
        assert!(matches!(d(u64::MAX - 1, 0, 0, None).0, ExitKind::EntryFailed { .. }));
        // QEMU TCG's 32-bit VMEXIT_INVALID.
        assert!(matches!(d(0xFFFF_FFFF, 0, 0, None).0, ExitKind::EntryFailed { code: u64::MAX, .. }));
        assert_eq!(normalize(0xFFFF_FFFF), code::INVALID);
        assert_eq!(normalize(0xFFFF_FFFE), code::BUSY);
        assert_eq!(normalize(0x400), 0x400);
        // Unknown or unhandled: CR0 read, RDTSC, task switch, AVIC.
        for c in [0x00, 0x6E, 0x7D, 0x401] {
            assert_eq!(d(c, 0, 0, None), (ExitKind::Unhandled, 0x1000));
        }
    }
}
