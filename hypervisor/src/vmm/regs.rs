//! Guest general-purpose registers, in the x86 encoding order (RAX=0 ... R15=15), so an
//! instruction emulator can index them by register number.

/// The guest's general-purpose registers. Backends load them before entry and save them
/// after exit (RAX and RSP live in the VMCB on SVM, RSP in the VMCS on VMX; the backend
/// keeps this struct authoritative across `Backend::run`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegs {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}
const _: () = assert!(core::mem::size_of::<GuestRegs>() == 16 * 8);

/// Byte offsets of each register in [`GuestRegs`], for the backends' assembly.
pub mod offset {
    pub const RAX: usize = 0;
    pub const RCX: usize = 8;
    pub const RDX: usize = 16;
    pub const RBX: usize = 24;
    pub const RSP: usize = 32;
    pub const RBP: usize = 40;
    pub const RSI: usize = 48;
    pub const RDI: usize = 56;
    pub const R8: usize = 64;
    pub const R9: usize = 72;
    pub const R10: usize = 80;
    pub const R11: usize = 88;
    pub const R12: usize = 96;
    pub const R13: usize = 104;
    pub const R14: usize = 112;
    pub const R15: usize = 120;
}

impl GuestRegs {
    /// Register `n` in encoding order (0 = RAX ... 15 = R15).
    pub fn get(&self, n: usize) -> u64 {
        self.as_array()[n & 15]
    }

    pub fn set(&mut self, n: usize, value: u64) {
        let mut a = self.as_array();
        a[n & 15] = value;
        *self = Self::from_array(a);
    }

    fn as_array(&self) -> [u64; 16] {
        [
            self.rax, self.rcx, self.rdx, self.rbx, self.rsp, self.rbp, self.rsi, self.rdi, self.r8, self.r9, self.r10,
            self.r11, self.r12, self.r13, self.r14, self.r15,
        ]
    }

    fn from_array(a: [u64; 16]) -> Self {
        Self {
            rax: a[0],
            rcx: a[1],
            rdx: a[2],
            rbx: a[3],
            rsp: a[4],
            rbp: a[5],
            rsi: a[6],
            rdi: a[7],
            r8: a[8],
            r9: a[9],
            r10: a[10],
            r11: a[11],
            r12: a[12],
            r13: a[13],
            r14: a[14],
            r15: a[15],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_layout() {
        let r = GuestRegs::default();
        let base = &r as *const _ as usize;
        assert_eq!(&r.rbx as *const _ as usize - base, offset::RBX);
        assert_eq!(&r.rsp as *const _ as usize - base, offset::RSP);
        assert_eq!(&r.r15 as *const _ as usize - base, offset::R15);
        let mut r = GuestRegs::default();
        r.set(3, 7);
        assert_eq!(r.rbx, 7);
        assert_eq!(r.get(3), 7);
        r.set(12, 9);
        assert_eq!(r.r12, 9);
    }
}
