//! Emulating the guest instruction behind a nested-page fault on an address that is not
//! guest RAM (device registers, or nothing at all).
//!
//! The faulting instruction is fetched from guest memory (through the guest's own page
//! tables) and decoded with `iced-x86`, a complete, well-tested x86 decoder: hand-decoding
//! ModRM/SIB/prefixes is exactly the kind of code that breaks on the instruction nobody
//! tested. The forms compilers and drivers emit for device access are emulated: MOV loads and
//! stores (register and immediate sources), MOVZX/MOVSX loads, XCHG with a register, and the
//! arithmetic and logic forms that read a register and set flags (`cmp byte [mmio], 0`,
//! `test [mmio], reg`, `or [mmio], imm`, `add reg, [mmio]`, ...: ADD, SUB, AND, OR, XOR, CMP,
//! TEST), with RFLAGS computed as the SDM's instruction pages define them ([`alu`]). A
//! read-modify-write form reads the device once and writes it once, as the CPU's bus
//! cycles would; LOCK is accepted (one vCPU's access to a device is atomic for Vireo).

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};

use super::regs::GuestRegs;

/// What the instruction does with the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read `size` bytes, then put them in register `reg` (encoding index).
    Load { size: u8, dest: Dest },
    /// Write the low `size` bytes of `value`.
    Store { size: u8, value: u64 },
    /// Read `size` bytes, combine them with `operand` by `op` ([`alu`]), set the arithmetic
    /// flags; the result goes back to the device (`to`: None) or into a register, or nowhere
    /// (CMP, TEST).
    Alu { size: u8, op: AluOp, operand: u64, to: AluDest },
    /// XCHG: read `size` bytes into register `dest`, write `value` (the register's old value).
    Exchange { size: u8, dest: Dest, value: u64 },
}

/// An arithmetic or logic operation on a device value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluOp {
    Add,
    Sub,
    And,
    Or,
    Xor,
    /// SUB that only sets flags.
    Cmp,
    /// AND that only sets flags.
    Test,
}

/// Where an [`Access::Alu`] result goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluDest {
    /// Back to the device (`op [mem], src`).
    Memory,
    /// Into a register (`op reg, [mem]`: the register is the first operand, the device value
    /// the second).
    Register(Dest),
    /// Nowhere: CMP and TEST; `true` for the `cmp reg, [mem]` form (register first).
    Flags(bool),
}

/// The RFLAGS bits the arithmetic instructions write: CF, PF, AF, ZF, SF, OF.
pub const ARITH_FLAGS: u64 = 1 | 1 << 2 | 1 << 4 | 1 << 6 | 1 << 7 | 1 << 11;

