//! The world switch (APM Vol. 2 §15.5 VMRUN, §15.6 #VMEXIT, §15.5.2 VMSAVE/VMLOAD,
//! §15.17 GIF).
//!
//! `vireo_svm_run(vmcb_pa, regs, host_save_pa) -> tsc`:
//!
//! 1. saves the callee-saved host registers on the host stack;
//! 2. CLGI: no interrupt, NMI or SMI until the host state is back (between VMLOAD of the
//!    guest and VMRUN, TR/FS/GS hold guest values);
//! 3. VMLOAD the guest's FS, GS, TR, LDTR, KernelGsBase, STAR family and SYSENTER family
//!    from its VMCB. The host's own values are already in the host-save page: they never
//!    change while Vireo runs (GS base and TR are set once at CPU bring-up, the rest is
//!    unused), so [`save_host_state`] stores them once per slice instead of once per entry
//!    (a VMSAVE less per exit: about 1 us of QEMU TCG's round trip; KVM saves them once per
//!    vCPU load the same way);
//! 4. loads the guest's general registers from `regs` (RAX and RSP come from the VMCB);
//! 5. VMRUN with RAX = the VMCB's physical address. VMRUN saves host RAX/RSP/RIP/... to
//!    VM_HSAVE_PA and #VMEXIT restores them, so execution continues after VMRUN with the
//!    host stack and RAX = the VMCB address, the guest's other registers still loaded;
//! 6. stores the guest's registers to `regs`, reads the TSC;
//! 7. VMSAVE the guest's VMLOAD state back to its VMCB, VMLOAD the host's; STGI
//!    (#VMEXIT left GIF = 0);
//! 8. restores the host registers and returns the TSC read right after the exit.
//!
//! Vireo is identity-mapped (virtual = physical), so `regs` is also usable as is. The
//! host builds of the library (unit tests) get a stand-in: `cargo test` on the host can
//! exercise `SvmVcpu::run`'s bookkeeping with a simulated exit (see `sim`).

use crate::vmm::regs::GuestRegs;

#[cfg(target_os = "none")]
mod hw {
    use crate::vmm::regs::offset;

