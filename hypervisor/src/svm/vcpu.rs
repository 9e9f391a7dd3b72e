//! Per-CPU SVM enablement and the SVM virtual CPU ([`SvmVcpu`], a [`Backend`]).

use super::{
    bitmap::{self, IOPM_SIZE, MSRPM_SIZE},
    check,
    decode::{self, code, RawExit},
    event, run,
    vmcb::{clean, tlb_control, vintr, InterceptMisc1, InterceptMisc2, Vmcb, VmcbSegment, INTERRUPT_SHADOW, NP_ENABLE},
};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::{
    arch::{cpu::SvmCaps, msr, percpu},
    mm::{FrameAllocator, PAGE_SIZE},
    vmm::{
        backend::{Backend, BackendError},
        exit::{Event, Exit, ExitEvents, ExitKind, HypercallInsn},
        fast::FastExits,
        regs::GuestRegs,
        state::{
            CpuState, DescriptorTable, SegAttr, SegReg, Segment, CR0_PE, CR0_PG, EFER_LMA, EFER_LME, EFER_SVME,
            RFLAGS_IF, RFLAGS_RESERVED_1,
        },
    },
};

/// VM_HSAVE_PA: where VMRUN saves the host state #VMEXIT restores (APM Vol. 2 §15.30.4).
pub const MSR_VM_HSAVE_PA: u32 = 0xC001_0117;

/// PAUSEs before a PAUSE intercept when the CPU filters them (KVM uses 3000).
pub const PAUSE_FILTER_COUNT: u16 = 3000;

/// DR6 at reset (APM Vol. 2 §13.1.1.3).
const DR6_INIT: u64 = 0xFFFF_0FF0;
/// RFLAGS.VM (virtual-8086 mode).
const RFLAGS_VM: u64 = 1 << 17;
/// Vector V_INTR_VECTOR names while an interrupt window is requested. It is never
/// delivered: the VINTR intercept exits first.
const WINDOW_VECTOR: u64 = 0x20;

// This CPU's VM_HSAVE_PA page and VMSAVE/VMLOAD host-state page live in its per-CPU block
// (`arch::percpu::PerCpu::svm_hsave`/`svm_host_save`; 0 = SVM not enabled on this CPU):
// VM_HSAVE_PA is a per-CPU MSR (APM Vol. 2 §15.30.4) and each CPU VMSAVEs its own host state.

/// Host tests: pretend `enable` ran (the simulated world switch never touches the page).
#[cfg(test)]
pub(super) fn test_set_host_save(pa: u64) {
    let cpu = percpu::current();
    cpu.set_svm_pages(cpu.svm_hsave(), pa);
}

fn check_caps(caps: &SvmCaps) -> Result<(), BackendError> {
    if caps.disabled_by_firmware {
        return Err(BackendError(
            "SVM is disabled by the firmware (VM_CR.SVMDIS=1): enable SVM/AMD-V in the firmware setup",
        ));
    }
    if !caps.npt {
        return Err(BackendError("the CPU has SVM without nested paging (NPT), which Vireo requires"));
    }
    Ok(())
}

/// Allocates `size` bytes of 4 KiB-aligned frames and zeroes them.
fn alloc_zeroed(frames: &mut FrameAllocator, size: usize, what: &'static str) -> Result<u64, BackendError> {
    let pa = frames.alloc(size as u64, PAGE_SIZE).map_err(|_| BackendError(what))?;
    // SAFETY: the allocator just handed out [pa, pa + size) for Vireo's exclusive use, and
    // Vireo runs identity-mapped (virtual = physical), so the range is writable memory no
    // one else references.
    unsafe { core::ptr::write_bytes(pa as *mut u8, 0, size) };
    Ok(pa)
}

fn free(frames: &mut FrameAllocator, pa: u64, size: usize) {
    if let Err(e) = frames.free(pa, size as u64) {
        log::warn!("svm: freeing {size:#x} bytes at {pa:#x}: {e}");
    }
}

