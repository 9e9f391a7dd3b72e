//! Vireo's hypercall ABI.
//!
//! Register convention (the same as KVM's, so one guest-side stub serves both):
//! - RAX = hypercall number; RBX, RCX, RDX, RSI = arguments 0..3.
//! - Result in RAX: >= 0 success, negative = `-errno` from [`errno`].
//! - Every other register is preserved.
//! - Instruction: VMCALL (0F 01 C1) or VMMCALL (0F 01 D9). Vireo accepts both on either
//!   vendor, so a guest need not know the CPU vendor.
//! - Only CPL 0 may call; other privilege levels get `-EPERM`.
//!
//! Vireo's numbers live at 0x5649_xxxx ("VI") so they never collide with KVM's (1..12),
//! which Vireo will also serve for stock Linux guests.

/// Base of Vireo's hypercall numbers.
pub const BASE: u64 = 0x5649_0000;

/// Hypercall numbers.
pub mod nr {
    use super::BASE;
    /// Returns argument 0 + 1: the cheapest round trip, for latency measurements.
    pub const PING: u64 = BASE;
    /// Returns [`crate::ABI_VERSION`].
    pub const VERSION: u64 = BASE + 1;
    /// Writes the bytes at guest-physical RBX (length RCX, at most
    /// [`super::CONSOLE_WRITE_MAX`]) to the VM's console; returns the count written.
    pub const CONSOLE_WRITE: u64 = BASE + 2;
    /// Ends the calling VM with exit status RBX (0 = success). Does not return.
    pub const VM_EXIT: u64 = BASE + 3;
    /// Version 1: copies the calling vCPU's exit statistics to guest-physical RBX (buffer
    /// length RCX, at least [`crate::stats::KINDS_V1`] * 16 bytes) as bare
    /// [`crate::stats::ExitRecord`]s, as many kinds as fit up to [`crate::stats::KINDS`];
    /// returns the number of records. Version 2 guests use [`STATS`].
    pub const EXIT_STATS: u64 = BASE + 4;
    /// Returns the feature bits of CPUID [`crate::cpuid::LEAF_VERSION`] EBX. (Version 2.)
    pub const FEATURES: u64 = BASE + 5;
    /// Copies exit statistics to guest-physical RBX (buffer length RCX): a
    /// [`crate::stats::StatsHeader`] followed by `kinds` [`crate::stats::ExitRecord`]s (at
    /// most as many as fit). RDX = scope ([`super::scope`]); RSI = flags
    /// ([`super::stats_flags`]). Returns the number of bytes written; -E2BIG if not even
    /// the header fits, -EINVAL for an unknown scope or flag, -EFAULT for a bad buffer.
    /// (Version 2.)
    pub const STATS: u64 = BASE + 6;
    /// Sets the mark of scope RBX ([`super::scope`]) to now: [`STATS`] with
    /// [`super::stats_flags::SINCE_MARK`] then counts from here. Returns 0. (Version 2.)
    pub const STATS_MARK: u64 = BASE + 7;
    /// Returns the steal time of scope RBX in nanoseconds (time the vCPU was ready to run
    /// but another vCPU had its host CPU; for [`super::scope::VM`], the sum). (Version 2.)
    pub const STEAL_TIME: u64 = BASE + 8;
    /// Returns the calling vCPU's index in bits 15:0 and the VM's vCPU count in bits 31:16.
    /// (Version 2.)
    pub const VCPU_INFO: u64 = BASE + 9;
    /// Resets the calling VM as a machine reset would: Vireo ends it and builds it again from
    /// its module (fresh memory, devices and vCPUs); an ELF test guest finds
    /// `vireo_boot=N` (N = 2, 3, ...) at the end of its command line. Does not return.
    /// (Version 3.)
    pub const VM_RESET: u64 = BASE + 10;
    /// The highest number defined today.
    pub const LAST: u64 = VM_RESET;
}

