//! Host tests of the vCPU: frames come from host memory (the tests' "physical" addresses
//! are host addresses, identity-mapped like Vireo's) and `run` goes through the simulated
//! world switch of `run::sim`.

use super::{
    bitmap::{self, IOPM_SIZE, MSRPM_SIZE, PASS_THROUGH_MSRS},
    check, event,
    run::sim,
    vcpu::{base_intercepts_misc1, base_intercepts_misc2},
    vmcb::{clean, tlb_control, vintr, InterceptMisc1, InterceptMisc2, Vmcb, INTERRUPT_SHADOW, NP_ENABLE},
    SvmVcpu,
};
use crate::{
    arch::cpu::SvmCaps,
    mm::{FrameAllocator, PhysRange, PAGE_SIZE},
    vmm::{
        backend::Backend,
        exit::{Event, ExitKind, HypercallInsn, IoAccess},
        regs::GuestRegs,
        state::{CpuState, DescriptorTable, SegReg, EFER_LMA, EFER_LME, EFER_NXE, EFER_SCE, EFER_SVME, RFLAGS_IF},
    },
};

const NPT_ROOT: u64 = 0x1234_5000;

/// A frame allocator over `pages` pages of leaked, 4 KiB-aligned host memory.
fn host_frames(pages: usize) -> FrameAllocator {
    let layout = std::alloc::Layout::from_size_align(pages * PAGE_SIZE as usize, PAGE_SIZE as usize).unwrap();
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) } as u64;
    assert!(p != 0 && p >= 0x10_0000);
    FrameAllocator::new([PhysRange::new(p, p + layout.size() as u64)], &[]).unwrap()
}

fn caps() -> SvmCaps {
    SvmCaps { npt: true, asids: 16, revision: 1, ..SvmCaps::default() }
}

fn long_mode() -> CpuState {
    CpuState::long_mode_flat(0x40_1000, 0x8000, 0x10_0000, DescriptorTable { base: 0x5000, limit: 0x27 })
}

fn vcpu(caps: &SvmCaps) -> (SvmVcpu, FrameAllocator) {
    let mut frames = host_frames(16);
    let mut v = SvmVcpu::new(&mut frames, NPT_ROOT, 1, caps).unwrap();
    v.load_state(&long_mode());
    (v, frames)
}

fn enable_for_tests() {
    super::vcpu::test_set_host_save(0x5000);
}

#[test]
fn construction_refusals() {
    let mut frames = host_frames(16);
    let before = frames.free_bytes();
    let disabled = SvmCaps { disabled_by_firmware: true, ..caps() };
    let e = SvmVcpu::new(&mut frames, NPT_ROOT, 1, &disabled).unwrap_err();
    assert!(e.0.contains("disabled by the firmware"), "{e}");
    let no_npt = SvmCaps { npt: false, ..caps() };
    assert!(SvmVcpu::new(&mut frames, NPT_ROOT, 1, &no_npt).unwrap_err().0.contains("nested paging"));
    assert!(SvmVcpu::new(&mut frames, NPT_ROOT, 0, &caps()).unwrap_err().0.contains("ASID 0"));
    assert!(SvmVcpu::new(&mut frames, NPT_ROOT, 16, &caps()).unwrap_err().0.contains("beyond"));
    assert!(SvmVcpu::new(&mut frames, NPT_ROOT + 8, 1, &caps()).unwrap_err().0.contains("aligned"));
    // enable() refuses before touching any MSR.
    assert!(super::enable(&mut frames, &disabled).unwrap_err().0.contains("SVMDIS"));
    assert!(super::enable(&mut frames, &no_npt).is_err());
    assert_eq!(frames.free_bytes(), before);
    // Out of memory part-way: nothing leaks.
    let mut small = host_frames(3);
    assert!(SvmVcpu::new(&mut small, NPT_ROOT, 1, &caps()).unwrap_err().0.contains("out of memory"));
    assert_eq!(small.free_bytes(), 3 * PAGE_SIZE);
}

