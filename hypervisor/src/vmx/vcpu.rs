//! One VMX virtual CPU: its VMCS and bitmaps, the host and guest state, and
//! [`Backend`] on top (SDM Vol. 3C ch. 25-28).

use x86_64::instructions::{
    segmentation::{Segment as _, CS, DS, ES, FS, GS, SS},
    tables::{sgdt, sidt},
};
use x86_64::registers::control::{Cr0, Cr3, Cr4};

use super::{
    check::{self, GuestSnapshot, SegFields},
    controls::{self, entry, ept_vpid_cap, msr as vmx_msr, primary, secondary, CapMsrs, Controls},
    cr::{self, CrAccess, CrContext, CrFixed, CrWrite, GpFault, CR4_PCIDE},
    decode::{self, intr, reason, RawExit},
    error::VmxFail,
    guest_mem,
    instr::{self, InveptType, InvvpidType, VmcsField},
    msr_bitmap,
    percpu::{self, GuestMsrs},
    run::{self, Entered},
    vmcs::{segment_fields, Field16, Field32, Field64, FieldNat, SEGMENTS},
};
use crate::{
    arch::{cpu::VmxCaps, msr},
    mm::{Ept, FrameAllocator, PAGE_SIZE},
    vmm::{
        backend::{Backend, BackendError},
        exit::{Event, Exit, ExitEvents, ExitKind, HypercallInsn},
        fast::FastExits,
        regs::GuestRegs,
        state::{CpuState, SegAttr, SegReg, Segment, CR0_PE, EFER_LMA, RFLAGS_IF},
    },
};

/// Interruptibility state bits (SDM Vol. 3C §25.4.2, Table 25-3).
const BLOCKING_BY_STI: u32 = 1 << 0;
const BLOCKING_BY_MOV_SS: u32 = 1 << 1;

/// Exit `raw` value for a VMLAUNCH/VMRESUME that failed outright (no exit reason exists).
pub const RAW_ENTRY_INSTRUCTION_FAILED: u64 = u64::MAX;

/// A VMX virtual CPU. Created and run on one physical CPU (see [`super::percpu`]).
#[derive(Debug)]
pub struct VmxVcpu {
    vmcs: u64,
    msr_bitmap: u64,
    /// A frame holding this vCPU's [`GuestMsrs`].
    msrs: u64,
    /// Two consecutive frames (I/O bitmaps A and B, all ones) when the CPU lacks
    /// unconditional I/O exiting.
    io_bitmaps: Option<u64>,
    cpu: usize,
    launched: bool,
    /// Current control values (interrupt-window and IA-32e mode bits included).
    controls: Controls,
    fixed: CrFixed,
    ept_root: u64,
    eptp: u64,
    /// 0 = VPID off.
    vpid: u16,
    ept_vpid_cap: u64,
    phys_bits: u8,
    pending_event: bool,
    /// GUEST_RSP as last written or read, to skip redundant VMWRITEs.
    rsp_cache: u64,
    /// The VMX-preemption timer counts down once every 2^rate TSC ticks (IA32_VMX_MISC
    /// bits 4:0, SDM Vol. 3C §26.5.1); `None`: the CPU has no preemption timer.
    preemption_rate: Option<u8>,
    /// TSC by which the guest must exit (see `Backend::set_deadline`).
    deadline: Option<u64>,
    /// The guest's CR2 while another vCPU may run on this host CPU: VM entries and exits
    /// leave CR2 alone (SDM Vol. 3C §27.3, §28.5), so the guest's lives in the CPU's
    /// register during a slice and here between slices (`Backend::slice_start`/`slice_end`).
    cr2: u64,
    /// The deadline the VMX-preemption timer field counts to, when VM exits save the
    /// timer's value (`exit::SAVE_PREEMPTION_TIMER`): the field then counts on from entry
    /// to entry and is written again only for a new deadline. `None`: written at every entry.
    timer_for: Option<Option<u64>>,
}

/// PAUSE-loop exiting: PAUSEs at most this many TSC ticks apart form one loop ...
const PLE_GAP: u32 = 128;
/// ... which exits after spinning this many TSC ticks.
const PLE_WINDOW: u32 = 4096;

/// Architectural state after RESET: the vCPU's state until the core loads its own.
pub fn reset_state() -> CpuState {
    CpuState::reset()
}

/// The base of a 16-byte system descriptor (TSS/LDT in 64-bit mode; SDM Vol. 3A §8.2.3):
/// bits 15:0 in bytes 2-3, 23:16 in byte 4, 31:24 in byte 7, 63:32 in bytes 8-11.
pub const fn system_descriptor_base(low: u64, high: u64) -> u64 {
    ((low >> 16) & 0xFF_FFFF) | (((low >> 56) & 0xFF) << 24) | ((high & 0xFFFF_FFFF) << 32)
}

use crate::vmm::exit::exception_has_error_code as has_error_code;

/// The VM-entry interruption-information value for `event` (SDM Vol. 3C §25.8.3), and the
/// error code if one is delivered. `protected`: guest CR0.PE (an unrestricted guest in real
/// mode must not deliver error codes).
pub fn entry_interruption(event: Event, protected: bool) -> (u32, Option<u32>) {
    let (vector, kind, error) = match event {
        Event::Exception { vector, error_code } => (vector, intr::TYPE_HARDWARE_EXCEPTION, error_code),
        Event::Interrupt { vector } => (vector, intr::TYPE_EXTERNAL, None),
        Event::Nmi => (2, intr::TYPE_NMI, None),
    };
    let deliver = kind == intr::TYPE_HARDWARE_EXCEPTION && protected && has_error_code(vector);
    let info =
        intr::VALID | (kind << intr::TYPE_SHIFT) | vector as u32 | if deliver { intr::ERROR_CODE_VALID } else { 0 };
    (info, deliver.then(|| error.unwrap_or(0)))
}

/// A VMX failure in a path that has no way to report it (an accessor): a Vireo bug.
#[cold]
fn vmx_bug(what: &str, e: VmxFail) -> ! {
    panic!("vmx: {what}: {e}")
}

#[cold]
#[inline(never)]
fn vmread_failed<F: VmcsField>(field: F, e: VmxFail) -> ! {
    log::error!("vmx: VMREAD {field:?}: {e}");
    vmx_bug("VMREAD", e)
}

#[cold]
#[inline(never)]
fn vmwrite_failed<F: VmcsField>(field: F, e: VmxFail) -> ! {
    log::error!("vmx: VMWRITE {field:?}: {e}");
    vmx_bug("VMWRITE", e)
}