/// Enables SVM on this CPU (APM Vol. 2 §15.4): checks the capabilities, sets EFER.SVME,
/// allocates and programs VM_HSAVE_PA, and allocates the page VMSAVE/VMLOAD keep the
/// host's FS/GS/TR/LDTR and syscall MSRs in across guest runs. Calling it again is
/// harmless: the pages are allocated once, EFER and VM_HSAVE_PA are re-checked.
pub fn enable(frames: &mut FrameAllocator, caps: &SvmCaps) -> Result<(), BackendError> {
    check_caps(caps)?;
    let cpu = percpu::current();
    let mut hsave = cpu.svm_hsave();
    if hsave == 0 || cpu.svm_host_save() == 0 {
        hsave = alloc_zeroed(frames, PAGE_SIZE as usize, "out of memory for the SVM host-save area (VM_HSAVE_PA)")?;
        let host = match alloc_zeroed(frames, PAGE_SIZE as usize, "out of memory for the SVM host-state page") {
            Ok(p) => p,
            Err(e) => {
                free(frames, hsave, PAGE_SIZE as usize);
                return Err(e);
            }
        };
        cpu.set_svm_pages(hsave, host);
    }
    // SAFETY: the CPU has SVM and the firmware has not disabled it (checked above, from
    // CPUID and VM_CR), so setting EFER.SVME does not fault; it changes nothing else about
    // the running host. VM_HSAVE_PA exists on every SVM CPU and gets a 4 KiB-aligned page
    // reserved for it above.
    unsafe {
        let efer = msr::read(msr::IA32_EFER);
        if efer & EFER_SVME == 0 {
            msr::write(msr::IA32_EFER, efer | EFER_SVME);
        }
        if msr::read(MSR_VM_HSAVE_PA) != hsave {
            msr::write(MSR_VM_HSAVE_PA, hsave);
        }
    }
    Ok(())
}

/// The guest state VMRUN checks (and the interrupt state), kept from before an entry that
/// could be refused: a CPU or emulator may write host values into the VMCB when it refuses
/// it (QEMU TCG saves its current, i.e. host, state and clears V_INTR and EVENTINJ). Only
/// an entry after Vireo changed checked state needs one (see `SvmVcpu::entry_snapshot`).
#[derive(Clone, Copy)]
struct EntrySnapshot {
    efer: u64,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    dr6: u64,
    dr7: u64,
    rflags: u64,
    rip: u64,
    s_cet: u64,
    g_pat: u64,
    cs: VmcbSegment,
    cpl: u8,
    eventinj: u64,
    v_intr: u64,
    interrupt_shadow: u64,
}

/// One virtual CPU on AMD SVM: its VMCB, I/O and MSR permission maps.
#[derive(Debug)]
pub struct SvmVcpu {
    vmcb_pa: u64,
    iopm_pa: u64,
    msrpm_pa: u64,
    caps: SvmCaps,
    /// TLB_CONTROL for the next VMRUN.
    tlb_next: u8,
    /// The EVENTINJ value Vireo queued for the next entry (0 = none), to tell its own
    /// injections from events the guest raised when EXITINTINFO reports them.
    injected: u64,
    /// VMCB areas ([`clean`]) written since the last VMRUN: their clean bits stay clear.
    dirty: u32,
    /// RFLAGS written since the last #VMEXIT (a field no clean bit covers that VMRUN's
    /// consistency checks read; EVENTINJ is tracked by `injected`).
    rflags_written: bool,
    /// The host CPU of the last VMRUN (`usize::MAX`: none yet).
    last_cpu: usize,
    /// The nested page tables' root, as written into N_CR3 (checked before every VMRUN).
    npt_root: u64,
}

/// Per host CPU: the VMCB of its last VMRUN (a CPU's cached VMCB state is another VMCB's
/// once that one ran there).
#[cfg(not(test))]
static LAST_VMCB: [AtomicU64; percpu::MAX_CPUS] = [const { AtomicU64::new(0) }; percpu::MAX_CPUS];

#[cfg(not(test))]
fn last_vmcb(cpu: usize) -> &'static AtomicU64 {
    &LAST_VMCB[cpu % percpu::MAX_CPUS]
}

/// Host tests: every test thread is a CPU of its own (they all share percpu index 0).
#[cfg(test)]
fn last_vmcb(_cpu: usize) -> &'static AtomicU64 {
    std::thread_local! {
        static SLOT: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    }
    SLOT.with(|s| *s)
}

fn to_vmcb(seg: &Segment) -> VmcbSegment {
    VmcbSegment { selector: seg.selector, attrib: seg.attr.0 & 0xFFF, limit: seg.limit, base: seg.base }
}

fn table(t: &DescriptorTable) -> VmcbSegment {
    VmcbSegment { selector: 0, attrib: 0, limit: t.limit as u32, base: t.base }
}

/// Intercept vector 3: physical interrupts, NMIs and INIT, CPUID, RDPMC (the guest's
/// counters are the virtual PMU's, never the host's), HLT, port I/O and MSRs through the
/// maps, INVLPGA (an SVM instruction), shutdown (APM Vol. 2 §15.9-§15.13).
pub fn base_intercepts_misc1() -> InterceptMisc1 {
    InterceptMisc1::INTR
        | InterceptMisc1::NMI
        | InterceptMisc1::INIT
        | InterceptMisc1::CPUID
        | InterceptMisc1::RDPMC
        | InterceptMisc1::HLT
        | InterceptMisc1::INVLPGA
        | InterceptMisc1::IOIO_PROT
        | InterceptMisc1::MSR_PROT
        | InterceptMisc1::SHUTDOWN
}

