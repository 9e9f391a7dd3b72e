//! Emulating the guest instruction behind a nested-page fault on an address that is not
//! guest RAM (device registers, or nothing at all).
//!
//! The faulting instruction is fetched from guest memory (through the guest's own page
//! tables) and decoded with `iced-x86`, a complete, well-tested x86 decoder: hand-decoding
//! ModRM/SIB/prefixes is exactly the kind of code that breaks on the instruction nobody
//! tested. Only the data-moving forms compilers emit for device access are emulated:
//! MOV loads and stores (register and immediate sources) and MOVZX/MOVSX loads.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};

use super::regs::GuestRegs;

/// What the instruction does with the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read `size` bytes, then put them in register `reg` (encoding index).
    Load { size: u8, dest: Dest },
    /// Write the low `size` bytes of `value`.
    Store { size: u8, value: u64 },
}

/// Where a load's value goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dest {
    /// Register index (0 = RAX .. 15 = R15).
    pub reg: usize,
    /// Destination operand size in bytes (1, 2, 4, 8).
    pub width: u8,
    /// AH/CH/DH/BH.
    pub high_byte: bool,
    /// MOVSX: sign-extend the loaded value to `width`.
    pub sign_extend: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub access: Access,
    /// Instruction length: RIP advances by this much.
    pub len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Invalid,
    /// Decoded, but not an instruction Vireo emulates for device access.
    Unsupported(Code),
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::Invalid => f.write_str("invalid instruction"),
            DecodeError::Unsupported(code) => write!(f, "instruction {code:?} is not emulated for MMIO"),
        }
    }
}

fn reg_index(r: Register) -> Option<(usize, bool)> {
    let high = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
    let full = match r {
        Register::AH => Register::RAX,
        Register::CH => Register::RCX,
        Register::DH => Register::RDX,
        Register::BH => Register::RBX,
        _ => r.full_register(),
    };
    let n = (full as u32).checked_sub(Register::RAX as u32)? as usize;
    (n < 16).then_some((n, high))
}

fn reg_value(regs: &GuestRegs, r: Register) -> Option<u64> {
    let (n, high) = reg_index(r)?;
    let v = regs.get(n);
    Some(if high { (v >> 8) & 0xFF } else { v })
}

/// Decodes `bytes` (fetched at `rip`) in a `bitness`-bit code segment.
pub fn decode(bytes: &[u8], rip: u64, bitness: u32, regs: &GuestRegs) -> Result<Decoded, DecodeError> {
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let insn: Instruction = decoder.decode();
    if insn.is_invalid() {
        return Err(DecodeError::Invalid);
    }
    let unsupported = || DecodeError::Unsupported(insn.code());
    let mem_size = insn.memory_size().size() as u8;
    let access = match insn.mnemonic() {
        iced_x86::Mnemonic::Mov if insn.op0_kind() == OpKind::Memory => {
            let value = match insn.op1_kind() {
                OpKind::Register => reg_value(regs, insn.op1_register()).ok_or_else(unsupported)?,
                OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate32to64 => {
                    insn.immediate(1)
                }
                _ => return Err(unsupported()),
            };
            Access::Store { size: mem_size, value }
        }
        iced_x86::Mnemonic::Mov | iced_x86::Mnemonic::Movzx | iced_x86::Mnemonic::Movsx
            if insn.op1_kind() == OpKind::Memory && insn.op0_kind() == OpKind::Register =>
        {
            let r = insn.op0_register();
            let (reg, high_byte) = reg_index(r).ok_or_else(unsupported)?;
            let dest = Dest {
                reg,
                width: r.size() as u8,
                high_byte,
                sign_extend: insn.mnemonic() == iced_x86::Mnemonic::Movsx,
            };
            Access::Load { size: mem_size, dest }
        }
        _ => return Err(unsupported()),
    };
    if !matches!(mem_size, 1 | 2 | 4 | 8) {
        return Err(unsupported());
    }
    Ok(Decoded { access, len: insn.len() })
}