impl VmxVcpu {
    /// Creates a vCPU on this CPU: VMCS (VMCLEAR, VMPTRLD), MSR bitmap, controls, host
    /// state, EPTP and VPID, and the RESET guest state. `vpid` 0 (or a CPU without VPID or
    /// INVVPID) runs without VPID: every entry and exit then flushes guest translations.
    /// [`enable`](super::enable) must have succeeded on this CPU.
    pub fn new(frames: &mut FrameAllocator, ept_root: u64, vpid: u16, caps: &VmxCaps) -> Result<VmxVcpu, BackendError> {
        percpu::check_caps(caps)?;
        let cpu = percpu::cpu_index();
        if !percpu::slot(cpu).vmx_on() {
            return Err(BackendError("VMX is not on for this CPU: call vmx::enable first"));
        }
        // SAFETY: CPUID reported VMX, so the capability MSRs exist; reads have no effect.
        let cap = CapMsrs::read(|m| unsafe { msr::read(m) });
        let invvpid_ok = cap.ept_vpid_cap & ept_vpid_cap::INVVPID != 0
            && cap.ept_vpid_cap & (ept_vpid_cap::INVVPID_SINGLE_CONTEXT | ept_vpid_cap::INVVPID_ALL_CONTEXT) != 0;
        let use_vpid = caps.vpid && vpid != 0 && invvpid_ok;
        let controls = controls::compute(&cap, use_vpid)?;
        let fixed = CrFixed {
            cr0_fixed0: cap.cr0_fixed0,
            cr0_fixed1: cap.cr0_fixed1,
            cr4_fixed0: cap.cr4_fixed0,
            cr4_fixed1: cap.cr4_fixed1,
            unrestricted: true,
        };
        let phys_bits =
            raw_cpuid::CpuId::new().get_processor_capacity_feature_info().map_or(36, |c| c.physical_address_bits());

        let vmcs = percpu::alloc_vmx_frame(frames, cap.basic)?;
        let mut vcpu = VmxVcpu {
            vmcs,
            msr_bitmap: 0,
            msrs: 0,
            io_bitmaps: None,
            cpu,
            launched: false,
            controls,
            fixed,
            ept_root,
            eptp: Ept::eptp(ept_root, caps.ept_ad),
            vpid: if controls.secondary & secondary::ENABLE_VPID != 0 { vpid } else { 0 },
            ept_vpid_cap: cap.ept_vpid_cap,
            phys_bits,
            pending_event: false,
            rsp_cache: 0,
            // SAFETY: IA32_VMX_MISC exists on every VMX CPU; reading it has no effect.
            preemption_rate: (controls.pin & controls::pin::PREEMPTION_TIMER != 0)
                .then(|| (unsafe { msr::read(msr::IA32_VMX_MISC) } & 0x1F) as u8),
            deadline: None,
            cr2: 0,
            timer_for: None,
        };
        match vcpu.build(frames, &cap) {
            Ok(()) => Ok(vcpu),
            Err(e) => {
                vcpu.release(frames);
                Err(e)
            }
        }
    }

    /// Allocates the rest and sets up every VMCS field.
    fn build(&mut self, frames: &mut FrameAllocator, cap: &CapMsrs) -> Result<(), BackendError> {
        percpu::init_region(self.vmcs, cap.basic);
        self.msr_bitmap = percpu::alloc_vmx_frame(frames, cap.basic)?;
        // SAFETY: a frame just allocated, owned by this vCPU, identity-mapped.
        msr_bitmap::build(unsafe { &mut *(self.msr_bitmap as *mut [u8; msr_bitmap::BITMAP_SIZE]) });
        self.msrs = frames.alloc_frame().map_err(|_| BackendError("VMX: out of memory for VMX structures"))?;
        percpu::fill_frame(self.msrs, 0, 1);
        if self.controls.io_bitmaps {
            let io = percpu::alloc_vmx_pages(frames, cap.basic, 2)?;
            percpu::fill_frame(io, 0xFF, 2);
            self.io_bitmaps = Some(io);
        }
        // SAFETY: VMX root operation (checked in `new`); the VMCS is ours and not active.
        unsafe { instr::vmclear(self.vmcs) }.map_err(BackendError::from)?;
        self.make_current().map_err(BackendError::from)?;
        self.write_controls()?;
        self.write_host_state()?;
        self.load_state(&reset_state());
        self.invalidate_ept();
        self.flush_vpid();
        Ok(())
    }

    /// Gives the vCPU's frames back (VMCLEAR first, so the CPU holds no part of the VMCS).
    pub fn release(self, frames: &mut FrameAllocator) {
        let slot = percpu::slot(self.cpu);
        if slot.current_vmcs() == self.vmcs {
            slot.set_current(0, core::ptr::null_mut());
        }
        // SAFETY: the VMCS is ours; VMCLEAR of a VMCS that is not current is allowed, and
        // one that is current stops being so (the slot was cleared above).
        if let Err(e) = unsafe { instr::vmclear(self.vmcs) } {
            log::warn!("vmx: VMCLEAR at release failed: {e}");
        }
        for (addr, pages) in [(self.vmcs, 1), (self.msr_bitmap, 1), (self.msrs, 1), (self.io_bitmaps.unwrap_or(0), 2)] {
            if addr != 0 {
                if let Err(e) = frames.free(addr, pages * PAGE_SIZE) {
                    log::warn!("vmx: freeing {addr:#x}: {e}");
                }
            }
        }
    }

    /// The EPT pointer in this vCPU's VMCS.
    pub fn eptp(&self) -> u64 {
        self.eptp
    }

    /// The VPID, or `None` when VPID is off.
    pub fn vpid(&self) -> Option<u16> {
        (self.vpid != 0).then_some(self.vpid)
    }

    /// Drops cached EPT translations of this vCPU's EPTP: call after removing or narrowing
    /// EPT mappings (SDM Vol. 3C §29.4.3.4).
    pub fn invalidate_ept(&self) {
        let cap = self.ept_vpid_cap;
        let kind = if cap & ept_vpid_cap::INVEPT_SINGLE_CONTEXT != 0 {
            InveptType::SingleContext
        } else if cap & ept_vpid_cap::INVEPT_ALL_CONTEXT != 0 {
            InveptType::AllContext
        } else {
            return;
        };
        // SAFETY: VMX root operation (the vCPU exists only after `enable`); the type is
        // supported (checked).
        if let Err(e) = unsafe { instr::invept(kind, self.eptp) } {
            log::warn!("vmx: INVEPT failed: {e}");
        }
    }

    /// Drops the guest's linear translations tagged with this vCPU's VPID (what a MOV to
    /// CR3/CR0/CR4 would have done natively). Without VPID entries and exits flush anyway.
    fn flush_vpid(&self) {
        if self.vpid == 0 {
            return;
        }
        let cap = self.ept_vpid_cap;
        let kind = if cap & ept_vpid_cap::INVVPID_SINGLE_CONTEXT != 0 {
            InvvpidType::SingleContext
        } else {
            InvvpidType::AllContext
        };
        // SAFETY: VMX root operation; VPID is enabled only with INVVPID single- or
        // all-context support (checked in `new`).
        if let Err(e) = unsafe { instr::invvpid(kind, self.vpid, 0) } {
            log::warn!("vmx: INVVPID failed: {e}");
        }
    }

    /// Makes this vCPU's VMCS current on its CPU, switching the guest-owned MSRs VMX does
    /// not switch (save the outgoing vCPU's, load ours). Inline for the common case, on the
    /// exit path before every VMCS access: it is current already.
    #[inline]
    fn make_current(&self) -> Result<(), VmxFail> {
        if percpu::slot(self.cpu).current_vmcs() == self.vmcs {
            return Ok(());
        }
        self.switch_current()
    }