/// Intercept vector 4: VMRUN (mandatory, §15.5.1) and every other SVM instruction (Vireo
/// hides SVM from guests), VMMCALL (hypercalls), XSETBV, and RDPRU where the CPU has it.
pub fn base_intercepts_misc2(rdpru: bool) -> InterceptMisc2 {
    let mut m = InterceptMisc2::VMRUN
        | InterceptMisc2::VMMCALL
        | InterceptMisc2::VMLOAD
        | InterceptMisc2::VMSAVE
        | InterceptMisc2::STGI
        | InterceptMisc2::CLGI
        | InterceptMisc2::SKINIT
        | InterceptMisc2::XSETBV;
    if rdpru {
        m |= InterceptMisc2::RDPRU;
    }
    m
}

/// RDPRU exists (CPUID Fn8000_0008 EBX bit 4): its intercept bit is only defined then.
fn cpu_has_rdpru() -> bool {
    raw_cpuid::CpuId::new().get_processor_capacity_feature_info().is_some_and(|c| c.has_rdpru())
}

impl SvmVcpu {
    /// Builds a vCPU: a VMCB (4 KiB), an IOPM intercepting every port (12 KiB) and an
    /// MSRPM intercepting every MSR but [`bitmap::PASS_THROUGH_MSRS`] (8 KiB). The guest
    /// runs on the nested page tables at `npt_root` with address-space ID `asid` (1 to
    /// `caps.asids - 1`, unique among live vCPUs on a CPU). The VMCB starts in the
    /// architectural reset state; [`Backend::load_state`] replaces it.
    pub fn new(frames: &mut FrameAllocator, npt_root: u64, asid: u32, caps: &SvmCaps) -> Result<SvmVcpu, BackendError> {
        check_caps(caps)?;
        if asid == 0 {
            return Err(BackendError("SVM ASID 0 belongs to the host"));
        }
        if caps.asids != 0 && asid >= caps.asids {
            return Err(BackendError("SVM ASID beyond the CPU's number of ASIDs (CPUID Fn8000_000A EBX)"));
        }
        if npt_root == 0 || npt_root & 0xFFF != 0 {
            return Err(BackendError("nested page table root must be a non-zero, 4 KiB-aligned address"));
        }
        let vmcb_pa = alloc_zeroed(frames, PAGE_SIZE as usize, "out of memory for a VMCB")?;
        let iopm_pa = match alloc_zeroed(frames, IOPM_SIZE, "out of memory for an SVM I/O permission map") {
            Ok(p) => p,
            Err(e) => {
                free(frames, vmcb_pa, PAGE_SIZE as usize);
                return Err(e);
            }
        };
        let msrpm_pa = match alloc_zeroed(frames, MSRPM_SIZE, "out of memory for an SVM MSR permission map") {
            Ok(p) => p,
            Err(e) => {
                free(frames, vmcb_pa, PAGE_SIZE as usize);
                free(frames, iopm_pa, IOPM_SIZE);
                return Err(e);
            }
        };
        // SAFETY: both maps were just allocated with exactly these sizes for this vCPU
        // alone, and Vireo runs identity-mapped.
        unsafe {
            bitmap::fill_iopm(&mut *(iopm_pa as *mut [u8; IOPM_SIZE]));
            bitmap::fill_msrpm(&mut *(msrpm_pa as *mut [u8; MSRPM_SIZE]));
        }
        let mut vcpu = SvmVcpu {
            vmcb_pa,
            iopm_pa,
            msrpm_pa,
            caps: *caps,
            tlb_next: tlb_control::FLUSH_ALL,
            injected: 0,
            dirty: clean::ALL,
            rflags_written: true,
            last_cpu: usize::MAX,
            npt_root,
        };
        let rdpru = cpu_has_rdpru();
        let v = vcpu.vmcb_mut();
        let c = &mut v.control;
        c.intercept_misc1 = base_intercepts_misc1().bits();
        if caps.pause_filter {
            // Pause-loop exiting (APM Vol. 2 §15.14.4 "Pause Intercept Filtering"): a vCPU
            // spinning on a lock exits after PAUSE_FILTER_COUNT PAUSEs, so the core can give
            // the host CPU to another vCPU (perhaps the lock holder).
            c.intercept_misc1 |= InterceptMisc1::PAUSE.bits();
            c.pause_filter_count = PAUSE_FILTER_COUNT;
        }
        c.intercept_misc2 = base_intercepts_misc2(rdpru).bits();
        c.iopm_base_pa = iopm_pa;
        c.msrpm_base_pa = msrpm_pa;
        c.guest_asid = asid;
        c.tlb_control = tlb_control::FLUSH_ALL;
        c.v_intr = vintr::V_INTR_MASKING;
        c.np_enable = NP_ENABLE;
        c.n_cr3 = npt_root;
        vcpu.load_reset_state();
        Ok(vcpu)
    }

