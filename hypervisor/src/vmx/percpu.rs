//! Per-CPU VMX state: whether VMXON was done (and where its region is), which VMCS is
//! current, and whose guest-owned MSRs are loaded in the CPU; plus [`enable`] /
//! [`disable`] (SDM Vol. 3C §24.7 "Enabling and Entering VMX Operation", §24.8
//! "Restrictions on VMX Operation").
//!
//! CPUs are told apart by their dense per-CPU index (`arch::percpu::index`, 0 = BSP); a
//! vCPU records the slot of the CPU that created it and must run there (a VMCS active on one CPU must be
//! VMCLEARed before another CPU may use it, SDM Vol. 3C §25.1).

use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use x86_64::registers::control::{Cr0, Cr4};

use super::{
    controls::{basic, ept_vpid_cap, msr as vmx_msr, CapMsrs},
    cr::{CrFixed, CR4_VMXE},
    instr::{self, InveptType, InvvpidType},
};
use crate::{
    arch::{cpu::VmxCaps, msr},
    mm::{FrameAllocator, PAGE_SIZE},
    vmm::BackendError,
};

/// One slot per CPU index (`arch::percpu::MAX_CPUS`).
pub const MAX_CPUS: usize = crate::arch::percpu::MAX_CPUS;

/// The MSRs VMX does not switch but a guest owns (SYSCALL and SWAPGS state), in the order
/// of [`GuestMsrs::values`].
pub const SWAPPED_MSRS: [u32; 5] =
    [vmx_msr::IA32_KERNEL_GS_BASE, vmx_msr::IA32_STAR, vmx_msr::IA32_LSTAR, vmx_msr::IA32_CSTAR, vmx_msr::IA32_FMASK];

/// One vCPU's copy of [`SWAPPED_MSRS`] while another vCPU's values are in the CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestMsrs {
    pub values: [u64; SWAPPED_MSRS.len()],
}

pub struct CpuVmx {
    /// Physical address of the VMXON region; 0 = VMX off.
    vmxon: AtomicU64,
    /// Physical address of the current VMCS; 0 = none (as far as Vireo knows).
    current_vmcs: AtomicU64,
    /// The current vCPU's [`GuestMsrs`] (its values are live in the CPU); null = none.
    current_msrs: AtomicPtr<GuestMsrs>,
}