    #[cold]
    #[inline(never)]
    fn switch_current(&self) -> Result<(), VmxFail> {
        let slot = percpu::slot(self.cpu);
        // SAFETY: VMX root operation; the VMCS is ours, initialised and VMCLEARed at
        // creation, and used only on this CPU.
        unsafe { instr::vmptrld(self.vmcs) }?;
        let outgoing = slot.current_msrs();
        if !outgoing.is_null() {
            // SAFETY: the slot holds the MSR frame of the vCPU whose VMCS was current; a
            // vCPU clears the slot when released, so the frame is still its own.
            unsafe { percpu::save_guest_msrs(outgoing) };
        }
        // SAFETY: our own MSR frame, holding values saved from the CPU or zeros.
        unsafe { percpu::load_guest_msrs(self.msrs as *const GuestMsrs) };
        slot.set_current(self.vmcs, self.msrs as *mut GuestMsrs);
        Ok(())
    }

    #[inline]
    fn current(&self) {
        if let Err(e) = self.make_current() {
            vmx_bug("VMPTRLD of the vCPU's VMCS", e);
        }
    }

    /// VMREAD from this vCPU's VMCS, which the caller made current since the last time
    /// another VMCS could have been (the exit path: `run` made it current before entering,
    /// and VM exits leave it so).
    #[inline]
    fn read_cur<F: VmcsField>(&self, field: F) -> F::Value {
        // SAFETY: VMX root operation with our VMCS current (the caller's promise).
        match unsafe { instr::vmread(field) } {
            Ok(v) => v,
            Err(e) => vmread_failed(field, e),
        }
    }

    /// VMREAD from this vCPU's VMCS (made current first).
    #[inline]
    fn read<F: VmcsField>(&self, field: F) -> F::Value {
        self.current();
        self.read_cur(field)
    }

    /// VMWRITE to this vCPU's VMCS. Only guest-state and control fields that cannot point
    /// into host memory go through here (host state and addresses are written in `build`).
    #[inline]
    fn write<F: VmcsField>(&mut self, field: F, value: F::Value) {
        if let Err(e) = self.try_write(field, value) {
            vmwrite_failed(field, e)
        }
    }

    #[inline]
    fn try_write<F: VmcsField>(&self, field: F, value: F::Value) -> Result<(), VmxFail> {
        self.make_current()?;
        // SAFETY: our VMCS is current; callers write guest state, controls Vireo computed,
        // or host state describing this CPU's own tables and stack.
        unsafe { instr::vmwrite(field, value) }
    }

    /// VMWRITE to this vCPU's VMCS, which the caller made current (as [`Self::read_cur`]):
    /// the fast entry loop's RIP advance.
    #[inline]
    fn write_cur<F: VmcsField>(&mut self, field: F, value: F::Value) {
        // SAFETY: VMX root operation with our VMCS current (the caller's promise); the
        // fields written this way are guest state.
        if let Err(e) = unsafe { instr::vmwrite(field, value) } {
            vmwrite_failed(field, e)
        }
    }

    /// The guest's CPL (SS.DPL), this VMCS current (as [`Self::read_cur`]).
    #[inline]
    fn cpl_cur(&self) -> u8 {
        SegAttr::from_vmx(self.read_cur(Field32::GuestSsAccessRights)).dpl()
    }