    /// Frees the VMCB and the permission maps. The vCPU must not be running.
    pub fn release(self, frames: &mut FrameAllocator) {
        free(frames, self.vmcb_pa, PAGE_SIZE as usize);
        free(frames, self.iopm_pa, IOPM_SIZE);
        free(frames, self.msrpm_pa, MSRPM_SIZE);
    }

    /// The VMCB's physical address.
    pub fn vmcb_pa(&self) -> u64 {
        self.vmcb_pa
    }

    pub fn vmcb(&self) -> &Vmcb {
        // SAFETY: `vmcb_pa` is a 4 KiB page allocated in `new` for this vCPU alone, alive
        // until `release` consumes it, identity-mapped, 4 KiB aligned (Vmcb's alignment);
        // every bit pattern is a valid Vmcb. The CPU writes it only inside `run`, which
        // holds `&mut self`.
        unsafe { &*(self.vmcb_pa as *const Vmcb) }
    }

    /// The VMCB to change anything in: every area counts as changed (no clean bit at
    /// the next entry). The backend's own hot paths use [`Self::vmcb_areas`].
    pub fn vmcb_mut(&mut self) -> &mut Vmcb {
        self.vmcb_areas(clean::ALL)
    }

    /// The VMCB to change fields of `areas` ([`clean`]) in, and of no other cached area
    /// (0: only fields no clean bit covers, such as RIP, RSP, RAX, RFLAGS, EVENTINJ,
    /// TLB_CONTROL and the interrupt shadow).
    fn vmcb_areas(&mut self, areas: u32) -> &mut Vmcb {
        self.dirty |= areas;
        // SAFETY: as in `vmcb`; `&mut self` makes this the only reference.
        unsafe { &mut *(self.vmcb_pa as *mut Vmcb) }
    }

    /// VMCB areas written since the last VMRUN.
    pub fn dirty_areas(&self) -> u32 {
        self.dirty
    }

    /// EXITINFO1 and EXITINFO2 of the last exit (e.g. the faulting address of an
    /// intercepted #PF is EXITINFO2, APM Vol. 2 §15.12.15).
    pub fn exit_info(&self) -> (u64, u64) {
        (self.vmcb().control.exitinfo1, self.vmcb().control.exitinfo2)
    }

    /// The guest's PAT (G_PAT with nested paging, APM Vol. 2 §15.25.8). Guest RDMSR/WRMSR
    /// of IA32_PAT (0x277) exit; the core answers them with these.
    pub fn pat(&self) -> u64 {
        self.vmcb().save.g_pat
    }

    pub fn set_pat(&mut self, pat: u64) {
        self.vmcb_areas(clean::NP).save.g_pat = pat;
    }

    pub fn cr2(&self) -> u64 {
        self.vmcb().save.cr2
    }

    pub fn set_cr2(&mut self, cr2: u64) {
        self.vmcb_areas(clean::CR2).save.cr2 = cr2;
    }

    /// Flushes this guest's TLB entries at the next entry (after the core changed the
    /// nested page tables): by ASID where the CPU can, else the whole TLB.
    pub fn flush_tlb(&mut self) {
        if self.tlb_next != tlb_control::FLUSH_ALL {
            self.tlb_next = if self.caps.flush_by_asid { tlb_control::FLUSH_ASID } else { tlb_control::FLUSH_ALL };
        }
    }

    /// The architectural power-on state (APM Vol. 2 §14.1.3): real mode at F000:FFF0.
    fn load_reset_state(&mut self) {
        self.load_state(&CpuState::reset());
    }

    /// VMCB_CLEAN for the entry about to happen on this CPU; from now on the VMCB counts as
    /// last run here, with nothing changed since.
    fn clean_for_entry(&mut self, cpu: usize) -> u32 {
        let last = last_vmcb(cpu);
        let same_place = self.last_cpu == cpu && last.load(Ordering::Relaxed) == self.vmcb_pa;
        let bits = clean::for_entry(self.caps.vmcb_clean, same_place, self.dirty);
        last.store(self.vmcb_pa, Ordering::Relaxed);
        self.last_cpu = cpu;
        self.dirty = 0;
        bits
    }

    /// The snapshot for the entry about to happen, or `None` where the entry cannot be
    /// refused for the guest state: since the last #VMEXIT (which saved a state the CPU
    /// itself ran, APM Vol. 2 §15.6) Vireo changed no field VMRUN's consistency checks read
    /// (§15.5.1: EFER, CR0, CR3, CR4, DR6, DR7, the segments, EVENTINJ, the controls), only
    /// RIP, RAX, RSP and the interrupt shadow, as after a cheap exit. To be called before
    /// `clean_for_entry`, which forgets what was written.
    fn entry_snapshot(&self) -> Option<EntrySnapshot> {
        (self.dirty != 0 || self.rflags_written || self.injected != 0).then(|| self.snapshot())
    }