#[test]
fn new_builds_the_vmcb_and_release_frees_it() {
    let mut frames = host_frames(16);
    let before = frames.free_bytes();
    let v = SvmVcpu::new(&mut frames, NPT_ROOT, 7, &caps()).unwrap();
    assert_eq!(frames.free_bytes(), before - (PAGE_SIZE + IOPM_SIZE as u64 + MSRPM_SIZE as u64));
    let c = &v.vmcb().control;
    assert_eq!(c.intercept_misc1, base_intercepts_misc1().bits());
    let misc2 = InterceptMisc2::from_bits_retain(c.intercept_misc2);
    assert!(misc2.contains(base_intercepts_misc2(false)));
    assert!(misc2 == base_intercepts_misc2(false) || misc2 == base_intercepts_misc2(true));
    for m in [InterceptMisc2::VMRUN, InterceptMisc2::VMMCALL, InterceptMisc2::XSETBV, InterceptMisc2::CLGI] {
        assert!(misc2.contains(m));
    }
    let misc1 = InterceptMisc1::from_bits_retain(c.intercept_misc1);
    assert!(misc1
        .contains(InterceptMisc1::CPUID | InterceptMisc1::HLT | InterceptMisc1::IOIO_PROT | InterceptMisc1::MSR_PROT));
    assert!(
        misc1.contains(InterceptMisc1::INTR | InterceptMisc1::NMI | InterceptMisc1::INIT | InterceptMisc1::SHUTDOWN)
    );
    assert!(!misc1.contains(InterceptMisc1::VINTR), "VINTR only while a window is requested");
    assert_eq!(c.intercept_exceptions, 0);
    assert_eq!(c.guest_asid, 7);
    assert_eq!(c.np_enable, NP_ENABLE);
    assert_eq!(c.n_cr3, NPT_ROOT);
    assert_eq!(c.tlb_control, tlb_control::FLUSH_ALL);
    assert_eq!(c.v_intr, vintr::V_INTR_MASKING);
    assert_eq!(c.iopm_base_pa % PAGE_SIZE, 0);
    assert_eq!(c.msrpm_base_pa % PAGE_SIZE, 0);
    // SAFETY: the maps are live host memory owned by `v`.
    let (iopm, msrpm) =
        unsafe { (&*(c.iopm_base_pa as *const [u8; IOPM_SIZE]), &*(c.msrpm_base_pa as *const [u8; MSRPM_SIZE])) };
    assert!(iopm.iter().all(|&b| b == 0xFF));
    for msr in PASS_THROUGH_MSRS {
        assert!(!bitmap::msr_intercepted(msrpm, msr, false) && !bitmap::msr_intercepted(msrpm, msr, true));
    }
    assert!(bitmap::msr_intercepted(msrpm, 0xC000_0080, true), "EFER writes exit");
    assert!(bitmap::msr_intercepted(msrpm, 0x277, true), "PAT writes exit");
    // The reset state is a VMCB VMRUN accepts.
    assert_eq!(v.rip(), 0xFFF0);
    assert_eq!(v.segment(SegReg::Cs).base, 0xFFFF_0000);
    assert_eq!(check::first_failure(v.vmcb()), None);
    v.release(&mut frames);
    assert_eq!(frames.free_bytes(), before);
}

#[test]
fn load_state_and_accessors() {
    let (mut v, _f) = vcpu(&caps());
    let st = long_mode();
    assert_eq!(check::first_failure(v.vmcb()), None);
    assert_eq!(v.rip(), st.rip);
    assert_eq!(v.cr0(), st.cr0);
    assert_eq!(v.cr3(), st.cr3);
    assert_eq!(v.cr4(), st.cr4);
    assert_eq!(v.efer(), st.efer, "SVME hidden");
    assert_eq!(v.vmcb().save.efer, st.efer | EFER_SVME);
    assert_eq!(v.vmcb().save.g_pat, st.pat);
    assert_eq!(v.pat(), st.pat);
    assert_eq!(v.cpl(), 0);
    let cs = v.segment(SegReg::Cs);
    assert_eq!((cs.selector, cs.attr, cs.limit), (st.cs.selector, st.cs.attr, st.cs.limit));
    assert_eq!(v.segment(SegReg::Tr).attr, st.tr.attr);
    assert_eq!(v.vmcb().save.gdtr.base, 0x5000);
    assert_eq!(v.vmcb().save.gdtr.limit, 0x27);
    assert_eq!(v.vmcb().save.dr6, 0xFFFF_0FF0);
    v.set_rip(0x42);
    v.set_rflags(RFLAGS_IF);
    assert_eq!((v.rip(), v.rflags()), (0x42, RFLAGS_IF | 2));
    // A user-mode SS gives CPL 3.
    let mut user = st;
    user.ss.attr.0 |= 3 << 5;
    v.load_state(&user);
    assert_eq!(v.cpl(), 3);
    v.set_exception_intercepts(1 << 6 | 1 << 14);
    assert_eq!(v.vmcb().control.intercept_exceptions, 0x4040);
}