    /// [`Self::end_interrupt_shadow`] with this VMCS current (as [`Self::read_cur`]).
    #[inline]
    fn end_interrupt_shadow_cur(&mut self) {
        let s = self.read_cur(Field32::GuestInterruptibilityState);
        if s & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) != 0 {
            self.write_cur(Field32::GuestInterruptibilityState, s & !(BLOCKING_BY_STI | BLOCKING_BY_MOV_SS));
        }
    }

    /// `try_write` for setup, with the field name in the log.
    fn setup<F: VmcsField>(&self, field: F, value: F::Value) -> Result<(), BackendError> {
        self.try_write(field, value).map_err(|e| {
            log::error!("vmx: VMWRITE {field:?} during setup: {e}");
            BackendError::from(e)
        })
    }

    fn write_controls(&mut self) -> Result<(), BackendError> {
        let c = self.controls;
        self.setup(Field32::PinBasedControls, c.pin)?;
        self.setup(Field32::PrimaryProcBasedControls, c.primary)?;
        self.setup(Field32::SecondaryProcBasedControls, c.secondary)?;
        self.setup(Field32::VmExitControls, c.exit)?;
        self.setup(Field32::VmEntryControls, c.entry)?;
        self.setup(Field32::ExceptionBitmap, 0)?;
        self.setup(Field32::PageFaultErrorCodeMask, 0)?;
        self.setup(Field32::PageFaultErrorCodeMatch, 0)?;
        self.setup(Field32::Cr3TargetCount, 0)?;
        self.setup(Field32::VmExitMsrStoreCount, 0)?;
        self.setup(Field32::VmExitMsrLoadCount, 0)?;
        self.setup(Field32::VmEntryMsrLoadCount, 0)?;
        self.setup(Field32::VmEntryInterruptionInfo, 0)?;
        self.setup(Field64::MsrBitmap, self.msr_bitmap)?;
        if let Some(io) = self.io_bitmaps {
            self.setup(Field64::IoBitmapA, io)?;
            self.setup(Field64::IoBitmapB, io + PAGE_SIZE)?;
        }
        self.setup(Field64::EptPointer, self.eptp)?;
        if self.vpid != 0 {
            self.setup(Field16::VirtualProcessorId, self.vpid)?;
        }
        if c.secondary & secondary::PAUSE_LOOP_EXITING != 0 {
            // A PAUSE loop is PAUSEs at most PLE_GAP TSC ticks apart; it exits once it has
            // spun for PLE_WINDOW ticks (SDM Vol. 3C §25.6.13; KVM's defaults).
            self.setup(Field32::PleGap, PLE_GAP)?;
            self.setup(Field32::PleWindow, PLE_WINDOW)?;
        }
        if c.secondary & secondary::ENABLE_XSAVES_XRSTORS != 0 {
            // No XSAVES/XRSTORS exits: IA32_XSS is the guest's concern (WRMSR exits).
            self.setup(Field64::XssExitingBitmap, 0)?;
        }
        self.setup(FieldNat::Cr0GuestHostMask, self.fixed.cr0_mask())?;
        self.setup(FieldNat::Cr4GuestHostMask, self.fixed.cr4_mask())?;
        self.setup(Field64::VmcsLinkPointer, !0)?;
        Ok(())
    }

    /// Host state: this CPU as it is now (SDM Vol. 3C §25.5, checks in §27.2.3).
    fn write_host_state(&mut self) -> Result<(), BackendError> {
        let (cr3_frame, cr3_flags) = Cr3::read_raw();
        let cr3 = cr3_frame.start_address().as_u64() | cr3_flags as u64;
        let selectors = [
            (Field16::HostCsSelector, CS::get_reg().0),
            (Field16::HostSsSelector, SS::get_reg().0),
            (Field16::HostDsSelector, DS::get_reg().0),
            (Field16::HostEsSelector, ES::get_reg().0),
            (Field16::HostFsSelector, FS::get_reg().0),
            (Field16::HostGsSelector, GS::get_reg().0),
            (Field16::HostTrSelector, instr::read_tr()),
        ];
        for (field, sel) in selectors {
            if sel & 7 != 0 {
                log::error!("vmx: host {field:?} = {sel:#x} has RPL/TI bits");
                return Err(BackendError("VMX: a host segment selector has RPL or TI set"));
            }
            self.setup(field, sel)?;
        }
        let tr = instr::read_tr();
        if CS::get_reg().0 == 0 || tr == 0 {
            return Err(BackendError("VMX: host CS or TR selector is null (GDT/TSS not loaded)"));
        }
        let gdtr = sgdt();
        let idtr = sidt();
        let gdt_base = gdtr.base.as_u64();
        // SAFETY: TR selects a 16-byte TSS descriptor inside the loaded GDT, which lives in
        // Vireo's memory (identity/kernel mapped); reading it has no side effect.
        let tr_base = unsafe {
            let p = (gdt_base + (tr & !7) as u64) as *const u64;
            system_descriptor_base(p.read_volatile(), p.add(1).read_volatile())
        };
        self.setup(FieldNat::HostCr0, Cr0::read_raw())?;
        self.setup(FieldNat::HostCr3, cr3)?;
        self.setup(FieldNat::HostCr4, Cr4::read_raw())?;
        // SAFETY (all MSR reads below): architectural MSRs of every x86-64 CPU.
        let rd = |m: u32| unsafe { msr::read(m) };
        self.setup(FieldNat::HostFsBase, rd(vmx_msr::IA32_FS_BASE))?;
        self.setup(FieldNat::HostGsBase, rd(vmx_msr::IA32_GS_BASE))?;
        self.setup(FieldNat::HostTrBase, tr_base)?;
        self.setup(FieldNat::HostGdtrBase, gdt_base)?;
        self.setup(FieldNat::HostIdtrBase, idtr.base.as_u64())?;
        self.setup(Field32::HostIa32SysenterCs, rd(vmx_msr::IA32_SYSENTER_CS) as u32)?;
        self.setup(FieldNat::HostIa32SysenterEsp, rd(vmx_msr::IA32_SYSENTER_ESP))?;
        self.setup(FieldNat::HostIa32SysenterEip, rd(vmx_msr::IA32_SYSENTER_EIP))?;
        self.setup(Field64::HostIa32Efer, rd(msr::IA32_EFER))?;
        self.setup(Field64::HostIa32Pat, rd(vmx_msr::IA32_PAT))?;
        self.setup(FieldNat::HostRip, run::exit_address())?;
        // HOST_RSP is written by the trampoline at every entry.
        Ok(())
    }

    fn set_entry_control(&mut self, bit: u32, on: bool) {
        let new = if on { self.controls.entry | bit } else { self.controls.entry & !bit };
        if new != self.controls.entry {
            self.controls.entry = new;
            self.write(Field32::VmEntryControls, new);
        }
    }

    fn set_exit_control(&mut self, bit: u32, on: bool) {
        let new = if on { self.controls.exit | bit } else { self.controls.exit & !bit };
        if new != self.controls.exit {
            self.controls.exit = new;
            self.write(Field32::VmExitControls, new);
        }
    }

    fn set_guest_efer(&mut self, efer: u64) {
        self.write(Field64::GuestIa32Efer, efer);
        self.set_entry_control(entry::IA32E_MODE_GUEST, efer & EFER_LMA != 0);
    }

    fn write_segment(&mut self, seg: SegReg, s: &Segment) {
        let f = segment_fields(seg);
        self.write(f.selector, s.selector);
        self.write(f.base, s.base);
        self.write(f.limit, s.limit);
        self.write(f.access_rights, s.attr.to_vmx(s.unusable));
    }

    /// Loads the PDPTEs for PAE paging from guest memory at `cr3` into the VMCS.
    fn load_pdptes(&mut self, cr3: u64) -> Result<(), GpFault> {
        // SAFETY: EPT tables and guest RAM are host RAM frames, which Vireo identity-maps;
        // reads have no side effect.
        let read = |hpa: u64| unsafe { (hpa as *const u64).read_volatile() };
        let Some(entries) = guest_mem::pdptes(self.ept_root, cr3, &read) else {
            return Err(GpFault("PAE PDPT not in guest RAM"));
        };
        if entries.iter().any(|&e| cr::pdpte_reserved(e, self.phys_bits)) {
            return Err(GpFault("PAE PDPTE with reserved bits set"));
        }
        for (field, e) in [Field64::GuestPdpte0, Field64::GuestPdpte1, Field64::GuestPdpte2, Field64::GuestPdpte3]
            .into_iter()
            .zip(entries)
        {
            self.write(field, e);
        }
        Ok(())
    }

    #[inline]
    fn interruptibility(&self) -> u32 {
        self.read(Field32::GuestInterruptibilityState)
    }

    /// The instruction at the old RIP completed: its STI/MOV SS shadow is over.
    #[inline]
    fn end_interrupt_shadow(&mut self) {
        let s = self.interruptibility();
        if s & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) != 0 {
            self.write(Field32::GuestInterruptibilityState, s & !(BLOCKING_BY_STI | BLOCKING_BY_MOV_SS));
        }
    }

    fn cr_context(&self) -> CrContext {
        CrContext {
            cr0: self.cr0(),
            cr4: self.cr4(),
            cr3: self.cr3(),
            efer: self.efer(),
            cs_long: self.read(Field32::GuestCsAccessRights) & (1 << 13) != 0,
        }
    }

    /// Commits an emulated CR0 (`cr == 0`) or CR4 write.
    fn commit_cr(&mut self, cr: u8, w: CrWrite) -> Result<(), GpFault> {
        if w.load_pdptes {
            let cr3 = self.cr3();
            self.load_pdptes(cr3)?;
        }
        if cr == 0 {
            self.write(FieldNat::GuestCr0, w.real);
            self.write(FieldNat::Cr0ReadShadow, w.shadow);
            let old_efer = self.efer();
            if w.efer != old_efer {
                self.set_guest_efer(w.efer);
            }
            if w.efer & EFER_LMA != 0 && old_efer & EFER_LMA == 0 {
                // VM entry in IA-32e mode wants a 64-bit busy TSS in TR (SDM Vol. 3C
                // §27.3.1.2), which the CPU itself does not check when long mode turns on:
                // a guest still holding a 16-bit TSS from real mode keeps running (as KVM).
                let ar = self.read(Field32::GuestTrAccessRights);
                if ar & 0xF != u32::from(SegAttr::TYPE_TSS_BUSY) {
                    self.write(Field32::GuestTrAccessRights, (ar & !0xF) | u32::from(SegAttr::TYPE_TSS_BUSY));
                }
            }
        } else {
            self.write(FieldNat::GuestCr4, w.real);
            self.write(FieldNat::Cr4ReadShadow, w.shadow);
        }
        if w.flush_tlb {
            self.flush_vpid();
        }
        Ok(())
    }

    /// A control-register access exit: emulated here in full (SDM Vol. 3C §27.1.3).
    fn emulate_cr(&mut self, qualification: u64, regs: &mut GuestRegs, next_rip: u64) -> ExitKind {
        let access = CrAccess::decode(qualification);
        let result = match access {
            CrAccess::MovTo { cr: 0, gpr } => {
                let ctx = self.cr_context();
                cr::write_cr0(&self.fixed, &ctx, regs.get(gpr as usize)).and_then(|w| self.commit_cr(0, w))
            }
            CrAccess::MovTo { cr: 4, gpr } => {
                let ctx = self.cr_context();
                cr::write_cr4(&self.fixed, &ctx, regs.get(gpr as usize)).and_then(|w| self.commit_cr(4, w))
            }
            CrAccess::Clts => {
                let ctx = self.cr_context();
                cr::clts(&self.fixed, &ctx).and_then(|w| self.commit_cr(0, w))
            }
            CrAccess::Lmsw { source } => {
                let ctx = self.cr_context();
                cr::lmsw(&self.fixed, &ctx, source).and_then(|w| self.commit_cr(0, w))
            }
            // CR3 exits only when the CPU forces CR3-load/store exiting (no TRUE MSRs).
            CrAccess::MovTo { cr: 3, gpr } => {
                let pcide = self.cr4() & CR4_PCIDE != 0;
                let value = regs.get(gpr as usize);
                let no_flush = pcide && value & (1 << 63) != 0;
                let value = value & !(1 << 63);
                let pae = cr::pae_paging(self.cr0(), self.cr4(), self.efer());
                let ok = if pae { self.load_pdptes(value) } else { Ok(()) };
                ok.map(|()| {
                    self.write(FieldNat::GuestCr3, value);
                    if !no_flush {
                        self.flush_vpid();
                    }
                })
            }
            CrAccess::MovFrom { cr: 3, gpr } => {
                regs.set(gpr as usize, self.cr3());
                Ok(())
            }
            other => {
                log::warn!("vmx: unexpected control-register exit {other:?}");
                return ExitKind::Unhandled;
            }
        };
        match result {
            Ok(()) => {
                self.write(FieldNat::GuestRip, next_rip);
                self.end_interrupt_shadow();
            }
            Err(GpFault(why)) => {
                log::debug!("vmx: guest {access:?} faults: {why}");
                self.inject(Event::GP0);
            }
        }
        ExitKind::ControlRegister
    }

    /// Before an entry (this VMCS current): the VMX-preemption timer for the deadline.
    #[inline]
    fn arm_preemption_timer(&mut self) {
        if let Some(rate) = self.preemption_rate {
            // Counts from the entry; 0 exits before the guest runs an instruction. No
            // deadline: the longest count (minutes at GHz rates; the host timer still runs).
            // Where exits save the timer, a count already running for this deadline goes on
            // (it does not count while Vireo handles exits, so it may end late: the host's
            // local APIC timer, armed for the same deadline, bounds that).
            if self.timer_for != Some(self.deadline) {
                let ticks = match self.deadline {
                    Some(d) => d.saturating_sub(instr::rdtsc()) >> rate,
                    None => u64::MAX,
                };
                self.write(Field32::VmxPreemptionTimerValue, ticks.min(u32::MAX as u64) as u32);
                if self.controls.exit & controls::exit::SAVE_PREEMPTION_TIMER != 0 {
                    self.timer_for = Some(self.deadline);
                }
            }
        }
    }

    /// Re-queues an event whose delivery the exit interrupted (SDM Vol. 3C §28.2.4,
    /// §29.2.4 "Event delivery").
    /// Returns the interrupted event.
    fn requeue_idt_vectoring(&mut self) -> Option<Event> {
        let info = self.read(Field32::IdtVectoringInfo);
        if info & intr::VALID == 0 {
            return None;
        }
        let mut code = 0;
        if info & intr::ERROR_CODE_VALID != 0 {
            code = self.read(Field32::IdtVectoringErrorCode);
            self.write(Field32::VmEntryExceptionErrorCode, code);
        }
        if intr::needs_instruction_length(info) {
            let len = self.read(Field32::VmExitInstructionLength);
            self.write(Field32::VmEntryInstructionLength, len);
        }
        self.write(Field32::VmEntryInterruptionInfo, intr::requeue(info));
        self.pending_event = true;
        Event::decode(info, code)
    }

    /// Reads the guest-state fields for [`check::check`].
    fn snapshot(&self) -> GuestSnapshot {
        let mut segs = [SegFields::default(); 8];
        for (slot, seg) in segs.iter_mut().zip(SEGMENTS) {
            let f = segment_fields(seg);
            *slot = SegFields {
                selector: self.read(f.selector),
                base: self.read(f.base),
                limit: self.read(f.limit),
                ar: self.read(f.access_rights),
            };
        }
        GuestSnapshot {
            cr0: self.read(FieldNat::GuestCr0),
            cr3: self.read(FieldNat::GuestCr3),
            cr4: self.read(FieldNat::GuestCr4),
            dr7: self.read(FieldNat::GuestDr7),
            efer: self.read(Field64::GuestIa32Efer),
            pat: self.read(Field64::GuestIa32Pat),
            rflags: self.read(FieldNat::GuestRflags),
            rip: self.read(FieldNat::GuestRip),
            segs,
            gdtr_base: self.read(FieldNat::GuestGdtrBase),
            gdtr_limit: self.read(Field32::GuestGdtrLimit),
            idtr_base: self.read(FieldNat::GuestIdtrBase),
            idtr_limit: self.read(Field32::GuestIdtrLimit),
            interruptibility: self.read(Field32::GuestInterruptibilityState),
            activity: self.read(Field32::GuestActivityState),
            link_pointer: self.read(Field64::VmcsLinkPointer),
            entry_controls: self.read(Field32::VmEntryControls),
            secondary_controls: self.read(Field32::SecondaryProcBasedControls),
            entry_intr_info: self.read(Field32::VmEntryInterruptionInfo),
        }
    }

    /// Everything after an entry that exited (`tsc`: when): reads the fields this exit
    /// needs, decodes it and emulates what the backend emulates itself. `injected`: the
    /// event queued at the entry.
    #[inline]
    fn complete_exit(&mut self, regs: &mut GuestRegs, tsc: u64, injected: Option<Event>) -> Exit {
        let reason = self.read_cur(Field32::ExitReason);
        // The cheap instruction exits read only what every exit reads and the instruction
        // length: no qualification, interruption or IDT-vectoring information (never valid
        // for them, SDM Vol. 3C §28.2.4), nothing the backend emulates.
        if let Some(kind) = decode::simple_instruction_exit(reason) {
            self.launched = true;
            self.pending_event = false;
            regs.rsp = self.read_cur(FieldNat::GuestRsp);
            self.rsp_cache = regs.rsp;
            let rip = self.read_cur(FieldNat::GuestRip);
            let len = self.read_cur(Field32::VmExitInstructionLength);
            return Exit {
                kind,
                rip,
                next_rip: rip.wrapping_add(len as u64),
                raw: u64::from(reason),
                tsc,
                events: ExitEvents { injected, interrupted: None },
            };
        }
        self.complete_other_exit(regs, tsc, injected, reason)
    }

    /// [`Self::complete_exit`] for every exit but the cheap instruction exits.
    fn complete_other_exit(&mut self, regs: &mut GuestRegs, tsc: u64, injected: Option<Event>, reason: u32) -> Exit {
        let mut raw = RawExit { reason, ..RawExit::default() };
        let basic = raw.basic();
        if !raw.entry_failed() {
            self.launched = true;
        }
        regs.rsp = self.read_cur(FieldNat::GuestRsp);
        self.rsp_cache = regs.rsp;
        raw.rip = self.read_cur(FieldNat::GuestRip);
        if decode::is_instruction_exit(basic) {
            raw.instr_len = self.read_cur(Field32::VmExitInstructionLength);
        }
        if matches!(basic, reason::SIPI | reason::CR_ACCESS | reason::IO | reason::EPT_VIOLATION) {
            raw.qualification = self.read_cur(FieldNat::ExitQualification);
        }
        if decode::needs_intr_info(basic) {
            raw.intr_info = self.read_cur(Field32::VmExitInterruptionInfo);
            if raw.intr_info & intr::ERROR_CODE_VALID != 0 {
                raw.intr_error = self.read_cur(Field32::VmExitInterruptionErrorCode);
            }
        }
        if decode::needs_gpa(basic) {
            raw.gpa = self.read_cur(Field64::GuestPhysicalAddress);
            if basic == reason::EPT_VIOLATION && raw.qualification & (1 << 7) != 0 {
                raw.gla = self.read_cur(FieldNat::GuestLinearAddress);
            }
        }

        // A failed entry delivered nothing: a queued event stays queued. IDT-vectoring
        // information is valid only for exits during event delivery, which instruction
        // exits never are (SDM Vol. 3C §28.2.4): skip the VMREAD for them.
        let mut events = ExitEvents { injected, interrupted: None };
        if !raw.entry_failed() {
            self.pending_event = false;
            if !decode::is_instruction_exit(basic) {
                events.interrupted = self.requeue_idt_vectoring();
            }
        }

        let (mut kind, next_rip) = decode::decode(&raw);
        match basic {
            _ if raw.entry_failed() => {
                if basic == reason::INVALID_GUEST_STATE {
                    let snap = self.snapshot();
                    if let Some(why) = check::check(&snap, &self.fixed) {
                        kind = ExitKind::EntryFailed { reason: why, code: basic as u64 };
                    }
                    log::error!(
                        "vmx: VM entry failed: {kind:?} (qualification {:#x})",
                        self.read(FieldNat::ExitQualification)
                    );
                } else {
                    log::error!("vmx: VM entry failed: {kind:?}");
                }
            }
            reason::CR_ACCESS => kind = self.emulate_cr(raw.qualification, regs, next_rip),
            reason::EPT_MISCONFIG => log::error!("vmx: EPT misconfiguration at guest-physical {:#x}", raw.gpa),
            _ if matches!(kind, ExitKind::Unhandled) => {
                log::debug!("vmx: unhandled exit {} ({})", basic, super::error::exit_reason_name(basic));
            }
            _ => {}
        }
        let raw_code = if raw.entry_failed() { raw.reason as u64 } else { basic as u64 };
        Exit { kind, rip: raw.rip, next_rip, raw: raw_code, tsc, events }
    }

    fn entry_instruction_failed(&self, entered: Entered, tsc: u64) -> Exit {
        let fail = match entered {
            Entered::FailInvalid => VmxFail::Invalid,
            // SAFETY: VMfailValid means our VMCS is current; the error field is read-only.
            _ => VmxFail::Valid(unsafe { instr::vmread(Field32::VmInstructionError) }.unwrap_or(0)),
        };
        log::error!("vmx: {} failed: {fail}", if self.launched { "VMRESUME" } else { "VMLAUNCH" });
        if matches!(fail, VmxFail::Valid(7)) {
            log::error!(
                "vmx: controls pin={:#x} primary={:#x} secondary={:#x} exit={:#x} entry={:#x}",
                self.controls.pin,
                self.controls.primary,
                self.controls.secondary,
                self.controls.exit,
                self.controls.entry
            );
        }
        // SAFETY: reading a guest field of the current VMCS (or failing harmlessly).
        let rip = unsafe { instr::vmread(FieldNat::GuestRip) }.unwrap_or(0);
        Exit {
            kind: ExitKind::EntryFailed { reason: fail.text(), code: fail.code() },
            rip,
            next_rip: rip,
            raw: RAW_ENTRY_INSTRUCTION_FAILED,
            tsc,
            events: Default::default(),
        }
    }
}