    /// Host tests: whether the next entry keeps a snapshot.
    #[cfg(test)]
    pub(super) fn keeps_entry_snapshot(&self) -> bool {
        self.entry_snapshot().is_some()
    }

    fn snapshot(&self) -> EntrySnapshot {
        let v = self.vmcb();
        let s = &v.save;
        EntrySnapshot {
            efer: s.efer,
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            dr6: s.dr6,
            dr7: s.dr7,
            rflags: s.rflags,
            rip: s.rip,
            s_cet: s.s_cet,
            g_pat: s.g_pat,
            cs: s.cs,
            cpl: s.cpl,
            eventinj: v.control.eventinj,
            v_intr: v.control.v_intr,
            interrupt_shadow: v.control.interrupt_shadow,
        }
    }

    /// A refused VMRUN (EXITCODE VMEXIT_INVALID): nothing ran, the queued event and TLB
    /// flush still stand. Puts back the guest state a CPU may have overwritten, then names
    /// the check that failed.
    #[cold]
    fn entry_refused(
        &mut self,
        regs: &GuestRegs,
        entry: Option<&EntrySnapshot>,
        entry_rip: u64,
        injected: u64,
        tsc: u64,
    ) -> Exit {
        self.injected = injected;
        self.rflags_written = true;
        let reason = match entry {
            Some(e) => {
                self.restore(e, regs);
                check::explain_invalid(self.vmcb())
            }
            None => {
                // Only RIP, RAX, RSP and the shadow changed since a #VMEXIT saved this
                // state: no guest-state check can fail, and the VMCB may now hold what the
                // CPU wrote over it, so it explains nothing (and no cached area is trusted).
                self.vmcb_mut().save.rip = entry_rip;
                "VMRUN refused the state of the last #VMEXIT with only RIP, RAX and RSP changed (not a guest-state check)"
            }
        };
        Exit {
            kind: ExitKind::EntryFailed { reason, code: code::INVALID },
            rip: entry_rip,
            next_rip: entry_rip,
            raw: code::INVALID,
            tsc,
            events: Default::default(),
        }
    }

    fn restore(&mut self, e: &EntrySnapshot, regs: &GuestRegs) {
        let v = self.vmcb_mut();
        let s = &mut v.save;
        s.efer = e.efer;
        s.cr0 = e.cr0;
        s.cr3 = e.cr3;
        s.cr4 = e.cr4;
        s.dr6 = e.dr6;
        s.dr7 = e.dr7;
        s.rflags = e.rflags;
        s.rip = e.rip;
        s.s_cet = e.s_cet;
        s.g_pat = e.g_pat;
        s.cs = e.cs;
        s.cpl = e.cpl;
        s.rax = regs.rax;
        s.rsp = regs.rsp;
        v.control.eventinj = e.eventinj;
        v.control.v_intr = e.v_intr;
        v.control.interrupt_shadow = e.interrupt_shadow;
    }

    /// Everything after a VMRUN that returned (`tsc`: when): restores and explains a
    /// refused entry, decodes an exit, re-queues an interrupted event. `entry`: the guest
    /// state before the VMRUN, where it was kept (`entry_snapshot`); `entry_rip`: its RIP.
    #[inline]
    fn complete_exit(&mut self, regs: &mut GuestRegs, entry: Option<&EntrySnapshot>, entry_rip: u64, tsc: u64) -> Exit {
        let injected = core::mem::replace(&mut self.injected, 0);
        self.rflags_written = false;
        let nrip = self.caps.nrip;
        let v = self.vmcb_areas(0);
        let exitcode = decode::normalize(v.control.exitcode);
        // The cheap instruction intercepts (IN/OUT among them): an instruction ran, so an
        // event injected at the entry was delivered, and no delivery was under way
        // (EXITINTINFO, APM Vol. 2 §15.7.2, is checked all the same).
        let rip = v.save.rip;
        let cheap = decode::cheap_exit(
            exitcode,
            v.control.exitinfo1,
            v.control.exitinfo2,
            rip,
            nrip.then_some(v.control.next_rip),
        );
        if let Some((kind, next_rip)) = cheap {
            if !event::is_valid(v.control.exitintinfo) {
                regs.rax = v.save.rax;
                regs.rsp = v.save.rsp;
                v.control.eventinj = 0;
                self.tlb_next = tlb_control::DO_NOTHING;
                let events =
                    ExitEvents { injected: Event::decode(injected as u32, (injected >> 32) as u32), interrupted: None };
                return Exit { kind, rip, next_rip, raw: exitcode, tsc, events };
            }
        }
        if exitcode == code::INVALID {
            return self.entry_refused(regs, entry, entry_rip, injected, tsc);
        }
        regs.rax = v.save.rax;
        regs.rsp = v.save.rsp;
        let raw = RawExit {
            code: exitcode,
            info1: v.control.exitinfo1,
            info2: v.control.exitinfo2,
            rip: v.save.rip,
            nrip: nrip.then_some(v.control.next_rip),
        };
        let (kind, next_rip) = decode::decode(&raw);
        let v = self.vmcb_areas(0);
        // The injected event was delivered, or its delivery was interrupted and
        // EXITINTINFO says so (§15.7.2): retry it at the next entry.
        v.control.eventinj = 0;
        let info = v.control.exitintinfo;
        let events = ExitEvents {
            injected: Event::decode(injected as u32, (injected >> 32) as u32),
            interrupted: Event::decode(info as u32, (info >> 32) as u32),
        };
        if let Some(again) = event::requeue(info, injected) {
            v.control.eventinj = again;
            self.injected = again;
        }
        self.tlb_next = tlb_control::DO_NOTHING;
        Exit { kind, rip: raw.rip, next_rip, raw: exitcode, tsc, events }
    }
}

