//! The VM-entry trampoline: host callee-saved registers to the stack, HOST_RSP, guest GPRs
//! from [`GuestRegs`], VMLAUNCH or VMRESUME; the VM exit lands at `vireo_vmx_exit`
//! (HOST_RIP) with RSP = HOST_RSP, stores the guest GPRs and returns to the caller as if
//! from the call (SDM Vol. 3C §27 "VM Entries", §28.5 "Loading Host State").
//!
//! RSP is not here: the guest's lives in the VMCS (GUEST_RSP), the host's in HOST_RSP. RIP
//! and RFLAGS too. VM exit clears RFLAGS (all but bit 1), so the exit path runs with
//! interrupts off and DF = 0, as the Rust code after it expects.
//!
//! Returns 0 after a VM exit, 1 after VMfailInvalid (CF), 2 after VMfailValid (ZF).

use crate::vmm::regs::GuestRegs;

#[cfg(target_os = "none")]
use crate::vmm::regs::offset;

/// What happened to an entry attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entered {
    /// The guest ran and a VM exit (or a VM-entry failure reported as an exit) came back.
    Exited,
    /// VMLAUNCH/VMRESUME failed with VMfailInvalid.
    FailInvalid,
    /// VMLAUNCH/VMRESUME failed with VMfailValid: the error is in the VMCS.
    FailValid,
}

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .text.vireo_vmx, "ax"
    .balign 16
    .global vireo_vmx_enter
    .global vireo_vmx_exit
// u64 vireo_vmx_enter(GuestRegs *regs /* rdi */, u64 launched /* rsi */)
vireo_vmx_enter:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi                        // [rsp] = regs, found again at the exit
    mov rax, {host_rsp}
    vmwrite rax, rsp                // HOST_RSP = rsp: the exit resumes on this frame
    cmp rsi, 0                      // flags survive the MOVs below
    mov rax, [rdi + {rax}]
    mov rcx, [rdi + {rcx}]
    mov rdx, [rdi + {rdx}]
    mov rbx, [rdi + {rbx}]
    mov rbp, [rdi + {rbp}]
    mov rsi, [rdi + {rsi}]
    mov r8,  [rdi + {r8}]
    mov r9,  [rdi + {r9}]
    mov r10, [rdi + {r10}]
    mov r11, [rdi + {r11}]
    mov r12, [rdi + {r12}]
    mov r13, [rdi + {r13}]
    mov r14, [rdi + {r14}]
    mov r15, [rdi + {r15}]
    mov rdi, [rdi + {rdi}]
    jne 2f
    vmlaunch
    jmp 3f
2:
    vmresume
3:
    // Only reached when the instruction failed: CF = VMfailInvalid, ZF = VMfailValid.
    mov eax, 1
    jc 4f
    mov eax, 2
    jmp 4f

    .balign 16
vireo_vmx_exit:
    push rdi                        // guest RDI; regs pointer is now at [rsp + 8]
    mov rdi, [rsp + 8]
    mov [rdi + {rax}], rax
    mov [rdi + {rcx}], rcx
    mov [rdi + {rdx}], rdx
    mov [rdi + {rbx}], rbx
    mov [rdi + {rbp}], rbp
    mov [rdi + {rsi}], rsi
    mov [rdi + {r8}], r8
    mov [rdi + {r9}], r9
    mov [rdi + {r10}], r10
    mov [rdi + {r11}], r11
    mov [rdi + {r12}], r12
    mov [rdi + {r13}], r13
    mov [rdi + {r14}], r14
    mov [rdi + {r15}], r15
    pop rax
    mov [rdi + {rdi}], rax
    xor eax, eax
4:
    add rsp, 8                      // drop the regs pointer
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
"#,
    host_rsp = const super::vmcs::FieldNat::HostRsp as u32,
    rax = const offset::RAX,
    rcx = const offset::RCX,
    rdx = const offset::RDX,
    rbx = const offset::RBX,
    rbp = const offset::RBP,
    rsi = const offset::RSI,
    rdi = const offset::RDI,
    r8 = const offset::R8,
    r9 = const offset::R9,
    r10 = const offset::R10,
    r11 = const offset::R11,
    r12 = const offset::R12,
    r13 = const offset::R13,
    r14 = const offset::R14,
    r15 = const offset::R15,
);

#[cfg(target_os = "none")]
extern "C" {
    fn vireo_vmx_enter(regs: *mut GuestRegs, launched: u64) -> u64;
    fn vireo_vmx_exit();
}

/// Host builds (unit tests) have no VMX: entering always "fails".
#[cfg(not(target_os = "none"))]
unsafe extern "C" fn vireo_vmx_enter(_regs: *mut GuestRegs, _launched: u64) -> u64 {
    1
}

/// HOST_RIP: where VM exits land.
pub fn exit_address() -> u64 {
    #[cfg(target_os = "none")]
    {
        vireo_vmx_exit as *const () as u64
    }
    #[cfg(not(target_os = "none"))]
    {
        0
    }
}

/// Enters the guest of the current VMCS with `regs`; on a VM exit `regs` holds the guest's
/// registers (except RSP, which is in GUEST_RSP).
///
/// # Safety
/// This CPU is in VMX root operation with a fully set-up current VMCS whose HOST_RIP is
/// [`exit_address`] and whose host state is this CPU's (CR3 mapping this code and stack,
/// GDT, TR, segment bases). `launched` must match the VMCS's launch state.
pub unsafe fn enter(regs: &mut GuestRegs, launched: bool) -> Entered {
    // SAFETY: forwarded to the caller; the trampoline saves and restores every
    // callee-saved register and returns on the same stack.
    match unsafe { vireo_vmx_enter(regs, launched as u64) } {
        0 => Entered::Exited,
        1 => Entered::FailInvalid,
        _ => Entered::FailValid,
    }
}