impl Backend for VmxVcpu {
    fn load_state(&mut self, s: &CpuState) {
        // Power-up and INIT clear CR2 (SDM Vol. 3A Table 10-1); loaded at the slice start.
        self.cr2 = 0;
        self.write(FieldNat::GuestCr0, self.fixed.cr0_real(s.cr0));
        self.write(FieldNat::Cr0ReadShadow, s.cr0);
        self.write(FieldNat::GuestCr4, self.fixed.cr4_real(s.cr4));
        self.write(FieldNat::Cr4ReadShadow, s.cr4);
        self.write(FieldNat::GuestCr3, s.cr3);
        self.write(FieldNat::GuestDr7, s.dr7);
        self.write(FieldNat::GuestRsp, s.rsp);
        self.rsp_cache = s.rsp;
        self.write(FieldNat::GuestRip, s.rip);
        self.write(FieldNat::GuestRflags, s.rflags);
        for (seg, st) in [
            (SegReg::Es, &s.es),
            (SegReg::Cs, &s.cs),
            (SegReg::Ss, &s.ss),
            (SegReg::Ds, &s.ds),
            (SegReg::Fs, &s.fs),
            (SegReg::Gs, &s.gs),
            (SegReg::Tr, &s.tr),
            (SegReg::Ldtr, &s.ldtr),
        ] {
            self.write_segment(seg, st);
        }
        self.write(FieldNat::GuestGdtrBase, s.gdtr.base);
        self.write(Field32::GuestGdtrLimit, s.gdtr.limit as u32);
        self.write(FieldNat::GuestIdtrBase, s.idtr.base);
        self.write(Field32::GuestIdtrLimit, s.idtr.limit as u32);
        self.set_guest_efer(s.efer);
        self.write(Field64::GuestIa32Pat, s.pat);
        self.write(Field64::GuestIa32Debugctl, 0);
        self.write(Field32::GuestIa32SysenterCs, 0);
        self.write(FieldNat::GuestIa32SysenterEsp, 0);
        self.write(FieldNat::GuestIa32SysenterEip, 0);
        self.write(Field32::GuestInterruptibilityState, 0);
        self.write(Field32::GuestActivityState, 0);
        self.write(FieldNat::GuestPendingDebugExceptions, 0);
        self.write(Field32::VmEntryInterruptionInfo, 0);
        self.pending_event = false;
        if cr::pae_paging(s.cr0, s.cr4, s.efer) {
            if let Err(GpFault(why)) = self.load_pdptes(s.cr3) {
                log::warn!("vmx: initial PAE PDPTEs not loaded: {why}");
            }
        }
    }