impl SvmVcpu {
    /// An entry Vireo refused before VMRUN, for `reason`.
    fn refused(&self, reason: &'static str) -> Exit {
        let rip = self.rip();
        Exit {
            kind: ExitKind::EntryFailed { reason, code: code::INVALID },
            rip,
            next_rip: rip,
            raw: code::INVALID,
            tsc: 0,
            events: Default::default(),
        }
    }
}

impl Backend for SvmVcpu {
    fn load_state(&mut self, state: &CpuState) {
        let cpl = if state.cr0 & CR0_PE == 0 {
            0
        } else if state.rflags & RFLAGS_VM != 0 {
            3
        } else {
            state.ss.attr.dpl()
        };
        let flush = if self.caps.flush_by_asid { tlb_control::FLUSH_ASID } else { tlb_control::FLUSH_ALL };
        if self.tlb_next != tlb_control::FLUSH_ALL {
            self.tlb_next = flush;
        }
        self.injected = 0;
        let v = self.vmcb_mut();
        let s = &mut v.save;
        s.es = to_vmcb(&state.es);
        s.cs = to_vmcb(&state.cs);
        s.ss = to_vmcb(&state.ss);
        s.ds = to_vmcb(&state.ds);
        s.fs = to_vmcb(&state.fs);
        s.gs = to_vmcb(&state.gs);
        s.tr = to_vmcb(&state.tr);
        s.ldtr = to_vmcb(&state.ldtr);
        s.gdtr = table(&state.gdtr);
        s.idtr = table(&state.idtr);
        s.cpl = cpl;
        s.efer = state.efer | EFER_SVME;
        s.cr0 = state.cr0;
        s.cr2 = 0;
        s.cr3 = state.cr3;
        s.cr4 = state.cr4;
        s.dr6 = DR6_INIT;
        s.dr7 = state.dr7;
        s.rflags = state.rflags | RFLAGS_RESERVED_1;
        s.rip = state.rip;
        s.rsp = state.rsp;
        s.g_pat = state.pat;
        s.star = 0;
        s.lstar = 0;
        s.cstar = 0;
        s.sfmask = 0;
        s.kernel_gs_base = 0;
        s.sysenter_cs = 0;
        s.sysenter_esp = 0;
        s.sysenter_eip = 0;
        let c = &mut v.control;
        c.eventinj = 0;
        c.exitintinfo = 0;
        c.interrupt_shadow = 0;
    }

    fn slice_start(&mut self) {
        let host_save = percpu::current().svm_host_save();
        if host_save != 0 {
            // SAFETY: a non-zero host-save page means `enable` set EFER.SVME on this CPU and
            // reserved the page for its host state (`run` refuses to enter otherwise).
            unsafe { run::save_host_state(host_save) };
        }
    }

