//! The VMX instructions (SDM Vol. 3C ch. 31, "VMX Instruction Reference"), each wrapped
//! once. Failures come back as [`VmxFail`]: CF = 1 is VMfailInvalid, ZF = 1 VMfailValid
//! with the error number read from the current VMCS (SDM Vol. 3C §31.2).
//!
//! None of these asm blocks says `nomem`/`pure`: VMREAD's value changes behind the
//! compiler's back at every VM exit, so two reads of one field must never be merged.

use core::arch::asm;

use super::{
    error::VmxFail,
    vmcs::{Field16, Field32, Field64, FieldNat},
};

/// VM-instruction error field encoding (read directly to avoid recursion through `vmread`).
const VM_INSTRUCTION_ERROR: u64 = Field32::VmInstructionError as u64;

/// Turns the flags of a VMX instruction into a result.
#[inline(always)]
fn check(cf: u8, zf: u8) -> Result<(), VmxFail> {
    if cf != 0 {
        Err(VmxFail::Invalid)
    } else if zf != 0 {
        let mut error: u64 = 0;
        // SAFETY: after VMfailValid a current VMCS exists (that is what distinguishes it
        // from VMfailInvalid), so VMREAD of the read-only error field is defined; it writes
        // only the output register.
        unsafe {
            asm!("vmread {v}, {f}", v = out(reg) error, f = in(reg) VM_INSTRUCTION_ERROR, options(nostack));
        }
        Err(VmxFail::Valid(error as u32))
    } else {
        Ok(())
    }
}

/// VMXON: enters VMX root operation with the VMXON region at physical `region`.
///
/// # Safety
/// CR4.VMXE must be set, CR0/CR4 must satisfy the VMX fixed bits and IA32_FEATURE_CONTROL
/// must allow VMXON; `region` must be a 4 KiB-aligned frame, owned by this CPU's VMX state
/// for as long as VMX stays on, carrying the VMCS revision identifier.
pub unsafe fn vmxon(region: u64) -> Result<(), VmxFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller; the operand is a pointer to a u64 on our stack.
    unsafe {
        asm!("vmxon [{p}]", "setc {cf}", "setz {zf}", p = in(reg) &region, cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    check(cf, zf)
}

/// VMXOFF: leaves VMX operation.
///
/// # Safety
/// The CPU must be in VMX root operation; no VMCS of this CPU may be used afterwards
/// before a new VMXON and VMPTRLD.
pub unsafe fn vmxoff() -> Result<(), VmxFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("vmxoff", "setc {cf}", "setz {zf}", cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    check(cf, zf)
}

/// VMCLEAR: writes the VMCS at physical `vmcs` back to memory and makes its launch state
/// clear (and not current, if it was).
///
/// # Safety
/// VMX root operation; `vmcs` must be a VMCS region Vireo owns (not the VMXON region).
pub unsafe fn vmclear(vmcs: u64) -> Result<(), VmxFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("vmclear [{p}]", "setc {cf}", "setz {zf}", p = in(reg) &vmcs, cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    check(cf, zf)
}

/// VMPTRLD: makes the VMCS at physical `vmcs` current (and active) on this CPU.
///
/// # Safety
/// VMX root operation; `vmcs` must be a VMCS region Vireo owns that is not active on
/// another CPU.
pub unsafe fn vmptrld(vmcs: u64) -> Result<(), VmxFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("vmptrld [{p}]", "setc {cf}", "setz {zf}", p = in(reg) &vmcs, cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    check(cf, zf)
}

/// VMPTRST: the current-VMCS pointer (`!0` when there is none).
///
/// # Safety
/// VMX root operation.
pub unsafe fn vmptrst() -> u64 {
    let mut ptr: u64 = 0;
    // SAFETY: forwarded to the caller; writes the 8 bytes of `ptr`.
    unsafe {
        asm!("vmptrst [{p}]", p = in(reg) &mut ptr, options(nostack));
    }
    ptr
}

/// VMREAD of a raw encoding.
///
/// # Safety
/// VMX root operation with a current VMCS.
#[inline]
pub unsafe fn vmread_raw(encoding: u32) -> Result<u64, VmxFail> {
    let value: u64;
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller; VMREAD writes only the output register.
    unsafe {
        asm!(
            "vmread {v}, {f}", "setc {cf}", "setz {zf}",
            v = out(reg) value, f = in(reg) encoding as u64,
            cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack)
        );
    }
    check(cf, zf).map(|()| value)
}