    fn run(&mut self, regs: &mut GuestRegs) -> Exit {
        if let Err(e) = self.make_current() {
            return Exit {
                kind: ExitKind::EntryFailed { reason: e.text(), code: e.code() },
                rip: 0,
                next_rip: 0,
                raw: RAW_ENTRY_INSTRUCTION_FAILED,
                tsc: instr::rdtsc(),
                events: Default::default(),
            };
        }
        if regs.rsp != self.rsp_cache {
            self.write(FieldNat::GuestRsp, regs.rsp);
        }
        self.arm_preemption_timer();
        let injected = Backend::pending_event(self);
        // SAFETY: VMX root operation with this vCPU's fully set-up VMCS current (above);
        // HOST_RIP is the trampoline's exit and the host state is this CPU's (`build` ran
        // here and Vireo does not change its GDT, TSS, CR3 or segment bases afterwards);
        // `launched` tracks the VMCS launch state.
        let entered = unsafe { run::enter(regs, self.launched) };
        let tsc = instr::rdtsc();
        if entered != Entered::Exited {
            return self.entry_instruction_failed(entered, tsc);
        }
        self.complete_exit(regs, tsc, injected)
    }

    fn run_fast(&mut self, regs: &mut GuestRegs, fast: &mut impl FastExits) -> Exit {
        let mut exit = self.run(regs);
        // Only a VMCALL with nothing else to report (no event delivered, none interrupted,
        // none queued) is offered; `run` left this VMCS current and launched.
        // (`matches!`: the derived `!=` on ExitKind is a call on every exit.)
        if !matches!(exit.kind, ExitKind::Hypercall(HypercallInsn::Vmcall))
            || self.pending_event
            || exit.events != ExitEvents::default()
        {
            return exit;
        }
        // Where exits do not save the VMX-preemption timer, every entry counts from the
        // value in the VMCS again: each re-entry re-arms it for the deadline, as `run` does
        // (where they save it, the count for this deadline goes on by itself).
        let rearm = match self.preemption_rate {
            Some(rate) if self.controls.exit & controls::exit::SAVE_PREEMPTION_TIMER == 0 => {
                self.deadline.map(|d| (d, rate))
            }
            _ => None,
        };
        while fast.hypercall(regs, HypercallInsn::Vmcall, || self.cpl_cur(), exit.tsc) {
            self.write_cur(FieldNat::GuestRip, exit.next_rip);
            self.end_interrupt_shadow_cur();
            if let Some((deadline, rate)) = rearm {
                let ticks = deadline.saturating_sub(instr::rdtsc()) >> rate;
                self.write_cur(Field32::VmxPreemptionTimerValue, ticks.min(u32::MAX as u64) as u32);
            }
            // SAFETY: as in `run`, whose entry just exited with this VMCS current and launched.
            let entered = unsafe { run::enter(regs, true) };
            let tsc = instr::rdtsc();
            if entered != Entered::Exited {
                return self.entry_instruction_failed(entered, tsc);
            }
            // Only the exit reason, and for another VMCALL RIP and the instruction length.
            let reason = self.read_cur(Field32::ExitReason);
            if reason != u32::from(reason::VMCALL) {
                return self.complete_exit(regs, tsc, None);
            }
            exit.rip = self.read_cur(FieldNat::GuestRip);
            exit.next_rip = exit.rip.wrapping_add(self.read_cur(Field32::VmExitInstructionLength) as u64);
            exit.tsc = tsc;
        }
        // This VMCALL goes to the core. GUEST_RSP may have moved meanwhile.
        regs.rsp = self.read_cur(FieldNat::GuestRsp);
        self.rsp_cache = regs.rsp;
        exit
    }