#[test]
fn set_efer_forces_svme_and_derives_lma() {
    let (mut v, _f) = vcpu(&caps());
    v.set_efer(EFER_SCE | EFER_LME | EFER_NXE);
    assert_eq!(v.efer(), EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE, "paging is on: LMA follows LME");
    assert_eq!(v.vmcb().save.efer & EFER_SVME, EFER_SVME);
    let mut real = long_mode();
    real.cr0 = 0x11;
    real.efer = 0;
    v.load_state(&real);
    v.set_efer(EFER_LME | EFER_LMA);
    assert_eq!(v.efer(), EFER_LME, "paging off: LMA stays clear");
}

#[test]
fn injection_and_interruptibility() {
    let (mut v, _f) = vcpu(&caps());
    assert!(!v.event_pending());
    v.inject(Event::GP0);
    assert!(v.event_pending());
    assert_eq!(v.vmcb().control.eventinj, event::encode(Event::GP0));
    assert!(!v.interruptible(), "IF=0");
    v.set_rflags(RFLAGS_IF | 2);
    assert!(v.interruptible());
    v.vmcb_mut().control.interrupt_shadow = INTERRUPT_SHADOW;
    assert!(!v.interruptible(), "STI shadow");
    // STI;HLT: the HLT exit reports the shadow; moving past the HLT ends it.
    let rip = v.rip();
    v.set_rip(rip);
    assert!(!v.interruptible(), "same RIP: shadow kept");
    v.set_rip(rip + 1);
    assert!(v.interruptible(), "past the shadowed instruction");
    v.vmcb_mut().control.interrupt_shadow = INTERRUPT_SHADOW;
    v.set_interrupt_window(true);
    let c = &v.vmcb().control;
    assert_ne!(c.v_intr & vintr::V_IRQ, 0);
    assert_ne!(c.v_intr & vintr::V_IGN_TPR, 0);
    assert_ne!(c.v_intr & vintr::V_INTR_MASKING, 0);
    assert_ne!(c.intercept_misc1 & InterceptMisc1::VINTR.bits(), 0);
    v.set_interrupt_window(false);
    let c = &v.vmcb().control;
    assert_eq!(c.v_intr, vintr::V_INTR_MASKING);
    assert_eq!(c.intercept_misc1 & InterceptMisc1::VINTR.bits(), 0);
    // A reset drops the queued event.
    v.load_state(&long_mode());
    assert!(!v.event_pending());
}

fn exit_with(code: u64, info1: u64, info2: u64, nrip: u64) -> impl FnMut(&mut Vmcb, &mut GuestRegs) {
    move |vmcb, _regs| {
        vmcb.control.exitcode = code;
        vmcb.control.exitinfo1 = info1;
        vmcb.control.exitinfo2 = info2;
        vmcb.control.next_rip = nrip;
        vmcb.control.exitintinfo = 0;
        vmcb.control.eventinj &= !event::VALID;
    }
}

#[test]
fn run_syncs_rax_rsp_and_decodes_without_nrip() {
    enable_for_tests();
    let (mut v, _f) = vcpu(&caps());
    let mut regs = GuestRegs { rax: 1, rsp: 0x7000, rbx: 3, ..GuestRegs::default() };
    sim::set(|vmcb, regs| {
        assert_eq!(vmcb.save.rax, 1, "guest RAX loaded into the VMCB");
        assert_eq!(vmcb.save.rsp, 0x7000);
        assert_eq!(vmcb.control.tlb_control, tlb_control::FLUSH_ALL, "first run flushes");
        vmcb.save.rax = 0x4000_0000; // the guest's CPUID leaf
        vmcb.save.rsp = 0x6FF8;
        regs.rbx = 0xB;
        vmcb.control.exitcode = 0x72;
        vmcb.control.next_rip = 0xDEAD; // not trusted without nRIP-save
    });
    let exit = v.run(&mut regs);
    assert_eq!(exit.kind, ExitKind::Cpuid);
    assert_eq!(exit.rip, 0x40_1000);
    assert_eq!(exit.next_rip, 0x40_1002);
    assert_eq!(exit.raw, 0x72);
    assert_eq!(exit.tsc, 42);
    assert_eq!((regs.rax, regs.rsp, regs.rbx), (0x4000_0000, 0x6FF8, 0xB));
    sim::set(|vmcb, _| {
        assert_eq!(vmcb.control.tlb_control, tlb_control::DO_NOTHING, "later runs do not flush");
        vmcb.control.exitcode = 0x81;
    });
    let exit = v.run(&mut regs);
    assert_eq!((exit.kind, exit.next_rip), (ExitKind::Hypercall(HypercallInsn::Vmmcall), 0x40_1003));
    // After NPT changes: a full flush without flush-by-ASID.
    v.flush_tlb();
    sim::set(|vmcb, _| {
        assert_eq!(vmcb.control.tlb_control, tlb_control::FLUSH_ALL);
        vmcb.control.exitcode = 0x78;
    });
    assert_eq!(v.run(&mut regs).next_rip, 0x40_1001);
}