/// What a statistics call covers (RDX of [`nr::STATS`], RBX of [`nr::STATS_MARK`] and
/// [`nr::STEAL_TIME`]): a vCPU index (0..count), or one of these.
pub mod scope {
    /// The calling vCPU.
    pub const SELF: u64 = u64::MAX;
    /// The whole VM (every vCPU summed).
    pub const VM: u64 = u64::MAX - 1;
}

/// Flags of [`nr::STATS`] (RSI).
pub mod stats_flags {
    /// Count from the scope's last [`super::nr::STATS_MARK`] instead of since boot.
    pub const SINCE_MARK: u64 = 1 << 0;
    pub const ALL: u64 = SINCE_MARK;
}

/// The hypercall page (ABI version 2; the idea of VMware's VMI, in the form Xen and Hyper-V
/// use today). CPUID [`crate::cpuid::LEAF_HYPERCALL_PAGE`] names the MSR; the guest writes
/// the guest-physical address of a 4 KiB-aligned page of its RAM to it with bit 0
/// ([`page::ENABLE`]) set, and Vireo fills the page with [`page::STUBS`] stubs of
/// [`page::STUB_SIZE`] bytes. Stub `i` makes hypercall [`BASE`] + `i` with this CPU's
/// native instruction:
///
/// ```text
/// offset i*32:  B8 imm32      mov eax, BASE + i    (zero-extends into RAX)
///               0F 01 C1/D9   vmcall / vmmcall
///               C3            ret
///               CC ...        int3 up to the next stub
/// ```
///
/// so a guest calls `page + i * 32` with the arguments in RBX, RCX, RDX, RSI (the stub
/// clobbers only RAX, which returns the result) and never needs to know the CPU vendor.
/// Reading the MSR returns the last value written; writing 0 stops using the page (its
/// contents stay). An address that is not page-aligned or not RAM of the VM, or a reserved
/// bit (11:1) set, is #GP(0). The page is rewritten at every enabling write.
pub mod page {
    use super::{Instruction, BASE};

    /// The MSR (in the range the SDM reserves for software, 0x4000_0000-0x4000_00FF).
    pub const MSR: u32 = 0x4000_00F0;
    pub const ENABLE: u64 = 1 << 0;
    /// Bits 11:1 of the MSR are reserved.
    pub const RESERVED: u64 = 0xFFE;
    pub const STUB_SIZE: usize = 32;
    pub const STUBS: usize = 4096 / STUB_SIZE;

    /// Offset in the page of the stub for hypercall `nr`, if the page has one.
    pub const fn offset(nr: u64) -> Option<usize> {
        if nr >= BASE && nr < BASE + STUBS as u64 {
            Some((nr - BASE) as usize * STUB_SIZE)
        } else {
            None
        }
    }

    /// The bytes of stub `index`.
    pub fn stub(index: usize, insn: Instruction) -> [u8; STUB_SIZE] {
        let mut s = [0xCC; STUB_SIZE];
        s[0] = 0xB8;
        s[1..5].copy_from_slice(&((BASE as u32).wrapping_add(index as u32)).to_le_bytes());
        s[5..8].copy_from_slice(match insn {
            Instruction::Vmcall => &[0x0F, 0x01, 0xC1],
            Instruction::Vmmcall => &[0x0F, 0x01, 0xD9],
        });
        s[8] = 0xC3;
        s
    }

    /// The whole page.
    pub fn fill(insn: Instruction) -> [u8; 4096] {
        let mut p = [0u8; 4096];
        for (i, chunk) in p.chunks_exact_mut(STUB_SIZE).enumerate() {
            chunk.copy_from_slice(&stub(i, insn));
        }
        p
    }
}

/// Largest single console write.
pub const CONSOLE_WRITE_MAX: u64 = 4096;

/// The self-test device: a 32-bit register at this I/O port that returns the last value
/// written to it XOR [`TEST_DEVICE_XOR`], so a guest can prove port I/O round trips.
pub const TEST_DEVICE_PORT: u16 = 0x5649;
pub const TEST_DEVICE_XOR: u32 = 0x5649_5649;