    // SysV ABI: RDI = VMCB pa, RSI = *mut GuestRegs, RDX = host-save pa; returns RAX.
    // Stack while the guest runs: [rsp] VMCB pa, [rsp+8] regs, [rsp+16] host-save pa,
    // then r15..rbp.
    core::arch::global_asm!(
        ".pushsection .text.vireo_svm_run, \"ax\", @progbits",
        ".global vireo_svm_run",
        ".type vireo_svm_run, @function",
        ".p2align 4",
        "vireo_svm_run:",
        "push rbp",
        "push rbx",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdx",
        "push rsi",
        "push rdi",
        "clgi",
        // IF=1 for VMRUN: with V_INTR_MASKING the host's IF (saved as HIF) decides whether
        // physical interrupts are taken, i.e. cause the INTR exit (APM Vol. 2 §15.21.1).
        // GIF=0 holds them off until VMRUN sets GIF.
        "sti",
        "mov rax, rdi",
        "vmload rax",
        // From here to `vireo_svm_host_loaded` the CPU holds the guest's VMLOAD state (TR, GS,
        // FS, LDTR, syscall MSRs): `host_state_after_fault`.
        ".global vireo_svm_guest_loaded",
        "vireo_svm_guest_loaded:",
        "mov rcx, [rsi + {rcx}]",
        "mov rdx, [rsi + {rdx}]",
        "mov rbx, [rsi + {rbx}]",
        "mov rbp, [rsi + {rbp}]",
        "mov rdi, [rsi + {rdi}]",
        "mov r8, [rsi + {r8}]",
        "mov r9, [rsi + {r9}]",
        "mov r10, [rsi + {r10}]",
        "mov r11, [rsi + {r11}]",
        "mov r12, [rsi + {r12}]",
        "mov r13, [rsi + {r13}]",
        "mov r14, [rsi + {r14}]",
        "mov r15, [rsi + {r15}]",
        "mov rsi, [rsi + {rsi}]",
        "vmrun rax",
        // #VMEXIT: host RSP and RAX (= VMCB pa) are back; the rest is the guest's.
        "mov rax, [rsp + 8]",
        "mov [rax + {rcx}], rcx",
        "mov [rax + {rdx}], rdx",
        "mov [rax + {rbx}], rbx",
        "mov [rax + {rbp}], rbp",
        "mov [rax + {rsi}], rsi",
        "mov [rax + {rdi}], rdi",
        "mov [rax + {r8}], r8",
        "mov [rax + {r9}], r9",
        "mov [rax + {r10}], r10",
        "mov [rax + {r11}], r11",
        "mov [rax + {r12}], r12",
        "mov [rax + {r13}], r13",
        "mov [rax + {r14}], r14",
        "mov [rax + {r15}], r15",
        "rdtsc",
        "shl rdx, 32",
        "or rdx, rax",
        "mov rdi, rdx",
        "mov rax, [rsp]",
        "vmsave rax",
        "mov rax, [rsp + 16]",
        "vmload rax",
        ".global vireo_svm_host_loaded",
        "vireo_svm_host_loaded:",
        // Back to IF=0 before GIF=1: a pending interrupt waits for the backend to let it
        // in (interrupts::deliver_pending) instead of hitting a half-restored host.
        "cli",
        "stgi",
        "mov rax, rdi",
        "add rsp, 24",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "ret",
        ".size vireo_svm_run, . - vireo_svm_run",
        ".popsection",
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

    // SAFETY: the signature matches the assembly above (SysV: RDI, RSI, RDX in, RAX out;
    // callee-saved registers preserved); calling it stays unsafe (see `world_switch`).
    unsafe extern "sysv64" {
        pub fn vireo_svm_run(vmcb_pa: u64, regs: *mut crate::vmm::regs::GuestRegs, host_save_pa: u64) -> u64;
    }
}

/// An exception at `rip` with stack pointer `rsp`: if it hit the world switch while the
/// guest's VMLOAD state was loaded (no exception belongs there on hardware; QEMU TCG was
/// seen delivering one right at the #VMEXIT return), loads the host's state back from the
/// host-save page named on the switch's stack ([rsp + 16]) and returns true, so the crash
/// path can read GS and the TSS again.
#[cfg(target_os = "none")]
pub fn host_state_after_fault(rip: u64, rsp: u64) -> bool {
    extern "C" {
        static vireo_svm_guest_loaded: u8;
        static vireo_svm_host_loaded: u8;
    }
    // Taking the address of an extern static reads nothing.
    let (lo, hi) =
        (core::ptr::addr_of!(vireo_svm_guest_loaded) as u64, core::ptr::addr_of!(vireo_svm_host_loaded) as u64);
    if !(lo..hi).contains(&rip) {
        return false;
    }
    // SAFETY: between the two labels `vireo_svm_run` keeps [rsp] = VMCB, [rsp + 8] = regs,
    // [rsp + 16] = this CPU's host-save page (pushed before them, popped after); the
    // interrupted RSP is that stack pointer. VMLOAD of that page restores exactly what the
    // switch's own VMLOAD would (SVM is enabled: we are inside a VMRUN sequence).
    unsafe {
        let host_save = core::ptr::read((rsp + 16) as *const u64);
        core::arch::asm!("vmload rax", in("rax") host_save, options(nostack));
    }
    true
}

/// Stores this CPU's host VMLOAD state (FS, GS, TR, LDTR, KernelGsBase, STAR, LSTAR,
/// CSTAR, SFMASK, SYSENTER_CS/ESP/EIP; APM Vol. 2 §15.5.2) in `host_save_pa`, which every
/// #VMEXIT of [`world_switch`] loads back. Called at the start of each slice; between two
/// calls Vireo changes none of that state.
///
/// # Safety
/// SVM must be enabled on this CPU (EFER.SVME: VMSAVE raises #UD otherwise) and
/// `host_save_pa` must be this CPU's reserved host-state page.
#[cfg(target_os = "none")]
pub unsafe fn save_host_state(host_save_pa: u64) {
    // SAFETY: per the contract; VMSAVE writes only the named page (APM Vol. 2 §15.5.2) and
    // changes no register.
    unsafe { core::arch::asm!("vmsave rax", in("rax") host_save_pa, options(nostack)) };
}

/// Host-build stand-in: nothing to save.
///
/// # Safety
/// None needed on the host; the signature matches the bare-metal one.
#[cfg(not(target_os = "none"))]
pub unsafe fn save_host_state(host_save_pa: u64) {
    let _ = host_save_pa;
}

/// Runs the guest of the VMCB at `vmcb_pa` once (see the module docs); returns the TSC
/// read right after the #VMEXIT.
///
/// # Safety
/// SVM must be enabled on this CPU (EFER.SVME, VM_HSAVE_PA: `svm::enable`);
/// `vmcb_pa` must be a valid, initialized VMCB owned by the caller, whose IOPM, MSRPM and
/// nested page tables are valid; `host_save_pa` a 4 KiB page reserved for this CPU's host
/// state, holding it since [`save_host_state`] (this slice); `regs` valid for reads and
/// writes; RFLAGS.IF = 0 is expected (Vireo's host).
#[cfg(target_os = "none")]
pub unsafe fn world_switch(vmcb_pa: u64, regs: &mut GuestRegs, host_save_pa: u64) -> u64 {
    // SAFETY: forwarded to the caller; the assembly preserves every callee-saved register
    // and the stack, and writes only `regs` and the two VMCB-format pages.
    unsafe { hw::vireo_svm_run(vmcb_pa, regs, host_save_pa) }
}

/// Host-build stand-in: unit tests install a simulated #VMEXIT with [`sim::set`].
///
/// # Safety
/// `vmcb_pa` must be the address of a live [`super::vmcb::Vmcb`] in this process (the
/// tests' frames are host memory, identity "mapped" like Vireo's).
#[cfg(not(target_os = "none"))]
pub unsafe fn world_switch(vmcb_pa: u64, regs: &mut GuestRegs, host_save_pa: u64) -> u64 {
    let _ = host_save_pa;
    #[cfg(test)]
    {
        // SAFETY: per this function's contract, `vmcb_pa` points at a live, exclusively
        // borrowed VMCB.
        let vmcb = unsafe { &mut *(vmcb_pa as *mut super::vmcb::Vmcb) };
        sim::exit(vmcb, regs)
    }
    #[cfg(not(test))]
    {
        let _ = (vmcb_pa, regs);
        panic!("SVM guests run only on bare metal (target_os = \"none\")")
    }
}

#[cfg(all(test, not(target_os = "none")))]
pub mod sim {
    //! A simulated CPU for the host tests: each `run` applies the installed closure to
    //! the VMCB and registers as the "guest execution up to the next #VMEXIT".
    use super::super::vmcb::Vmcb;
    use crate::vmm::regs::GuestRegs;
    use std::boxed::Box;
    use std::cell::RefCell;

    type Hook = Box<dyn FnMut(&mut Vmcb, &mut GuestRegs)>;

    std::thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    pub fn set(f: impl FnMut(&mut Vmcb, &mut GuestRegs) + 'static) {
        HOOK.with(|h| *h.borrow_mut() = Some(Box::new(f)));
    }

    pub(super) fn exit(vmcb: &mut Vmcb, regs: &mut GuestRegs) -> u64 {
        HOOK.with(|h| (h.borrow_mut().as_mut().expect("no simulated exit installed"))(vmcb, regs));
        42
    }
}