    fn run(&mut self, regs: &mut GuestRegs) -> Exit {
        let this_cpu = percpu::current();
        let host_save = this_cpu.svm_host_save();
        if host_save == 0 {
            return self.refused("SVM is not enabled on this CPU (svm::enable was not called)");
        }
        // Nested paging is set once, at `new`, and nothing in Vireo changes it: a VMCB whose
        // NP_ENABLE or N_CR3 changed was written by something else (a stray write into this
        // page). Entering would run the guest on other tables or none: refuse, and say so.
        let c = &self.vmcb().control;
        if c.np_enable & NP_ENABLE == 0 || c.n_cr3 != self.npt_root {
            crate::report!(
                "svm vmcb=0x{:x} corrupted np_enable={:#x} n_cr3={:#x} expected_n_cr3={:#x}",
                self.vmcb_pa,
                c.np_enable,
                c.n_cr3,
                self.npt_root
            );
            return self.refused("the VMCB's nested paging fields changed behind Vireo");
        }
        let tlb = self.tlb_next;
        let v = self.vmcb_areas(0);
        v.save.rax = regs.rax;
        v.save.rsp = regs.rsp;
        v.control.tlb_control = tlb;
        let entry = self.entry_snapshot();
        let entry_rip = self.vmcb().save.rip;
        let clean = self.clean_for_entry(this_cpu.index());
        self.vmcb_areas(0).control.vmcb_clean = clean;
        if event::exit_after_delivery(
            self.vmcb().control.eventinj,
            event::redelivers_injected_interrupts(self.caps.nrip),
        ) {
            // Pending at VMRUN (host IF = 0, GIF = 0 until VMRUN): an INTR exit right after
            // the delivery. Without an APIC there is nothing to do.
            let _ = crate::arch::lapic::send_self(crate::arch::lapic::EXIT_VECTOR);
        }
        // SAFETY: `host_save` is non-zero only after `enable` set EFER.SVME and
        // VM_HSAVE_PA on this CPU and reserved the page; the VMCB, IOPM and MSRPM belong to
        // this vCPU and were initialized by `new`; the caller built the nested page tables
        // at N_CR3; no reference into the VMCB is live across the call.
        let tsc = unsafe { run::world_switch(self.vmcb_pa, regs, host_save) };
        self.complete_exit(regs, entry.as_ref(), entry_rip, tsc)
    }

    fn run_fast(&mut self, regs: &mut GuestRegs, fast: &mut impl FastExits) -> Exit {
        let mut exit = self.run(regs);
        // Only a VMMCALL with nothing else to report (no event delivered, none interrupted,
        // none queued) is offered.
        // (`matches!`: the derived `!=` on ExitKind is a call on every exit.)
        if !matches!(exit.kind, ExitKind::Hypercall(HypercallInsn::Vmmcall))
            || self.injected != 0
            || exit.events != ExitEvents::default()
        {
            return exit;
        }
        let host_save = percpu::current().svm_host_save();
        let nrip = self.caps.nrip;
        // The VMCB just ran on this CPU and from here on only RIP, RAX and the interrupt
        // shadow change, none of them in a cached area: every clean bit holds (none where
        // the CPU has no clean bits). `run` left EVENTINJ clear.
        let clean = clean::for_entry(self.caps.vmcb_clean, true, 0);
        let v = self.vmcb_areas(0);
        v.control.vmcb_clean = clean;
        v.control.tlb_control = tlb_control::DO_NOTHING;
        while fast.hypercall(regs, HypercallInsn::Vmmcall, || self.vmcb().save.cpl & 3, exit.tsc) {
            let v = self.vmcb_areas(0);
            v.save.rip = exit.next_rip;
            v.save.rax = regs.rax;
            v.control.interrupt_shadow &= !INTERRUPT_SHADOW;
            // SAFETY: as in `run`, whose entry on this CPU just exited; no reference into
            // the VMCB is live across the call.
            let tsc = unsafe { run::world_switch(self.vmcb_pa, regs, host_save) };
            let v = self.vmcb();
            if decode::normalize(v.control.exitcode) != code::VMMCALL || event::is_valid(v.control.exitintinfo) {
                // Nothing a VMRUN checks changed since the last #VMEXIT: a refused entry
                // is explained without a snapshot (`entry_refused`).
                return self.complete_exit(regs, None, exit.next_rip, tsc);
            }
            regs.rax = v.save.rax;
            exit.rip = v.save.rip;
            exit.next_rip = if nrip { v.control.next_rip } else { exit.rip.wrapping_add(decode::insn_len::VMMCALL) };
            exit.tsc = tsc;
        }
        // This VMMCALL goes to the core. RSP may have moved meanwhile.
        regs.rsp = self.vmcb().save.rsp;
        exit
    }

    #[inline]
    fn rip(&self) -> u64 {
        self.vmcb().save.rip
    }

    /// Moving RIP ends an STI / MOV SS interrupt shadow: the core moves it past the
    /// instruction it emulated (the shadowed one, e.g. the HLT of STI;HLT), after which
    /// interrupts are recognized again (APM Vol. 2 §15.21.5; KVM does the same when it skips
    /// an instruction). Left set, the shadow would wrongly cover the next instruction too.
    #[inline]
    fn set_rip(&mut self, rip: u64) {
        let v = self.vmcb_areas(0);
        if v.save.rip != rip {
            v.control.interrupt_shadow &= !INTERRUPT_SHADOW;
        }
        v.save.rip = rip;
    }