    #[inline]
    fn rip(&self) -> u64 {
        self.read(FieldNat::GuestRip)
    }

    /// Also ends an STI/MOV SS interrupt shadow: the core moves RIP past an instruction it
    /// emulated, which completes that instruction (as KVM's skip_emulated_instruction).
    #[inline]
    fn set_rip(&mut self, rip: u64) {
        self.write(FieldNat::GuestRip, rip);
        self.end_interrupt_shadow();
    }

    fn rflags(&self) -> u64 {
        self.read(FieldNat::GuestRflags)
    }

    fn set_rflags(&mut self, rflags: u64) {
        self.write(FieldNat::GuestRflags, rflags);
    }

    fn cr0(&self) -> u64 {
        cr::guest_view(self.read(FieldNat::GuestCr0), self.read(FieldNat::Cr0ReadShadow), self.fixed.cr0_mask())
    }

    fn cr3(&self) -> u64 {
        self.read(FieldNat::GuestCr3)
    }

    fn cr4(&self) -> u64 {
        cr::guest_view(self.read(FieldNat::GuestCr4), self.read(FieldNat::Cr4ReadShadow), self.fixed.cr4_mask())
    }

    fn efer(&self) -> u64 {
        self.read(Field64::GuestIa32Efer)
    }

    fn set_efer(&mut self, efer: u64) {
        self.set_guest_efer(efer);
    }

    #[inline]
    fn long_mode(&self) -> bool {
        // CS access rights bit 13 is L (SDM Vol. 3C §25.4.1); L=1 implies IA-32e mode.
        self.read(Field32::GuestCsAccessRights) & (1 << 13) != 0
            && self.read(Field64::GuestIa32Efer) & crate::vmm::state::EFER_LMA != 0
    }

    #[inline]
    fn cpl(&self) -> u8 {
        SegAttr::from_vmx(self.read(Field32::GuestSsAccessRights)).dpl()
    }

    fn segment(&self, seg: SegReg) -> Segment {
        let f = segment_fields(seg);
        let ar = self.read(f.access_rights);
        Segment {
            selector: self.read(f.selector),
            base: self.read(f.base),
            limit: self.read(f.limit),
            attr: SegAttr::from_vmx(ar),
            unusable: ar & (1 << 16) != 0,
        }
    }

    fn inject(&mut self, event: Event) {
        let protected = self.read(FieldNat::GuestCr0) & CR0_PE != 0;
        let (info, error) = entry_interruption(event, protected);
        if let Some(code) = error {
            self.write(Field32::VmEntryExceptionErrorCode, code);
        }
        self.write(Field32::VmEntryInterruptionInfo, info);
        self.pending_event = true;
    }

    #[inline]
    fn pending_event(&self) -> Option<Event> {
        if !self.pending_event {
            return None;
        }
        let info = self.read(Field32::VmEntryInterruptionInfo);
        Event::decode(info, self.read(Field32::VmEntryExceptionErrorCode))
    }

    fn pat(&self) -> u64 {
        self.read(Field64::GuestIa32Pat)
    }