#[test]
fn run_uses_nrip_and_flush_by_asid() {
    enable_for_tests();
    let c = SvmCaps { nrip: true, flush_by_asid: true, ..caps() };
    let (mut v, _f) = vcpu(&c);
    let mut regs = GuestRegs::default();
    sim::set(exit_with(0x7C, 1, 0, 0x40_1004));
    let exit = v.run(&mut regs);
    assert_eq!((exit.kind, exit.next_rip), (ExitKind::Wrmsr, 0x40_1004));
    v.flush_tlb();
    sim::set(|vmcb, _| {
        assert_eq!(vmcb.control.tlb_control, tlb_control::FLUSH_ASID);
        vmcb.control.exitcode = 0x7B;
        vmcb.control.exitinfo1 = (0x3F8 << 16) | (1 << 4);
        vmcb.control.exitinfo2 = 0x40_1001;
    });
    let exit = v.run(&mut regs);
    assert_eq!(exit.kind, ExitKind::Io(IoAccess { port: 0x3F8, size: 1, write: true, string: false, rep: false }));
    assert_eq!(exit.next_rip, 0x40_1001);
}

#[test]
fn delivered_events_clear_and_interrupted_ones_requeue() {
    enable_for_tests();
    let (mut v, _f) = vcpu(&caps());
    let mut regs = GuestRegs::default();
    // Delivered: the CPU leaves EVENTINJ with V clear (or not: Vireo clears it anyway).
    v.inject(Event::Interrupt { vector: 0x30 });
    sim::set(|vmcb, _| {
        assert_eq!(vmcb.control.eventinj, 0x8000_0030);
        vmcb.control.exitcode = 0x78;
        vmcb.control.exitintinfo = 0;
    });
    v.run(&mut regs);
    assert!(!v.event_pending());
    // Interrupted by a nested page fault on the guest's stack: retried.
    v.inject(Event::Exception { vector: 14, error_code: Some(2) });
    sim::set(|vmcb, _| {
        vmcb.control.exitintinfo = vmcb.control.eventinj;
        vmcb.control.eventinj = 0;
        vmcb.control.exitcode = 0x400;
        vmcb.control.exitinfo1 = 0b110;
        vmcb.control.exitinfo2 = 0x7000;
    });
    let exit = v.run(&mut regs);
    assert!(matches!(exit.kind, ExitKind::NestedPageFault(n) if n.gpa == 0x7000 && n.write));
    assert!(v.event_pending());
    assert_eq!(v.vmcb().control.eventinj, event::encode(Event::Exception { vector: 14, error_code: Some(2) }));
    // The guest's own INTn interrupted: re-executed, not re-injected.
    sim::set(|vmcb, _| {
        vmcb.control.eventinj = 0;
        vmcb.control.exitintinfo = 0x8000_0480;
        vmcb.control.exitcode = 0x400;
    });
    v.run(&mut regs);
    assert!(!v.event_pending());
}

/// The backend reports the window; the core clears the request (vmm::vcpu), which the
/// backend translates into V_IRQ and the VINTR intercept off.
#[test]
fn interrupt_window_exit_and_clearing_the_request() {
    enable_for_tests();
    let (mut v, _f) = vcpu(&caps());
    let mut regs = GuestRegs::default();
    v.set_interrupt_window(true);
    assert_ne!(v.vmcb().control.v_intr & vintr::V_IRQ, 0);
    sim::set(exit_with(0x64, 0, 0, 0));
    let exit = v.run(&mut regs);
    assert_eq!(exit.kind, ExitKind::InterruptWindow);
    v.set_interrupt_window(false);
    assert_eq!(v.vmcb().control.v_intr & vintr::V_IRQ, 0);
    assert_eq!(v.vmcb().control.intercept_misc1 & InterceptMisc1::VINTR.bits(), 0);
}