/// `a op b` on `size`-byte operands: the result (masked to the size) and the arithmetic flags
/// (SDM Vol. 2 ADD/SUB/CMP: CF carry or borrow out of the top bit, OF signed overflow, AF
/// carry or borrow out of bit 3, SF the top bit, ZF zero, PF even parity of the low byte;
/// AND/OR/XOR/TEST clear CF and OF, AF is undefined and left 0).
pub fn alu(op: AluOp, size: u8, a: u64, b: u64) -> (u64, u64) {
    let bits = u32::from(size) * 8;
    let mask = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let top = 1u64 << (bits - 1);
    let (a, b) = (a & mask, b & mask);
    let (r, cf, of, af) = match op {
        AluOp::Add => {
            let r = a.wrapping_add(b) & mask;
            let cf = if bits >= 64 { a.checked_add(b).is_none() } else { a + b > mask };
            (r, cf, (!(a ^ b) & (a ^ r) & top) != 0, ((a ^ b ^ r) & 0x10) != 0)
        }
        AluOp::Sub | AluOp::Cmp => {
            let r = a.wrapping_sub(b) & mask;
            (r, a < b, ((a ^ b) & (a ^ r) & top) != 0, ((a ^ b ^ r) & 0x10) != 0)
        }
        AluOp::And | AluOp::Test => (a & b, false, false, false),
        AluOp::Or => (a | b, false, false, false),
        AluOp::Xor => (a ^ b, false, false, false),
    };
    let mut f = 0;
    if cf {
        f |= 1;
    }
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= 1 << 2;
    }
    if af {
        f |= 1 << 4;
    }
    if r == 0 {
        f |= 1 << 6;
    }
    if r & top != 0 {
        f |= 1 << 7;
    }
    if of {
        f |= 1 << 11;
    }
    (r, f)
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
    let source = |op: u32| -> Result<u64, DecodeError> {
        match insn.op_kind(op) {
            OpKind::Register => reg_value(regs, insn.op_register(op)).ok_or_else(unsupported),
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => Ok(insn.immediate(op)),
            _ => Err(unsupported()),
        }
    };
    let dest_of = |r: Register| -> Result<Dest, DecodeError> {
        let (reg, high_byte) = reg_index(r).ok_or_else(unsupported)?;
        Ok(Dest { reg, width: r.size() as u8, high_byte, sign_extend: false })
    };
    let alu_op = match insn.mnemonic() {
        iced_x86::Mnemonic::Add => Some(AluOp::Add),
        iced_x86::Mnemonic::Sub => Some(AluOp::Sub),
        iced_x86::Mnemonic::And => Some(AluOp::And),
        iced_x86::Mnemonic::Or => Some(AluOp::Or),
        iced_x86::Mnemonic::Xor => Some(AluOp::Xor),
        iced_x86::Mnemonic::Cmp => Some(AluOp::Cmp),
        iced_x86::Mnemonic::Test => Some(AluOp::Test),
        _ => None,
    };
    let access = match insn.mnemonic() {
        _ if alu_op.is_some() && insn.op_count() == 2 => {
            let op = alu_op.unwrap_or(AluOp::Cmp);
            let flags_only = matches!(op, AluOp::Cmp | AluOp::Test);
            if insn.op0_kind() == OpKind::Memory {
                let operand = source(1)?;
                let to = if flags_only { AluDest::Flags(false) } else { AluDest::Memory };
                Access::Alu { size: mem_size, op, operand, to }
            } else if insn.op1_kind() == OpKind::Memory && insn.op0_kind() == OpKind::Register {
                // `op reg, [mem]`: the register is the first operand.
                let r = insn.op0_register();
                let operand = reg_value(regs, r).ok_or_else(unsupported)?;
                let to = if flags_only { AluDest::Flags(true) } else { AluDest::Register(dest_of(r)?) };
                Access::Alu { size: mem_size, op, operand, to }
            } else {
                return Err(unsupported());
            }
        }
        iced_x86::Mnemonic::Xchg => {
            let r = match (insn.op0_kind(), insn.op1_kind()) {
                (OpKind::Memory, OpKind::Register) => insn.op1_register(),
                (OpKind::Register, OpKind::Memory) => insn.op0_register(),
                _ => return Err(unsupported()),
            };
            let value = reg_value(regs, r).ok_or_else(unsupported)?;
            let mask = if mem_size >= 8 { u64::MAX } else { (1u64 << (u32::from(mem_size) * 8)) - 1 };
            Access::Exchange { size: mem_size, dest: dest_of(r)?, value: value & mask }
        }
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

/// The operation's result and its RFLAGS: `Some(value to write back)` for the forms that
/// write the device, and the register result written into `regs`.
pub fn complete_alu(
    regs: &mut GuestRegs,
    rflags: &mut u64,
    size: u8,
    op: AluOp,
    operand: u64,
    to: AluDest,
    loaded: u64,
) -> Option<u64> {
    let (a, b) = match to {
        // `op reg, [mem]`: reg op mem.
        AluDest::Register(_) | AluDest::Flags(true) => (operand, loaded),
        // `op [mem], src`.
        AluDest::Memory | AluDest::Flags(false) => (loaded, operand),
    };
    let (r, f) = alu(op, size, a, b);
    *rflags = (*rflags & !ARITH_FLAGS) | f;
    match to {
        AluDest::Memory => Some(r),
        AluDest::Register(dest) => {
            complete_load(regs, size, dest, r);
            None
        }
        AluDest::Flags(_) => None,
    }
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
    fn flag_setting_forms() {
        // cmp byte [rcx], 0 (80 39 00): flags only, the device value first.
        let d = decode(&[0x80, 0x39, 0x00], 0, 64, &regs()).unwrap();
        assert_eq!(d.access, Access::Alu { size: 1, op: AluOp::Cmp, operand: 0, to: AluDest::Flags(false) });
        let mut r = regs();
        let mut fl = 0x202;
        assert_eq!(complete_alu(&mut r, &mut fl, 1, AluOp::Cmp, 0, AluDest::Flags(false), 0), None);
        assert_eq!(fl, 0x202 | 1 << 6 | 1 << 2, "ZF and PF; IF kept");
        // cmp eax, [rcx] (3B 01): the register first: eax - mem.
        let d = decode(&[0x3B, 0x01], 0, 64, &regs()).unwrap();
        let Access::Alu { size: 4, op: AluOp::Cmp, operand, to: AluDest::Flags(true) } = d.access else {
            panic!("{d:?}")
        };
        let mut fl = 0;
        complete_alu(&mut r, &mut fl, 4, AluOp::Cmp, operand, AluDest::Flags(true), 0x3333_4445);
        assert_eq!(fl & 1, 1, "0x33334444 - 0x33334445 borrows");
        // test [rcx], ebx (85 19)
        let d = decode(&[0x85, 0x19], 0, 64, &regs()).unwrap();
        assert_eq!(d.access, Access::Alu { size: 4, op: AluOp::Test, operand: 0xAABB, to: AluDest::Flags(false) });
        // lock or dword [rcx], 0x80 (F0 83 09 80): sign-extended imm8, written back.
        let d = decode(&[0xF0, 0x83, 0x09, 0x80], 0, 64, &regs()).unwrap();
        assert_eq!(d.len, 4);
        let Access::Alu { size: 4, op: AluOp::Or, operand, to: AluDest::Memory } = d.access else { panic!("{d:?}") };
        let mut fl = 0;
        assert_eq!(complete_alu(&mut r, &mut fl, 4, AluOp::Or, operand, AluDest::Memory, 0x1), Some(0xFFFF_FF81));
        assert_eq!(fl & (1 << 7), 1 << 7, "SF");
        // add eax, [rcx] (03 01): into the register, zero-extended (32-bit destination).
        let d = decode(&[0x03, 0x01], 0, 64, &regs()).unwrap();
        let Access::Alu { size: 4, op: AluOp::Add, operand, to } = d.access else { panic!("{d:?}") };
        let mut r = regs();
        assert_eq!(complete_alu(&mut r, &mut fl, 4, AluOp::Add, operand, to, 0xCCCC_BBBC), None);
        assert_eq!(r.rax, 0, "0x33334444 + 0xCCCCBBBC wraps to 0");
        assert_eq!(fl & (1 | 1 << 6), 1 | 1 << 6, "CF and ZF");
        // xchg [rcx], bl (86 19)
        let d = decode(&[0x86, 0x19], 0, 64, &regs()).unwrap();
        let Access::Exchange { size: 1, dest, value: 0xBB } = d.access else { panic!("{d:?}") };
        let mut r = regs();
        complete_load(&mut r, 1, dest, 0x12);
        assert_eq!(r.rbx, 0xAA12);
    }

    /// The flags against the host CPU's own ADD/SUB/AND/OR/XOR, every size, random operands.
    #[test]
    fn alu_flags_match_the_cpu() {
        fn cpu(op: AluOp, size: u8, a: u64, b: u64) -> (u64, u64) {
            let (mut r, f): (u64, u64);
            macro_rules! run {
                ($insn:literal, $ra:literal, $rb:literal) => {
                    // SAFETY: register-only arithmetic and a push/pop of the flags on the
                    // test thread's own stack.
                    unsafe {
                        r = a;
                        core::arch::asm!(concat!($insn, " ", $ra, ", ", $rb, "\n pushfq\n pop {f}"),
                            a = inout(reg) r, b = in(reg) b, f = out(reg) f)
                    }
                };
            }
            macro_rules! sized {
                ($insn:literal) => {
                    match size {
                        1 => run!($insn, "{a:l}", "{b:l}"),
                        2 => run!($insn, "{a:x}", "{b:x}"),
                        4 => run!($insn, "{a:e}", "{b:e}"),
                        _ => run!($insn, "{a}", "{b}"),
                    }
                };
            }
            match op {
                AluOp::Add => sized!("add"),
                AluOp::Sub | AluOp::Cmp => sized!("sub"),
                AluOp::And | AluOp::Test => sized!("and"),
                AluOp::Or => sized!("or"),
                AluOp::Xor => sized!("xor"),
            }
            let mask = if size == 8 { u64::MAX } else { (1u64 << (size * 8)) - 1 };
            (r & mask, f)
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Some edge values often: 0, all ones, the sign bit, small numbers.
            match x % 8 {
                0 => 0,
                1 => u64::MAX,
                2 => 1 << ((x >> 8) % 64),
                3 => x % 17,
                _ => x,
            }
        };
        for _ in 0..20_000 {
            let (a, b) = (next(), next());
            for op in [AluOp::Add, AluOp::Sub, AluOp::And, AluOp::Or, AluOp::Xor] {
                for size in [1u8, 2, 4, 8] {
                    let (want_r, want_f) = cpu(op, size, a, b);
                    let (r, f) = alu(op, size, a, b);
                    // AF is undefined after the logic instructions.
                    let checked =
                        if matches!(op, AluOp::Add | AluOp::Sub) { ARITH_FLAGS } else { ARITH_FLAGS & !(1 << 4) };
                    assert_eq!(r, want_r, "{op:?} size {size} {a:#x} {b:#x}");
                    assert_eq!(f & checked, want_f & checked, "{op:?} size {size} {a:#x} {b:#x}");
                }
            }
        }
    }

    #[test]
    fn others_are_refused() {
        // inc dword [rcx] (FF 01)
        assert!(matches!(decode(&[0xFF, 0x01], 0, 64, &regs()), Err(DecodeError::Unsupported(_))));
        // mov eax, ebx (89 D8): no memory operand
        assert!(matches!(decode(&[0x89, 0xD8], 0, 64, &regs()), Err(DecodeError::Unsupported(_))));
        assert_eq!(decode(&[0x0F, 0xFF], 0, 64, &regs()), Err(DecodeError::Invalid));
        assert_eq!(decode(&[], 0, 64, &regs()), Err(DecodeError::Invalid));
    }
}