    fn set_pat(&mut self, pat: u64) {
        self.write(Field64::GuestIa32Pat, pat);
    }

    #[inline]
    fn event_pending(&self) -> bool {
        self.pending_event
    }

    fn interruptible(&self) -> bool {
        self.rflags() & RFLAGS_IF != 0 && self.interruptibility() & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) == 0
    }

    fn interrupt_shadow(&self) -> bool {
        self.interruptibility() & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) != 0
    }

    fn set_interrupt_window(&mut self, enable: bool) {
        if enable && !self.controls.window_allowed {
            log::warn!("vmx: the CPU does not allow interrupt-window exiting");
            return;
        }
        let bit = primary::INTERRUPT_WINDOW_EXITING;
        let new = if enable { self.controls.primary | bit } else { self.controls.primary & !bit };
        if new != self.controls.primary {
            self.controls.primary = new;
            self.write(Field32::PrimaryProcBasedControls, new);
        }
    }

    fn set_deadline(&mut self, tsc: Option<u64>) {
        self.deadline = tsc;
    }

    fn cr2(&self) -> u64 {
        // During a slice the guest's CR2 is the register's (Vireo takes no #PF of its own).
        instr::read_cr2()
    }

    fn set_cr2(&mut self, cr2: u64) {
        // Called during a slice: the guest's CR2 is the register's until `slice_end`.
        self.cr2 = cr2;
        instr::write_cr2(cr2);
    }

    fn slice_start(&mut self) {
        instr::write_cr2(self.cr2);
    }

    fn slice_end(&mut self) {
        self.cr2 = instr::read_cr2();
    }

    fn set_exception_intercepts(&mut self, vectors: u32) {
        self.write(Field32::ExceptionBitmap, vectors);
    }

    fn flush_guest_tlb(&mut self) {
        self.flush_vpid();
    }

    /// The guest's IA32_PERF_GLOBAL_CTRL loaded on VM entry, the host's on VM exit (SDM
    /// Vol. 3C §25.8.1 entry control bit 13, §25.7.1 exit control bit 12; fields 2808H and
    /// 2C04H). The core asks only where `VmxCaps::perf_global_ctrl` allows both.
    fn set_perf_global_ctrl(&mut self, switch: Option<crate::pmu::hw::GlobalCtrlSwitch>) {
        if let Some(s) = switch {
            self.write(Field64::GuestIa32PerfGlobalCtrl, s.guest);
            self.write(Field64::HostIa32PerfGlobalCtrl, s.host);
        }
        self.set_entry_control(entry::LOAD_PERF_GLOBAL_CTRL, switch.is_some());
        self.set_exit_control(controls::exit::LOAD_PERF_GLOBAL_CTRL, switch.is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::exit::{VECTOR_DF, VECTOR_PF, VECTOR_UD};
    use crate::vmx::check::{check, GuestSnapshot, SegFields};
    use crate::vmx::controls::secondary;

    #[test]
    fn injection_encoding() {
        // #PF with error code, protected mode.
        let (info, err) = entry_interruption(Event::Exception { vector: VECTOR_PF, error_code: Some(2) }, true);
        assert_eq!(info, 0x8000_0B0E);
        assert_eq!(err, Some(2));
        // #UD: no error code even if one is given.
        let (info, err) = entry_interruption(Event::Exception { vector: VECTOR_UD, error_code: Some(9) }, true);
        assert_eq!(info, 0x8000_0306);
        assert_eq!(err, None);
        // #DF in real mode (unrestricted guest): no error code may be delivered.
        let (info, err) = entry_interruption(Event::Exception { vector: VECTOR_DF, error_code: Some(0) }, false);
        assert_eq!(info, 0x8000_0308);
        assert_eq!(err, None);
        // #GP without a code from the core still delivers one in protected mode.
        assert_eq!(entry_interruption(Event::Exception { vector: 13, error_code: None }, true), (0x8000_0B0D, Some(0)));
        assert_eq!(entry_interruption(Event::Interrupt { vector: 0x30 }, true), (0x8000_0030, None));
        assert_eq!(entry_interruption(Event::Nmi, true), (0x8000_0202, None));
    }

    #[test]
    fn tss_descriptor_base() {
        // Base 0x1122_3344_5566_7788 spread over the 16-byte descriptor.
        let base: u64 = 0x1122_3344_5566_7788;
        let low = 0x67 | ((base & 0xFF_FFFF) << 16) | (0x89u64 << 40) | (((base >> 24) & 0xFF) << 56);
        let high = base >> 32;
        assert_eq!(system_descriptor_base(low, high), base);
    }

    /// The entry-check snapshot of `s` under Bochs's fixed bits with unrestricted guest.
    fn snapshot_of(s: &CpuState, fixed: &CrFixed) -> GuestSnapshot {
        let seg = |g: &Segment| SegFields {
            selector: g.selector,
            base: g.base,
            limit: g.limit,
            ar: g.attr.to_vmx(g.unusable),
        };
        GuestSnapshot {
            cr0: fixed.cr0_real(s.cr0),
            cr4: fixed.cr4_real(s.cr4),
            dr7: s.dr7,
            efer: s.efer,
            pat: s.pat,
            rflags: s.rflags,
            rip: s.rip,
            segs: [seg(&s.es), seg(&s.cs), seg(&s.ss), seg(&s.ds), seg(&s.fs), seg(&s.gs), seg(&s.ldtr), seg(&s.tr)],
            gdtr_base: s.gdtr.base,
            gdtr_limit: s.gdtr.limit as u32,
            idtr_base: s.idtr.base,
            idtr_limit: s.idtr.limit as u32,
            link_pointer: !0,
            entry_controls: entry::LOAD_EFER | entry::LOAD_PAT,
            secondary_controls: secondary::ENABLE_EPT | secondary::UNRESTRICTED_GUEST,
            ..GuestSnapshot::default()
        }
    }

    #[test]
    fn multiboot_protected_mode_state_passes_entry_checks() {
        let fixed = bochs_fixed();
        let gdt = crate::vmm::state::DescriptorTable { base: 0x2080, limit: 39 };
        let s = CpuState::protected_mode_flat(0x10_0000, 0x2000, gdt);
        assert_eq!(check(&snapshot_of(&s, &fixed), &fixed), None);
    }

    /// Bochs's fixed CR0/CR4 bits (corei7_skylake_x) with unrestricted guest.
    fn bochs_fixed() -> CrFixed {
        CrFixed {
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xFFFF_FFFF,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x3767FF,
            unrestricted: true,
        }
    }

    #[test]
    fn reset_state_passes_entry_checks() {
        let fixed = bochs_fixed();
        let s = reset_state();
        let snap = snapshot_of(&s, &fixed);
        assert_eq!(check(&snap, &fixed), None);
        // The guest sees CD/NW/ET as RESET leaves them, the real CR0 keeps caches on.
        assert_eq!(cr::guest_view(snap.cr0, s.cr0, fixed.cr0_mask()), 0x6000_0010);
        assert_eq!(snap.cr0, 0x30);
    }
}