impl CpuVmx {
    const fn new() -> Self {
        Self {
            vmxon: AtomicU64::new(0),
            current_vmcs: AtomicU64::new(0),
            current_msrs: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    pub fn vmx_on(&self) -> bool {
        self.vmxon.load(Ordering::Relaxed) != 0
    }

    pub fn current_vmcs(&self) -> u64 {
        self.current_vmcs.load(Ordering::Relaxed)
    }

    pub fn current_msrs(&self) -> *mut GuestMsrs {
        self.current_msrs.load(Ordering::Relaxed)
    }

    pub fn set_current(&self, vmcs: u64, msrs: *mut GuestMsrs) {
        self.current_vmcs.store(vmcs, Ordering::Relaxed);
        self.current_msrs.store(msrs, Ordering::Relaxed);
    }
}

static CPUS: [CpuVmx; MAX_CPUS] = [const { CpuVmx::new() }; MAX_CPUS];

/// This CPU's slot index (its dense per-CPU index; x2APIC IDs may be far above 255).
pub fn cpu_index() -> usize {
    crate::arch::percpu::index() % MAX_CPUS
}

pub fn slot(index: usize) -> &'static CpuVmx {
    &CPUS[index % MAX_CPUS]
}

/// Saves the CPU's [`SWAPPED_MSRS`] into `area`.
///
/// # Safety
/// VMX on this CPU (the MSRs exist on every x86-64 CPU); `area` must point to a live
/// [`GuestMsrs`] no reference aliases.
pub unsafe fn save_guest_msrs(area: *mut GuestMsrs) {
    let mut values = [0u64; SWAPPED_MSRS.len()];
    for (v, m) in values.iter_mut().zip(SWAPPED_MSRS) {
        // SAFETY: architectural MSRs of every x86-64 CPU; reading has no side effect.
        *v = unsafe { msr::read(m) };
    }
    // SAFETY: forwarded to the caller.
    unsafe { core::ptr::addr_of_mut!((*area).values).write(values) };
}

/// Loads [`SWAPPED_MSRS`] from `area`.
///
/// # Safety
/// `area` must point to a live [`GuestMsrs`] holding values saved from the CPU (or zeros):
/// all canonical, so WRMSR cannot fault. Vireo itself uses none of these MSRs (no SYSCALL,
/// no SWAPGS), so loading a guest's values cannot disturb it.
pub unsafe fn load_guest_msrs(area: *const GuestMsrs) {
    // SAFETY: forwarded to the caller.
    let values = unsafe { core::ptr::addr_of!((*area).values).read() };
    for (v, m) in values.into_iter().zip(SWAPPED_MSRS) {
        // SAFETY: see the function's contract.
        unsafe { msr::write(m, v) };
    }
}

/// IA32_FEATURE_CONTROL bits (SDM Vol. 3C §24.7).
const FC_LOCK: u64 = 1 << 0;
const FC_VMXON_OUTSIDE_SMX: u64 = 1 << 2;

/// What IA32_FEATURE_CONTROL asks of Vireo: `Ok(Some(v))` write `v`, `Ok(None)` fine as is.
pub fn feature_control_update(fc: u64) -> Result<Option<u64>, BackendError> {
    if fc & FC_LOCK == 0 {
        Ok(Some(fc | FC_LOCK | FC_VMXON_OUTSIDE_SMX))
    } else if fc & FC_VMXON_OUTSIDE_SMX == 0 {
        Err(BackendError(
            "VMX disabled by firmware: IA32_FEATURE_CONTROL is locked with VMXON outside SMX off (enable VT-x in the firmware setup)",
        ))
    } else {
        Ok(None)
    }
}

/// The checks `enable` makes on the capabilities before touching the CPU.
pub fn check_caps(caps: &VmxCaps) -> Result<(), BackendError> {
    if caps.disabled_by_firmware {
        return Err(BackendError("VMX disabled by firmware (IA32_FEATURE_CONTROL locked without VMXON outside SMX)"));
    }
    if !caps.ept {
        return Err(BackendError("VMX: the CPU has no EPT (Vireo needs extended page tables)"));
    }
    if !caps.unrestricted_guest {
        return Err(BackendError("VMX: the CPU has no unrestricted guest (Vireo needs it for real-mode guests)"));
    }
    if !caps.ept_4level || !caps.ept_wb {
        return Err(BackendError("VMX: EPT lacks 4-level walks or write-back paging structures"));
    }
    Ok(())
}

/// Turns VMX on for this CPU: IA32_FEATURE_CONTROL, the CR0/CR4 fixed bits, CR4.VMXE, the
/// VMXON region and VMXON. Calling it again on the same CPU does nothing.
pub fn enable(frames: &mut FrameAllocator, caps: &VmxCaps) -> Result<(), BackendError> {
    check_caps(caps)?;
    let cpu = slot(cpu_index());
    if cpu.vmx_on() {
        return Ok(());
    }
    // SAFETY: CPUID reported VMX (the caller's caps come from it), so the VMX capability
    // MSRs and IA32_FEATURE_CONTROL exist; reading them has no side effect.
    let caps_msrs = CapMsrs::read(|m| unsafe { msr::read(m) });
    // SAFETY: as above.
    let fc = unsafe { msr::read(msr::IA32_FEATURE_CONTROL) };
    if let Some(v) = feature_control_update(fc)? {
        // SAFETY: the MSR is unlocked (checked); setting lock + VMXON-outside-SMX only
        // permits VMXON until the next reset.
        unsafe { msr::write(msr::IA32_FEATURE_CONTROL, v) };
    }

    let fixed = CrFixed {
        cr0_fixed0: caps_msrs.cr0_fixed0,
        cr0_fixed1: caps_msrs.cr0_fixed1,
        cr4_fixed0: caps_msrs.cr4_fixed0,
        cr4_fixed1: caps_msrs.cr4_fixed1,
        unrestricted: false,
    };
    let cr0 = Cr0::read_raw();
    let new_cr0 = fixed.host_cr0(cr0);
    if new_cr0 != cr0 {
        // SAFETY: Vireo runs in long mode with PE and PG (which the fixed bits require
        // anyway); the adjustment sets NE (x87 error reporting, unused by soft-float
        // Vireo) or clears bits the CPU does not allow in VMX operation.
        unsafe { Cr0::write_raw(new_cr0) };
    }
    let cr4 = Cr4::read_raw();
    let new_cr4 = fixed.host_cr4(cr4);
    if new_cr4 & CR4_VMXE == 0 {
        return Err(BackendError("VMX: IA32_VMX_CR4_FIXED1 does not allow CR4.VMXE"));
    }
    if new_cr4 != cr4 {
        // SAFETY: sets VMXE (and bits the CPU requires in VMX operation); changes no
        // paging or protection behaviour Vireo depends on.
        unsafe { Cr4::write_raw(new_cr4) };
    }

    let size = basic::region_size(caps_msrs.basic);
    if size == 0 || size > PAGE_SIZE {
        return Err(BackendError("VMX: IA32_VMX_BASIC reports an unusable VMXON region size"));
    }
    let region = alloc_vmx_frame(frames, caps_msrs.basic)?;
    init_region(region, caps_msrs.basic);
    // SAFETY: CR0/CR4 meet the fixed bits and VMXE is set (above), IA32_FEATURE_CONTROL
    // allows VMXON outside SMX, and `region` is a fresh, zeroed frame carrying the
    // revision identifier that stays owned by this CPU's slot while VMX is on.
    if let Err(e) = unsafe { instr::vmxon(region) } {
        let _ = frames.free(region, PAGE_SIZE);
        log::error!("vmx: VMXON failed: {e}");
        return Err(BackendError(match e {
            instr_err @ super::error::VmxFail::Valid(_) => instr_err.text(),
            super::error::VmxFail::Invalid => {
                "VMXON failed (VMfailInvalid): bad VMXON region (address or revision identifier) or CR0/CR4 fixed bits not met"
            }
        }));
    }
    cpu.vmxon.store(region, Ordering::Relaxed);
    cpu.set_current(0, core::ptr::null_mut());

    // Stale EPT/VPID translations may survive from firmware or an earlier VMM.
    let cap = caps_msrs.ept_vpid_cap;
    if cap & ept_vpid_cap::INVEPT_ALL_CONTEXT != 0 {
        // SAFETY: VMX root operation; the all-context type is supported (checked).
        if let Err(e) = unsafe { instr::invept(InveptType::AllContext, 0) } {
            log::warn!("vmx: INVEPT all-context failed: {e}");
        }
    }
    if cap & ept_vpid_cap::INVVPID_ALL_CONTEXT != 0 {
        // SAFETY: as above, for INVVPID.
        if let Err(e) = unsafe { instr::invvpid(InvvpidType::AllContext, 0, 0) } {
            log::warn!("vmx: INVVPID all-context failed: {e}");
        }
    }
    log::info!(
        "vmx: VMXON on cpu {} (region {region:#x}, revision {:#x})",
        cpu_index(),
        caps_msrs.basic & basic::REVISION_MASK
    );
    Ok(())
}

/// Leaves VMX operation on this CPU (VMXOFF, CR4.VMXE cleared) and frees the VMXON region.
/// Every vCPU created on this CPU must have been released first.
pub fn disable(frames: &mut FrameAllocator) -> Result<(), BackendError> {
    let cpu = slot(cpu_index());
    let region = cpu.vmxon.load(Ordering::Relaxed);
    if region == 0 {
        return Ok(());
    }
    // SAFETY: this CPU is in VMX root operation (the slot says VMXON succeeded); the
    // caller released every vCPU, so no VMCS is used after this.
    unsafe { instr::vmxoff() }.map_err(BackendError::from)?;
    cpu.vmxon.store(0, Ordering::Relaxed);
    cpu.set_current(0, core::ptr::null_mut());
    // SAFETY: outside VMX operation CR4.VMXE may be cleared; nothing else changes.
    unsafe { Cr4::write_raw(Cr4::read_raw() & !CR4_VMXE) };
    let _ = frames.free(region, PAGE_SIZE);
    Ok(())
}

/// One frame for a VMXON/VMCS region or a bitmap, below 4 GiB where IA32_VMX_BASIC bit 48
/// limits VMX addresses to 32 bits.
pub fn alloc_vmx_frame(frames: &mut FrameAllocator, basic_msr: u64) -> Result<u64, BackendError> {
    alloc_vmx_pages(frames, basic_msr, 1)
}

pub fn alloc_vmx_pages(frames: &mut FrameAllocator, basic_msr: u64, pages: u64) -> Result<u64, BackendError> {
    let size = pages * PAGE_SIZE;
    let r = if basic_msr & basic::ADDRESSES_32BIT != 0 {
        frames.alloc_below(size, PAGE_SIZE, 1 << 32)
    } else {
        frames.alloc(size, PAGE_SIZE)
    };
    r.map_err(|e| {
        log::error!("vmx: frame allocation failed: {e}");
        BackendError("VMX: out of memory for VMX structures")
    })
}

/// Fills a frame with `byte` through the identity map.
pub fn fill_frame(phys: u64, byte: u8, pages: u64) {
    // SAFETY: `phys` is a frame (run) just taken from the frame allocator, so Vireo owns it
    // and nothing else refers to it; all RAM is identity-mapped writable.
    unsafe { core::ptr::write_bytes(phys as *mut u8, byte, (pages * PAGE_SIZE) as usize) };
}

/// Zeroes a VMXON/VMCS region and writes the revision identifier (bits 30:0; bit 31 = 0:
/// not a shadow VMCS) (SDM Vol. 3C §25.2).
pub fn init_region(phys: u64, basic_msr: u64) {
    fill_frame(phys, 0, 1);
    // SAFETY: as in `fill_frame`; the frame is 4 KiB-aligned, so the u32 store is aligned.
    unsafe { (phys as *mut u32).write_volatile((basic_msr & basic::REVISION_MASK) as u32) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_control() {
        assert_eq!(feature_control_update(0x5), Ok(None));
        assert_eq!(feature_control_update(0x0), Ok(Some(0x5)));
        assert_eq!(feature_control_update(0x2), Ok(Some(0x7)));
        assert!(feature_control_update(0x1).unwrap_err().0.contains("firmware"));
        assert!(feature_control_update(0x3).is_err());
    }

    #[test]
    fn caps_are_checked_by_name() {
        let good =
            VmxCaps { ept: true, unrestricted_guest: true, ept_4level: true, ept_wb: true, ..VmxCaps::default() };
        assert_eq!(check_caps(&good), Ok(()));
        assert!(check_caps(&VmxCaps { ept: false, ..good }).unwrap_err().0.contains("no EPT"));
        assert!(check_caps(&VmxCaps { unrestricted_guest: false, ..good })
            .unwrap_err()
            .0
            .contains("unrestricted guest"));
        assert!(check_caps(&VmxCaps { disabled_by_firmware: true, ..good }).unwrap_err().0.contains("firmware"));
    }

    #[test]
    fn slots_start_empty() {
        let s = slot(MAX_CPUS + 3);
        assert!(!s.vmx_on());
        assert_eq!(s.current_vmcs(), 0);
        assert!(s.current_msrs().is_null());
    }
}