#[test]
fn guest_svm_instructions_are_ud() {
    enable_for_tests();
    let (mut v, _f) = vcpu(&caps());
    let mut regs = GuestRegs::default();
    sim::set(exit_with(0x80, 0, 0, 0));
    let exit = v.run(&mut regs);
    assert_eq!(exit.kind, ExitKind::Exception { vector: 6, error_code: None });
    assert_eq!(exit.next_rip, exit.rip);
}

#[test]
fn vmexit_invalid_names_the_check_despite_overwritten_state() {
    enable_for_tests();
    let (mut v, _f) = vcpu(&caps());
    let mut regs = GuestRegs { rax: 5, rsp: 0x9000, ..GuestRegs::default() };
    // A guest CR0 with NW set and CD clear.
    v.vmcb_mut().save.cr0 |= 1 << 29;
    v.inject(Event::Nmi);
    // Like QEMU TCG: on VMEXIT_INVALID the save area gets host values, EVENTINJ is cleared.
    sim::set(|vmcb, _| {
        vmcb.control.exitcode = u64::MAX;
        vmcb.save.cr0 = 0x8000_0011;
        vmcb.save.rip = 0xFFFF_8000_0000_1234;
        vmcb.save.rax = 0xAAAA;
        vmcb.control.exitintinfo = vmcb.control.eventinj;
        vmcb.control.eventinj = 0;
        vmcb.control.v_intr = 0;
    });
    let exit = v.run(&mut regs);
    assert_eq!(v.vmcb().control.v_intr, vintr::V_INTR_MASKING);
    let ExitKind::EntryFailed { reason, code } = exit.kind else { panic!("{exit}") };
    assert_eq!(reason, "guest CR0.NW is set while CR0.CD is clear (APM §15.5.1)");
    assert_eq!(code, u64::MAX);
    assert_eq!(exit.rip, 0x40_1000);
    assert_eq!(v.rip(), 0x40_1000, "guest state put back");
    assert_eq!((regs.rax, regs.rsp), (5, 0x9000));
    assert!(v.event_pending(), "the NMI was never delivered");
    // The TLB flush is still due.
    sim::set(|vmcb, _| {
        assert_eq!(vmcb.control.tlb_control, tlb_control::FLUSH_ALL);
        vmcb.control.exitcode = 0xFFFF_FFFF; // QEMU TCG's zero-extended VMEXIT_INVALID
        vmcb.save.rip = 0x21_1334;
    });
    v.vmcb_mut().save.cr0 &= !(1 << 29);
    v.vmcb_mut().control.guest_asid = 0;
    let exit = v.run(&mut regs);
    assert!(matches!(exit.kind, ExitKind::EntryFailed { reason, .. } if reason.contains("ASID is 0")));
    assert_eq!((exit.raw, exit.rip), (u64::MAX, 0x40_1000));
}

#[test]
fn an_entry_after_only_rip_changed_keeps_no_snapshot_and_still_reports_a_refusal() {
    enable_for_tests();
    let (mut v, _f) = vcpu(&caps());
    let mut regs = GuestRegs::default();
    // A first exit (VMMCALL at 0x40_1000): everything Vireo wrote is behind it.
    sim::set(exit_with(0x81, 0, 0, 0x40_1003));
    assert_eq!(v.run(&mut regs).kind, ExitKind::Hypercall(HypercallInsn::Vmmcall));
    assert!(!v.keeps_entry_snapshot(), "only a #VMEXIT since: nothing VMRUN checks changed");
    v.set_rip(0x40_1003);
    regs.rax = 7;
    assert!(!v.keeps_entry_snapshot(), "RIP and RAX are not checked");
    // Refused anyway (a host-side cause), with the save area overwritten: RIP is Vireo's.
    sim::set(|vmcb, _| {
        vmcb.control.exitcode = u64::MAX;
        vmcb.save.rip = 0xFFFF_8000_0000_1234;
    });
    let exit = v.run(&mut regs);
    let ExitKind::EntryFailed { reason, .. } = exit.kind else { panic!("{exit}") };
    assert!(reason.contains("not a guest-state check"), "{reason}");
    assert_eq!((exit.rip, v.rip()), (0x40_1003, 0x40_1003));
    // Any checked write since the exit brings the snapshot back.
    v.set_rflags(0x202);
    assert!(v.keeps_entry_snapshot());
}

