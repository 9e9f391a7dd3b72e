//! Model-specific registers Vireo reads or writes, by name (SDM Vol. 4; APM Vol. 2 App. A).

/// IA32_FEATURE_CONTROL: bit 0 lock, bit 2 VMXON outside SMX (SDM Vol. 3C §24.7).
pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
pub const IA32_VMX_BASIC: u32 = 0x480;
pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
pub const IA32_VMX_MISC: u32 = 0x485;
pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
pub const IA32_EFER: u32 = 0xC000_0080;
/// AMD VM_CR: bit 4 SVMDIS, bit 3 LOCK (APM Vol. 2 §15.30.1).
pub const AMD_VM_CR: u32 = 0xC001_0114;

/// EFER bits (SDM Vol. 3A §2.2.1; APM Vol. 2 §3.1.7).
pub const EFER_NXE: u64 = 1 << 11;

/// Reads an MSR.
///
/// # Safety
/// The MSR must exist on this CPU (else #GP) and reading it must have no side effect the
/// caller is not prepared for.
pub unsafe fn read(msr: u32) -> u64 {
    // SAFETY: forwarded to the caller.
    unsafe { x86_64::registers::model_specific::Msr::new(msr).read() }
}

/// Writes an MSR.
///
/// # Safety
/// The MSR must exist, the value must be valid for it, and the write must not break
/// memory safety (e.g. EFER, PAT).
pub unsafe fn write(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { x86_64::registers::model_specific::Msr::new(msr).write(value) }
}