/// The self-test interrupt source: a 32-bit write of `vector | (delay << 8)` makes Vireo
/// raise external interrupt `vector` (>= 32) once the guest is interruptible, after
/// `delay * TEST_IRQ_DELAY_UNIT` TSC ticks (0 = now), at the guest's next exit or HLT after
/// the delay. A halted vCPU is woken by it.
pub const TEST_IRQ_PORT: u16 = 0x564A;
pub const TEST_IRQ_DELAY_UNIT: u64 = 1024;

/// Error numbers, returned negated in RAX (values follow Linux/KVM where they exist).
pub mod errno {
    pub const EPERM: i64 = 1;
    pub const EFAULT: i64 = 14;
    pub const EINVAL: i64 = 22;
    pub const E2BIG: i64 = 7;
    pub const EOPNOTSUPP: i64 = 95;
    /// Unknown hypercall number (KVM's -KVM_ENOSYS).
    pub const ENOSYS: i64 = 1000;
}

/// The instruction a guest uses to call Vireo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instruction {
    Vmcall,
    Vmmcall,
}

/// Issues a hypercall with up to four arguments.
///
/// # Safety
/// Must run in a Vireo guest at CPL 0 (on bare metal the instruction raises #UD), and any
/// guest-physical buffer named by the arguments must be valid for the call.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn call(insn: Instruction, nr: u64, args: [u64; 4]) -> i64 {
    let ret: u64;
    // RBX cannot be an inline-asm operand (LLVM reserves it), so argument 0 travels in R8
    // and is swapped into RBX around the instruction, restoring RBX after.
    // SAFETY: forwarded to the caller; the asm clobbers nothing but RAX.
    unsafe {
        match insn {
            Instruction::Vmcall => core::arch::asm!(
                "xchg r8, rbx", "vmcall", "xchg r8, rbx",
                inout("rax") nr => ret, inout("r8") args[0] => _, in("rcx") args[1], in("rdx") args[2], in("rsi") args[3],
                options(nostack)
            ),
            Instruction::Vmmcall => core::arch::asm!(
                "xchg r8, rbx", "vmmcall", "xchg r8, rbx",
                inout("rax") nr => ret, inout("r8") args[0] => _, in("rcx") args[1], in("rdx") args[2], in("rsi") args[3],
                options(nostack)
            ),
        }
    }
    ret as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypercall_page_stubs() {
        let p = page::fill(Instruction::Vmmcall);
        let off = page::offset(nr::PING).unwrap();
        assert_eq!(off, 0);
        assert_eq!(&p[..9], &[0xB8, 0x00, 0x00, 0x49, 0x56, 0x0F, 0x01, 0xD9, 0xC3]);
        assert!(p[9..32].iter().all(|b| *b == 0xCC));
        let off = page::offset(nr::STATS).unwrap();
        assert_eq!(off, 6 * 32);
        assert_eq!(u32::from_le_bytes(p[off + 1..off + 5].try_into().unwrap()) as u64, nr::STATS);
        let v = page::stub(4, Instruction::Vmcall);
        assert_eq!(&v[5..9], &[0x0F, 0x01, 0xC1, 0xC3]);
        assert_eq!(page::offset(BASE + page::STUBS as u64), None);
        assert_eq!(page::offset(5), None, "KVM numbers have no stub");
        assert!(nr::LAST < BASE + page::STUBS as u64);
    }

    #[test]
    fn numbers_are_distinct_and_outside_kvm_range() {
        let all = [
            nr::PING,
            nr::VERSION,
            nr::CONSOLE_WRITE,
            nr::VM_EXIT,
            nr::EXIT_STATS,
            nr::FEATURES,
            nr::STATS,
            nr::STATS_MARK,
            nr::STEAL_TIME,
            nr::VCPU_INFO,
            nr::VM_RESET,
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(*a >= BASE, "Vireo numbers start at BASE, far above KVM's 1..=12");
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