/// Writes a loaded `value` (of the access size) into the destination register with the
/// architectural rules: 8/16-bit writes keep the other bits, 32-bit writes zero the upper
/// half, MOVSX sign-extends.
pub fn complete_load(regs: &mut GuestRegs, size: u8, dest: Dest, value: u64) {
    let mask = |bytes: u8| if bytes >= 8 { u64::MAX } else { (1u64 << (bytes as u32 * 8)) - 1 };
    let mut v = value & mask(size);
    if dest.sign_extend && size < 8 {
        let shift = 64 - size as u32 * 8;
        v = (((v << shift) as i64) >> shift) as u64;
    }
    let old = regs.get(dest.reg);
    let new = match (dest.width, dest.high_byte) {
        (1, true) => (old & !0xFF00) | ((v & 0xFF) << 8),
        (1, false) => (old & !0xFF) | (v & 0xFF),
        (2, _) => (old & !0xFFFF) | (v & 0xFFFF),
        (4, _) => v & 0xFFFF_FFFF,
        _ => v,
    };
    regs.set(dest.reg, new);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> GuestRegs {
        GuestRegs { rax: 0x1111_2222_3333_4444, rbx: 0xAABB, rcx: 0xFEE0_0000, ..Default::default() }
    }

    #[test]
    fn loads() {
        // mov eax, [rcx]  (8B 01)
        let d = decode(&[0x8B, 0x01], 0x1000, 64, &regs()).unwrap();
        assert_eq!(d.len, 2);
        let Access::Load { size: 4, dest } = d.access else { panic!("{d:?}") };
        let mut r = regs();
        complete_load(&mut r, 4, dest, 0xFFFF_FFFF);
        assert_eq!(r.rax, 0xFFFF_FFFF, "32-bit load zero-extends");
        // mov al, [rcx] (8A 01): keeps the upper bits
        let d = decode(&[0x8A, 0x01], 0, 64, &regs()).unwrap();
        let Access::Load { size: 1, dest } = d.access else { panic!() };
        let mut r = regs();
        complete_load(&mut r, 1, dest, 0xFF);
        assert_eq!(r.rax, 0x1111_2222_3333_44FF);
        // mov ah, [rcx] (8A 21)
        let d = decode(&[0x8A, 0x21], 0, 64, &regs()).unwrap();
        let Access::Load { size: 1, dest } = d.access else { panic!() };
        assert!(dest.high_byte);
        let mut r = regs();
        complete_load(&mut r, 1, dest, 0x7F);
        assert_eq!(r.rax, 0x1111_2222_3333_7F44);
        // mov r9, [rcx+8] (4C 8B 49 08)
        let d = decode(&[0x4C, 0x8B, 0x49, 0x08], 0, 64, &regs()).unwrap();
        assert_eq!(d.len, 4);
        let Access::Load { size: 8, dest } = d.access else { panic!() };
        assert_eq!(dest.reg, 9);
        // movsx eax, byte [rcx] (0F BE 01)
        let d = decode(&[0x0F, 0xBE, 0x01], 0, 64, &regs()).unwrap();
        let Access::Load { size: 1, dest } = d.access else { panic!() };
        let mut r = regs();
        complete_load(&mut r, 1, dest, 0x80);
        assert_eq!(r.rax, 0xFFFF_FF80);
        // movzx ebx, word [rcx] (0F B7 19)
        let d = decode(&[0x0F, 0xB7, 0x19], 0, 64, &regs()).unwrap();
        let Access::Load { size: 2, dest } = d.access else { panic!() };
        let mut r = regs();
        complete_load(&mut r, 2, dest, 0xFFFF);
        assert_eq!(r.rbx, 0xFFFF);
    }

    #[test]
    fn stores() {
        // mov [rcx], ebx (89 19)
        let d = decode(&[0x89, 0x19], 0, 64, &regs()).unwrap();
        assert_eq!(d.access, Access::Store { size: 4, value: 0xAABB });
        // mov dword [rcx], 0x12345678 (C7 01 78 56 34 12)
        let d = decode(&[0xC7, 0x01, 0x78, 0x56, 0x34, 0x12], 0, 64, &regs()).unwrap();
        assert_eq!(d.access, Access::Store { size: 4, value: 0x1234_5678 });
        assert_eq!(d.len, 6);
        // mov byte [rcx], bh (88 39)
        let d = decode(&[0x88, 0x39], 0, 64, &regs()).unwrap();
        assert_eq!(d.access, Access::Store { size: 1, value: 0xAA });
    }

    #[test]
    fn others_are_refused() {
        // add [rcx], eax (01 01)
        assert!(matches!(decode(&[0x01, 0x01], 0, 64, &regs()), Err(DecodeError::Unsupported(_))));
        // mov eax, ebx (89 D8): no memory operand
        assert!(matches!(decode(&[0x89, 0xD8], 0, 64, &regs()), Err(DecodeError::Unsupported(_))));
        assert_eq!(decode(&[0x0F, 0xFF], 0, 64, &regs()), Err(DecodeError::Invalid));
        assert_eq!(decode(&[], 0, 64, &regs()), Err(DecodeError::Invalid));
    }
}
