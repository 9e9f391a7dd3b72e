//! String port I/O (INS/OUTS, with or without REP): decoding the instruction behind an I/O
//! exit and the register arithmetic of each element (SDM Vol. 2B "INS/INSB/INSW/INSD",
//! "OUTS/OUTSB/OUTSW/OUTSD", "REP/REPE/REPZ/REPNE/REPNZ").
//!
//! The hardware's exit information says port, size, direction, string and REP, but the
//! address size and the source segment of OUTS only with decode assists (SVM) or the
//! instruction-information field (VMX); decoding the instruction itself (with `iced-x86`,
//! as `mmio` does) gives them on every CPU, and its length where the CPU has no nRIP-save.
//! Pure and host-tested; the run loop (`vcpu`) moves the data.

use iced_x86::{Code, Decoder, DecoderOptions, OpKind, Register};

use super::state::SegReg;

/// What a decoded INS/OUTS does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StringIo {
    /// INS (port to memory at ES:rDI); else OUTS (memory at seg:rSI to port).
    pub ins: bool,
    /// Element size in bytes (1, 2, 4).
    pub size: u8,
    /// Address size in bytes (2, 4, 8): which part of rSI/rDI/rCX counts.
    pub addr_size: u8,
    /// The memory operand's segment (ES for INS; DS or an override for OUTS).
    pub seg: SegReg,
    /// REP (or REPNE, which INS/OUTS treat alike) prefix: rCX elements.
    pub rep: bool,
    /// Instruction length.
    pub len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringIoError {
    Invalid,
    /// Decoded, but not INS or OUTS.
    NotStringIo(Code),
}

impl core::fmt::Display for StringIoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StringIoError::Invalid => f.write_str("invalid instruction at a string I/O exit"),
            StringIoError::NotStringIo(c) => write!(f, "instruction {c:?} at a string I/O exit is not INS or OUTS"),
        }
    }
}

fn seg_of(r: Register) -> SegReg {
    match r {
        Register::ES => SegReg::Es,
        Register::CS => SegReg::Cs,
        Register::SS => SegReg::Ss,
        Register::FS => SegReg::Fs,
        Register::GS => SegReg::Gs,
        _ => SegReg::Ds,
    }
}

/// Decodes the instruction `bytes` in a `bitness`-bit code segment.
pub fn decode(bytes: &[u8], bitness: u32) -> Result<StringIo, StringIoError> {
    let mut decoder = Decoder::new(bitness, bytes, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(StringIoError::Invalid);
    }
    let (ins, size) = match insn.code() {
        Code::Insb_m8_DX => (true, 1),
        Code::Insw_m16_DX => (true, 2),
        Code::Insd_m32_DX => (true, 4),
        Code::Outsb_DX_m8 => (false, 1),
        Code::Outsw_DX_m16 => (false, 2),
        Code::Outsd_DX_m32 => (false, 4),
        c => return Err(StringIoError::NotStringIo(c)),
    };
    let mem_op = if ins { insn.op0_kind() } else { insn.op1_kind() };
    let addr_size = match mem_op {
        OpKind::MemoryESDI | OpKind::MemorySegSI => 2,
        OpKind::MemoryESEDI | OpKind::MemorySegESI => 4,
        _ => 8,
    };
    let seg = if ins { SegReg::Es } else { seg_of(insn.memory_segment()) };
    Ok(StringIo { ins, size, addr_size, seg, rep: insn.has_rep_prefix() || insn.has_repne_prefix(), len: insn.len() })
}

/// The mask of an address-size register part.
pub fn mask(addr_size: u8) -> u64 {
    match addr_size {
        2 => 0xFFFF,
        4 => 0xFFFF_FFFF,
        _ => u64::MAX,
    }
}

/// `reg` after adding `delta` to its `addr_size` part: a 16-bit update keeps the upper bits,
/// a 32-bit one zero-extends (as any 32-bit register write does), a 64-bit one is whole.
pub fn add(reg: u64, addr_size: u8, delta: i64) -> u64 {
    let m = mask(addr_size);
    let new = (reg & m).wrapping_add(delta as u64) & m;
    match addr_size {
        2 => (reg & !m) | new,
        _ => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_ins_and_outs() {
        // rep outsb in 32-bit code.
        let d = decode(&[0xF3, 0x6E], 32).unwrap();
        assert_eq!(d, StringIo { ins: false, size: 1, addr_size: 4, seg: SegReg::Ds, rep: true, len: 2 });
        // insd without REP, 64-bit: RDI.
        let d = decode(&[0x6D], 64).unwrap();
        assert_eq!((d.ins, d.size, d.addr_size, d.seg, d.rep, d.len), (true, 4, 8, SegReg::Es, false, 1));
        // Operand-size prefix: outsw; address-size prefix in 64-bit mode: ESI.
        let d = decode(&[0x66, 0x67, 0x6F], 64).unwrap();
        assert_eq!((d.size, d.addr_size, d.len), (2, 4, 3));
        // 16-bit code: outsw with SI; with 0x66, outsd.
        assert_eq!(decode(&[0x6F], 16).unwrap().addr_size, 2);
        assert_eq!(decode(&[0x6F], 16).unwrap().size, 2);
        assert_eq!(decode(&[0x66, 0x6F], 16).unwrap().size, 4);
        // A segment override applies to OUTS' source.
        assert_eq!(decode(&[0x64, 0xF3, 0x6E], 32).unwrap().seg, SegReg::Fs);
        assert_eq!(decode(&[0x2E, 0x6E], 32).unwrap().seg, SegReg::Cs);
        // ...but not to INS' destination (always ES).
        assert_eq!(decode(&[0x64, 0x6C], 32).unwrap().seg, SegReg::Es);
        // REPNE acts as REP.
        assert!(decode(&[0xF2, 0x6C], 32).unwrap().rep);
        // Anything else is refused.
        assert!(matches!(decode(&[0xEE], 32), Err(StringIoError::NotStringIo(_))));
        assert_eq!(decode(&[], 32), Err(StringIoError::Invalid));
        assert_eq!(decode(&[0xF3], 32), Err(StringIoError::Invalid));
    }

    #[test]
    fn register_updates_follow_the_address_size() {
        assert_eq!(add(0x1234_5678_0000_FFFF, 2, 1), 0x1234_5678_0000_0000, "16-bit wraps, keeps the rest");
        assert_eq!(add(0xFFFF_FFFF_0000_0010, 4, -4), 0xC, "32-bit zero-extends");
        assert_eq!(add(0xFFFF_FFFF, 4, 1), 0);
        assert_eq!(add(u64::MAX, 8, 1), 0);
        assert_eq!(add(10, 8, -1), 9);
        assert_eq!(mask(2), 0xFFFF);
    }
}