#[test]
fn clean_bits_for_an_entry() {
    assert_eq!(clean::for_entry(false, true, 0), 0, "a CPU without clean bits");
    assert_eq!(clean::for_entry(true, false, 0), 0, "another CPU or VMCB since");
    assert_eq!(clean::for_entry(true, true, 0), clean::TRACKED);
    assert_eq!(clean::for_entry(true, true, clean::CRX | clean::NP), clean::TRACKED & !(clean::CRX | clean::NP));
    assert_eq!(clean::for_entry(true, true, clean::ALL), 0);
    // LBR, AVIC and CET state are never declared clean.
    assert_eq!(clean::TRACKED, 0x3FF);
}

/// Runs `v` once (a VMMCALL exit) and returns the VMCB_CLEAN its entry had.
fn entry_clean_bits(v: &mut SvmVcpu) -> u32 {
    let mut regs = GuestRegs::default();
    sim::set(|vmcb, _| {
        exit_with(0x81, 0, 0, vmcb.save.rip + 3)(vmcb, &mut GuestRegs::default());
    });
    v.run(&mut regs);
    v.vmcb().control.vmcb_clean
}

#[test]
fn clean_bits_track_what_the_backend_changed() {
    enable_for_tests();
    let with_clean = SvmCaps { vmcb_clean: true, ..caps() };
    let (mut v, mut frames) = vcpu(&with_clean);
    assert_eq!(entry_clean_bits(&mut v), 0, "a new VMCB: everything dirty");
    assert_eq!(entry_clean_bits(&mut v), clean::TRACKED, "nothing changed");
    // Fields no clean bit covers.
    v.set_rip(v.rip() + 3);
    v.set_rflags(RFLAGS_IF);
    v.inject(Event::Nmi);
    v.flush_guest_tlb();
    assert_eq!(entry_clean_bits(&mut v), clean::TRACKED);
    v.set_efer(EFER_LME | EFER_SVME);
    assert_eq!(entry_clean_bits(&mut v), clean::TRACKED & !clean::CRX);
    v.set_pat(0x0007_0406_0007_0406);
    v.set_cr2(0x1000);
    assert_eq!(entry_clean_bits(&mut v), clean::TRACKED & !(clean::NP | clean::CR2));
    v.set_interrupt_window(true);
    assert_eq!(entry_clean_bits(&mut v), clean::TRACKED & !(clean::TPR | clean::INTERCEPTS));
    v.set_interrupt_window(false);
    let e = v.vmcb().control.intercept_exceptions;
    v.set_exception_intercepts(e);
    assert_eq!(entry_clean_bits(&mut v), clean::TRACKED & !(clean::TPR | clean::INTERCEPTS));
    v.set_exception_intercepts(e);
    assert_eq!(entry_clean_bits(&mut v), clean::TRACKED, "the same intercepts again change nothing");
    v.set_exception_intercepts(e | 1 << 14);
    assert_eq!(entry_clean_bits(&mut v), clean::TRACKED & !clean::INTERCEPTS);
    // Any write through vmcb_mut, or a new state, dirties everything.
    v.vmcb_mut().save.dr7 = 0x400;
    assert_eq!(entry_clean_bits(&mut v), 0);
    v.load_state(&long_mode());
    assert_eq!(entry_clean_bits(&mut v), 0);
    assert_eq!(entry_clean_bits(&mut v), clean::TRACKED);
    // Another VMCB ran on this CPU meanwhile: its state, not ours, may be cached.
    let mut other = SvmVcpu::new(&mut frames, NPT_ROOT, 2, &with_clean).unwrap();
    other.load_state(&long_mode());
    assert_eq!(entry_clean_bits(&mut other), 0);
    assert_eq!(entry_clean_bits(&mut v), 0);
    assert_eq!(entry_clean_bits(&mut v), clean::TRACKED);
    // A refused entry puts state back: everything dirty again.
    sim::set(|vmcb, _| vmcb.control.exitcode = u64::MAX);
    let exit = v.run(&mut GuestRegs::default());
    assert!(matches!(exit.kind, ExitKind::EntryFailed { .. }));
    assert_eq!(entry_clean_bits(&mut v), 0);
    // Without clean bits on the CPU, none are ever set.
    let (mut plain, _f) = vcpu(&caps());
    for _ in 0..3 {
        assert_eq!(entry_clean_bits(&mut plain), 0);
    }
}