    fn rflags(&self) -> u64 {
        self.vmcb().save.rflags
    }

    fn set_rflags(&mut self, rflags: u64) {
        self.rflags_written = true;
        self.vmcb_areas(0).save.rflags = rflags | RFLAGS_RESERVED_1;
    }

    fn cr0(&self) -> u64 {
        self.vmcb().save.cr0
    }

    fn cr3(&self) -> u64 {
        self.vmcb().save.cr3
    }

    fn cr4(&self) -> u64 {
        self.vmcb().save.cr4
    }

    fn efer(&self) -> u64 {
        self.vmcb().save.efer & !EFER_SVME
    }

    /// EFER.LMA is read-only (APM Vol. 2 §14.6.1): it is recomputed as LME & CR0.PG;
    /// EFER.SVME is forced on in the VMCB copy (§15.5.1) and hidden by [`Backend::efer`].
    fn set_efer(&mut self, efer: u64) {
        let s = &mut self.vmcb_areas(clean::CRX).save;
        let mut e = efer & !EFER_LMA;
        if e & EFER_LME != 0 && s.cr0 & CR0_PG != 0 {
            e |= EFER_LMA;
        }
        s.efer = e | EFER_SVME;
    }

    #[inline]
    fn cpl(&self) -> u8 {
        self.vmcb().save.cpl & 3
    }

    fn segment(&self, seg: SegReg) -> Segment {
        let s = &self.vmcb().save;
        let v = match seg {
            SegReg::Es => s.es,
            SegReg::Cs => s.cs,
            SegReg::Ss => s.ss,
            SegReg::Ds => s.ds,
            SegReg::Fs => s.fs,
            SegReg::Gs => s.gs,
            SegReg::Tr => s.tr,
            SegReg::Ldtr => s.ldtr,
        };
        Segment { selector: v.selector, base: v.base, limit: v.limit, attr: SegAttr(v.attrib), unusable: false }
    }

    fn inject(&mut self, event: Event) {
        let value = event::encode(event);
        let c = &mut self.vmcb_areas(0).control;
        if event::is_valid(c.eventinj) {
            log::warn!("svm: inject {event:?} replaces queued EVENTINJ {:#x}", c.eventinj);
        }
        c.eventinj = value;
        self.injected = value;
    }

    fn pending_event(&self) -> Option<Event> {
        let e = self.vmcb().control.eventinj;
        Event::decode(e as u32, (e >> 32) as u32)
    }

    fn set_cr2(&mut self, cr2: u64) {
        SvmVcpu::set_cr2(self, cr2);
    }

    fn cr2(&self) -> u64 {
        SvmVcpu::cr2(self)
    }

    fn pat(&self) -> u64 {
        SvmVcpu::pat(self)
    }

    fn set_pat(&mut self, pat: u64) {
        SvmVcpu::set_pat(self, pat)
    }

    #[inline]
    fn event_pending(&self) -> bool {
        event::is_valid(self.vmcb().control.eventinj)
    }

    fn interruptible(&self) -> bool {
        let v = self.vmcb();
        v.save.rflags & RFLAGS_IF != 0 && v.control.interrupt_shadow & INTERRUPT_SHADOW == 0
    }

    fn interrupt_shadow(&self) -> bool {
        self.vmcb().control.interrupt_shadow & INTERRUPT_SHADOW != 0
    }

    /// V_IRQ with V_IGN_TPR and the VINTR intercept (APM Vol. 2 §15.21.4): the CPU exits
    /// as soon as the guest could take the virtual interrupt. An InterruptWindow exit
    /// clears the request.
    fn set_interrupt_window(&mut self, enable: bool) {
        let c = &mut self.vmcb_areas(clean::TPR | clean::INTERCEPTS).control;
        let cleared =
            c.v_intr & !(vintr::V_IRQ | vintr::V_IGN_TPR | vintr::V_INTR_PRIO_MASK | vintr::V_INTR_VECTOR_MASK);
        if enable {
            c.v_intr = cleared
                | vintr::V_IRQ
                | vintr::V_IGN_TPR
                | vintr::V_INTR_PRIO_MASK
                | (WINDOW_VECTOR << vintr::V_INTR_VECTOR_SHIFT);
            c.intercept_misc1 |= InterceptMisc1::VINTR.bits();
        } else {
            c.v_intr = cleared;
            c.intercept_misc1 &= !InterceptMisc1::VINTR.bits();
        }
    }

    fn set_exception_intercepts(&mut self, vectors: u32) {
        if self.vmcb().control.intercept_exceptions != vectors {
            self.vmcb_areas(clean::INTERCEPTS).control.intercept_exceptions = vectors;
        }
    }

    fn flush_guest_tlb(&mut self) {
        self.flush_tlb();
    }
}