/// VMWRITE of a raw encoding.
///
/// # Safety
/// VMX root operation with a current VMCS; the value must not break memory safety when
/// the VMCS is used (host-state fields, pointers to Vireo's memory).
#[inline]
pub unsafe fn vmwrite_raw(encoding: u32, value: u64) -> Result<(), VmxFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!(
            "vmwrite {f}, {v}", "setc {cf}", "setz {zf}",
            f = in(reg) encoding as u64, v = in(reg) value,
            cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack)
        );
    }
    check(cf, zf)
}

/// A VMCS field of one width: its encoding and the Rust type of its value, for the typed
/// [`vmread`] / [`vmwrite`].
pub trait VmcsField: Copy + core::fmt::Debug {
    type Value: Copy;
    fn encoding(self) -> u32;
    fn to_u64(v: Self::Value) -> u64;
    fn from_u64(v: u64) -> Self::Value;
}

macro_rules! field_width {
    ($field:ty, $value:ty) => {
        impl VmcsField for $field {
            type Value = $value;
            fn encoding(self) -> u32 {
                self as u32
            }
            fn to_u64(v: $value) -> u64 {
                v as u64
            }
            fn from_u64(v: u64) -> $value {
                v as $value
            }
        }
    };
}
field_width!(Field16, u16);
field_width!(Field32, u32);
field_width!(Field64, u64);
field_width!(FieldNat, u64);

/// Reads a field of the current VMCS.
///
/// # Safety
/// VMX root operation with a current VMCS.
#[inline]
pub unsafe fn vmread<F: VmcsField>(field: F) -> Result<F::Value, VmxFail> {
    // SAFETY: forwarded to the caller.
    unsafe { vmread_raw(field.encoding()) }.map(F::from_u64)
}

/// Writes a field of the current VMCS.
///
/// # Safety
/// As [`vmwrite_raw`].
#[inline]
pub unsafe fn vmwrite<F: VmcsField>(field: F, value: F::Value) -> Result<(), VmxFail> {
    // SAFETY: forwarded to the caller.
    unsafe { vmwrite_raw(field.encoding(), F::to_u64(value)) }
}

/// INVEPT types (SDM Vol. 3C §31.3 "INVEPT").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum InveptType {
    SingleContext = 1,
    AllContext = 2,
}

/// INVEPT: invalidates EPT-derived translations for `eptp` (single context) or all.
///
/// # Safety
/// VMX root operation; the type must be supported (IA32_VMX_EPT_VPID_CAP bits 25/26).
pub unsafe fn invept(kind: InveptType, eptp: u64) -> Result<(), VmxFail> {
    let descriptor: [u64; 2] = [eptp, 0];
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller; the descriptor is 16 bytes on our stack.
    unsafe {
        asm!("invept {t}, [{d}]", "setc {cf}", "setz {zf}", t = in(reg) kind as u64, d = in(reg) &descriptor,
            cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    check(cf, zf)
}

/// INVVPID types (SDM Vol. 3C §31.3 "INVVPID").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum InvvpidType {
    IndividualAddress = 0,
    SingleContext = 1,
    AllContext = 2,
    SingleContextRetainingGlobals = 3,
}

/// INVVPID: invalidates linear mappings tagged with `vpid`.
///
/// # Safety
/// VMX root operation; the type must be supported (IA32_VMX_EPT_VPID_CAP bits 40-43).
pub unsafe fn invvpid(kind: InvvpidType, vpid: u16, linear: u64) -> Result<(), VmxFail> {
    let descriptor: [u64; 2] = [vpid as u64, linear];
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller; the descriptor is 16 bytes on our stack.
    unsafe {
        asm!("invvpid {t}, [{d}]", "setc {cf}", "setz {zf}", t = in(reg) kind as u64, d = in(reg) &descriptor,
            cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    check(cf, zf)
}

/// STR: the task register's selector (not privileged; the `x86_64` crate has no reader).
pub fn read_tr() -> u16 {
    let tr: u16;
    // SAFETY: STR only reads TR into a register.
    unsafe {
        asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags));
    }
    tr
}

/// RDTSC.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged unless CR4.TSD, which Vireo never sets; it only reads
    // the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Reads CR2 (in VMX root operation after a VM exit: the guest's last page-fault address,
/// which exits do not change, SDM Vol. 3C §28.5).
#[inline]
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 at CPL 0 has no side effects (Vireo runs at CPL 0; the
    // function is only called on the VMX run path).
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR2 (the guest's, before entering it: VM entry does not load CR2, §27.3).
#[inline]
pub fn write_cr2(v: u64) {
    // SAFETY: CR2 only records page-fault addresses; nothing in Vireo depends on its value
    // (its own #PF handler reads it only to report a crash). CPL 0.
    unsafe { core::arch::asm!("mov cr2, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}