#[test]
fn run_floor_answers_pings_in_the_backend_and_returns_other_exits() {
    use guest_abi::hypercall::nr::PING;
    enable_for_tests();
    let (mut v, _f) = vcpu(&caps());
    let start = v.rip();
    let mut regs = GuestRegs { rax: PING, ..GuestRegs::default() };
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let log = seen.clone();
    let mut n = 0u64;
    sim::set(move |vmcb, regs| {
        // What the entry handed the guest: RIP and RAX.
        log.borrow_mut().push((vmcb.save.rip, vmcb.save.rax));
        n += 1;
        let code = if n <= 4 { 0x81 } else { 0x78 }; // VMMCALL, then HLT
        exit_with(code, 0, 0, 0)(vmcb, regs);
        vmcb.save.rax = PING;
        regs.rbx = 10 * n;
    });
    let exit = v.run_floor(&mut regs, 100);
    assert_eq!(exit.kind, ExitKind::Hlt, "the first non-PING exit comes back");
    let seen = seen.borrow();
    assert_eq!(seen.len(), 5);
    for (i, &(rip, rax)) in seen.iter().enumerate().skip(1) {
        assert_eq!(rip, start + 3 * i as u64, "RIP advanced past VMMCALL");
        assert_eq!(rax, 10 * i as u64 + 1, "RAX = RBX + 1");
    }
    // At most `max` answered: the last PING goes to the core.
    let mut m = 0;
    sim::set(move |vmcb, regs| {
        m += 1;
        exit_with(0x81, 0, 0, 0)(vmcb, regs);
        vmcb.save.rax = PING;
        regs.rbx = m;
    });
    let exit = v.run_floor(&mut regs, 2);
    assert_eq!(exit.kind, ExitKind::Hypercall(HypercallInsn::Vmmcall));
    assert_eq!(regs.rax, PING);
    assert_eq!(exit.next_rip, exit.rip + 3);
    // Anything but PING is the core's at once.
    sim::set(|vmcb, regs| {
        exit_with(0x81, 0, 0, 0)(vmcb, regs);
        vmcb.save.rax = PING + 1;
    });
    let exit = v.run_floor(&mut regs, 100);
    assert_eq!(exit.kind, ExitKind::Hypercall(HypercallInsn::Vmmcall));
    assert_eq!(regs.rax, PING + 1);
}

#[test]
fn multiboot_protected_mode_state_is_a_valid_vmcb() {
    let (mut v, _f) = vcpu(&caps());
    let st = CpuState::protected_mode_flat(0x10_0000, 0x2000, DescriptorTable { base: 0x2080, limit: 39 });
    v.load_state(&st);
    assert_eq!(check::first_failure(v.vmcb()), None);
    assert!(!v.long_mode());
    assert_eq!(v.cr0() & 0x8000_0001, 1, "protected mode, paging off");
    assert_eq!(v.segment(SegReg::Cs).attr, st.cs.attr);
}

#[test]
fn the_fast_loop_re_enters_with_every_clean_bit_and_no_tlb_flush() {
    use guest_abi::hypercall::nr::PING;
    enable_for_tests();
    let (mut v, _f) = vcpu(&SvmCaps { vmcb_clean: true, ..caps() });
    v.flush_tlb();
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let log = seen.clone();
    let mut n = 0u64;
    sim::set(move |vmcb, regs| {
        log.borrow_mut().push((vmcb.control.vmcb_clean, vmcb.control.tlb_control));
        n += 1;
        exit_with(if n <= 3 { 0x81 } else { 0x78 }, 0, 0, 0)(vmcb, regs);
        vmcb.save.rax = PING;
    });
    let mut regs = GuestRegs { rax: PING, ..GuestRegs::default() };
    assert_eq!(v.run_floor(&mut regs, 100).kind, ExitKind::Hlt);
    let seen = seen.borrow();
    assert_eq!(seen[0].0, 0, "a new VMCB: everything dirty");
    assert_ne!(seen[0].1, tlb_control::DO_NOTHING, "the flush asked for");
    for &(clean_bits, tlb) in &seen[1..] {
        assert_eq!((clean_bits, tlb), (clean::TRACKED, tlb_control::DO_NOTHING));
    }
    assert_eq!(seen.len(), 4);
}
