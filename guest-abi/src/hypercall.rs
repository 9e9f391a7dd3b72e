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
    /// Copies the VM's exit statistics to guest-physical RBX (buffer length RCX).
    pub const EXIT_STATS: u64 = BASE + 4;
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
    fn numbers_are_distinct_and_outside_kvm_range() {
        let all = [nr::PING, nr::VERSION, nr::CONSOLE_WRITE, nr::VM_EXIT, nr::EXIT_STATS];
        for (i, a) in all.iter().enumerate() {
            assert!(*a >= BASE, "Vireo numbers start at BASE, far above KVM's 1..=12");
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
