//! The virtual-machine control block (AMD APM Vol. 2 §15.5 and Appendix B).
//!
//! One 4 KiB page: the control area (offsets 0x000-0x3FF, Table B-1) and the state-save
//! area (from 0x400, Table B-2). Every field sits at the APM offset, checked at compile
//! time below. All fields are plain integers, so any bit pattern the hardware writes is a
//! valid value of these types.

use core::mem::{offset_of, size_of};

use bitflags::bitflags;

/// A segment register in the VMCB (APM Vol. 2 §15.5.1, Table B-2): selector, packed
/// attributes (descriptor bits 47:40 in 7:0, bits 55:52 in 11:8), limit, base.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmcbSegment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}
const _: () = assert!(size_of::<VmcbSegment>() == 16);

/// VMCB control area (APM Vol. 2 Appendix B, Table B-1).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ControlArea {
    /// 0x000: bits 15:0 intercept reads of CR0-CR15, bits 31:16 writes.
    pub intercept_cr: u32,
    /// 0x004: bits 15:0 intercept reads of DR0-DR15, bits 31:16 writes.
    pub intercept_dr: u32,
    /// 0x008: one bit per exception vector 0-31.
    pub intercept_exceptions: u32,
    /// 0x00C: intercept vector 3 ([`InterceptMisc1`]).
    pub intercept_misc1: u32,
    /// 0x010: intercept vector 4 ([`InterceptMisc2`]).
    pub intercept_misc2: u32,
    /// 0x014: intercept vector 5 (INVLPGB, INVPCID, MCOMMIT, TLBSYNC ...): unused.
    pub intercept_misc3: u32,
    _reserved_018: [u8; 0x24],
    /// 0x03C: PAUSE filter threshold.
    pub pause_filter_threshold: u16,
    /// 0x03E: PAUSE filter count.
    pub pause_filter_count: u16,
    /// 0x040: physical base of the I/O permission map (4 KiB aligned, 12 KiB).
    pub iopm_base_pa: u64,
    /// 0x048: physical base of the MSR permission map (4 KiB aligned, 8 KiB).
    pub msrpm_base_pa: u64,
    /// 0x050: added to the TSC the guest reads.
    pub tsc_offset: u64,
    /// 0x058: guest address-space identifier (0 is the host's and illegal here).
    pub guest_asid: u32,
    /// 0x05C: TLB_CONTROL ([`tlb_control`]).
    pub tlb_control: u8,
    _reserved_05d: [u8; 3],
    /// 0x060: virtual interrupt control ([`vintr`]).
    pub v_intr: u64,
    /// 0x068: bit 0 interrupt shadow (STI / MOV SS), bit 1 guest interrupt mask (GIF).
    pub interrupt_shadow: u64,
    /// 0x070: EXITCODE (APM Appendix C).
    pub exitcode: u64,
    /// 0x078: EXITINFO1.
    pub exitinfo1: u64,
    /// 0x080: EXITINFO2.
    pub exitinfo2: u64,
    /// 0x088: EXITINTINFO: an event whose delivery the exit interrupted (§15.7.2); same
    /// format as EVENTINJ.
    pub exitintinfo: u64,
    /// 0x090: bit 0 NP_ENABLE (nested paging), bit 1 SEV, bit 2 SEV-ES, ...
    pub np_enable: u64,
    /// 0x098: AVIC APIC_BAR.
    pub avic_apic_bar: u64,
    /// 0x0A0: guest physical address of the GHCB (SEV-ES).
    pub ghcb_pa: u64,
    /// 0x0A8: EVENTINJ: the event to inject at the next VMRUN (§15.20).
    pub eventinj: u64,
    /// 0x0B0: N_CR3: the nested page tables' root (§15.25).
    pub n_cr3: u64,
    /// 0x0B8: bit 0 LBR virtualization, bit 1 virtualized VMSAVE/VMLOAD.
    pub virt_ext: u64,
    /// 0x0C0: VMCB clean bits (§15.15): 0 makes the CPU reload every field.
    pub vmcb_clean: u32,
    _reserved_0c4: u32,
    /// 0x0C8: nRIP: RIP of the next instruction, on CPUs with nRIP-save (§15.7.1).
    pub next_rip: u64,
    /// 0x0D0: number of guest instruction bytes fetched (decode assists).
    pub guest_insn_len: u8,
    /// 0x0D1: the guest instruction bytes (decode assists).
    pub guest_insn_bytes: [u8; 15],
    /// 0x0E0: AVIC APIC backing page.
    pub avic_backing_page: u64,
    _reserved_0e8: u64,
    /// 0x0F0: AVIC logical APIC ID table.
    pub avic_logical_table: u64,
    /// 0x0F8: AVIC physical APIC ID table.
    pub avic_physical_table: u64,
    _reserved_100: u64,
    /// 0x108: VMSA pointer (SEV-ES).
    pub vmsa_pa: u64,
    _reserved_110: [u8; 0x2D0],
    /// 0x3E0-0x3FF: reserved for the hypervisor's own use.
    pub host_software: [u8; 0x20],
}

/// VMCB state-save area (APM Vol. 2 Appendix B, Table B-2), at VMCB offset 0x400.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StateSaveArea {
    pub es: VmcbSegment,
    pub cs: VmcbSegment,
    pub ss: VmcbSegment,
    pub ds: VmcbSegment,
    pub fs: VmcbSegment,
    pub gs: VmcbSegment,
    /// Only limit (16 bits) and base are used.
    pub gdtr: VmcbSegment,
    pub ldtr: VmcbSegment,
    /// Only limit (16 bits) and base are used.
    pub idtr: VmcbSegment,
    pub tr: VmcbSegment,
    _reserved_4a0: [u8; 0x2B],
    /// 0x4CB: current privilege level (VMRUN takes CPL from here, §15.5.1).
    pub cpl: u8,
    _reserved_4cc: u32,
    pub efer: u64,
    _reserved_4d8: [u8; 0x70],
    pub cr4: u64,
    pub cr3: u64,
    pub cr0: u64,
    pub dr7: u64,
    pub dr6: u64,
    pub rflags: u64,
    pub rip: u64,
    _reserved_580: [u8; 0x58],
    pub rsp: u64,
    pub s_cet: u64,
    pub ssp: u64,
    pub isst_addr: u64,
    pub rax: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub cr2: u64,
    _reserved_648: [u8; 0x20],
    /// 0x668: the guest's PAT when nested paging is on (§15.25.8).
    pub g_pat: u64,
    pub dbgctl: u64,
    pub br_from: u64,
    pub br_to: u64,
    pub last_excp_from: u64,
    pub last_excp_to: u64,
    _reserved_698: [u8; 0x48],
    pub spec_ctrl: u64,
    _reserved_6e8: [u8; 0x918],
}

/// A whole VMCB: one 4 KiB page, 4 KiB aligned (APM §15.5.1).
#[repr(C, align(4096))]
#[derive(Clone, Copy, Debug)]
pub struct Vmcb {
    pub control: ControlArea,
    pub save: StateSaveArea,
}

impl Vmcb {
    /// An all-zero VMCB.
    pub fn zeroed() -> Self {
        // SAFETY: every field of `Vmcb` is an integer or an array of integers, for which
        // the all-zero bit pattern is a valid value.
        unsafe { core::mem::zeroed() }
    }
}

/// Offsets from Table B-1 / B-2, relative to the VMCB start.
macro_rules! vmcb_offset {
    (control.$f:ident) => {
        offset_of!(Vmcb, control) + offset_of!(ControlArea, $f)
    };
    (save.$f:ident) => {
        offset_of!(Vmcb, save) + offset_of!(StateSaveArea, $f)
    };
}

const _: () = {
    assert!(size_of::<ControlArea>() == 0x400);
    assert!(size_of::<StateSaveArea>() == 0xC00);
    assert!(size_of::<Vmcb>() == 4096);
    assert!(core::mem::align_of::<Vmcb>() == 4096);
    // Control area, Table B-1.
    assert!(vmcb_offset!(control.intercept_cr) == 0x000);
    assert!(vmcb_offset!(control.intercept_dr) == 0x004);
    assert!(vmcb_offset!(control.intercept_exceptions) == 0x008);
    assert!(vmcb_offset!(control.intercept_misc1) == 0x00C);
    assert!(vmcb_offset!(control.intercept_misc2) == 0x010);
    assert!(vmcb_offset!(control.intercept_misc3) == 0x014);
    assert!(vmcb_offset!(control.pause_filter_threshold) == 0x03C);
    assert!(vmcb_offset!(control.pause_filter_count) == 0x03E);
    assert!(vmcb_offset!(control.iopm_base_pa) == 0x040);
    assert!(vmcb_offset!(control.msrpm_base_pa) == 0x048);
    assert!(vmcb_offset!(control.tsc_offset) == 0x050);
    assert!(vmcb_offset!(control.guest_asid) == 0x058);
    assert!(vmcb_offset!(control.tlb_control) == 0x05C);
    assert!(vmcb_offset!(control.v_intr) == 0x060);
    assert!(vmcb_offset!(control.interrupt_shadow) == 0x068);
    assert!(vmcb_offset!(control.exitcode) == 0x070);
    assert!(vmcb_offset!(control.exitinfo1) == 0x078);
    assert!(vmcb_offset!(control.exitinfo2) == 0x080);
    assert!(vmcb_offset!(control.exitintinfo) == 0x088);
    assert!(vmcb_offset!(control.np_enable) == 0x090);
    assert!(vmcb_offset!(control.avic_apic_bar) == 0x098);
    assert!(vmcb_offset!(control.ghcb_pa) == 0x0A0);
    assert!(vmcb_offset!(control.eventinj) == 0x0A8);
    assert!(vmcb_offset!(control.n_cr3) == 0x0B0);
    assert!(vmcb_offset!(control.virt_ext) == 0x0B8);
    assert!(vmcb_offset!(control.vmcb_clean) == 0x0C0);
    assert!(vmcb_offset!(control.next_rip) == 0x0C8);
    assert!(vmcb_offset!(control.guest_insn_len) == 0x0D0);
    assert!(vmcb_offset!(control.guest_insn_bytes) == 0x0D1);
    assert!(vmcb_offset!(control.avic_backing_page) == 0x0E0);
    assert!(vmcb_offset!(control.avic_logical_table) == 0x0F0);
    assert!(vmcb_offset!(control.avic_physical_table) == 0x0F8);
    assert!(vmcb_offset!(control.vmsa_pa) == 0x108);
    assert!(vmcb_offset!(control.host_software) == 0x3E0);
    // State-save area, Table B-2.
    assert!(vmcb_offset!(save.es) == 0x400);
    assert!(vmcb_offset!(save.cs) == 0x410);
    assert!(vmcb_offset!(save.ss) == 0x420);
    assert!(vmcb_offset!(save.ds) == 0x430);
    assert!(vmcb_offset!(save.fs) == 0x440);
    assert!(vmcb_offset!(save.gs) == 0x450);
    assert!(vmcb_offset!(save.gdtr) == 0x460);
    assert!(vmcb_offset!(save.ldtr) == 0x470);
    assert!(vmcb_offset!(save.idtr) == 0x480);
    assert!(vmcb_offset!(save.tr) == 0x490);
    assert!(vmcb_offset!(save.cpl) == 0x4CB);
    assert!(vmcb_offset!(save.efer) == 0x4D0);
    assert!(vmcb_offset!(save.cr4) == 0x548);
    assert!(vmcb_offset!(save.cr3) == 0x550);
    assert!(vmcb_offset!(save.cr0) == 0x558);
    assert!(vmcb_offset!(save.dr7) == 0x560);
    assert!(vmcb_offset!(save.dr6) == 0x568);
    assert!(vmcb_offset!(save.rflags) == 0x570);
    assert!(vmcb_offset!(save.rip) == 0x578);
    assert!(vmcb_offset!(save.rsp) == 0x5D8);
    assert!(vmcb_offset!(save.s_cet) == 0x5E0);
    assert!(vmcb_offset!(save.ssp) == 0x5E8);
    assert!(vmcb_offset!(save.isst_addr) == 0x5F0);
    assert!(vmcb_offset!(save.rax) == 0x5F8);
    assert!(vmcb_offset!(save.star) == 0x600);
    assert!(vmcb_offset!(save.lstar) == 0x608);
    assert!(vmcb_offset!(save.cstar) == 0x610);
    assert!(vmcb_offset!(save.sfmask) == 0x618);
    assert!(vmcb_offset!(save.kernel_gs_base) == 0x620);
    assert!(vmcb_offset!(save.sysenter_cs) == 0x628);
    assert!(vmcb_offset!(save.sysenter_esp) == 0x630);
    assert!(vmcb_offset!(save.sysenter_eip) == 0x638);
    assert!(vmcb_offset!(save.cr2) == 0x640);
    assert!(vmcb_offset!(save.g_pat) == 0x668);
    assert!(vmcb_offset!(save.dbgctl) == 0x670);
    assert!(vmcb_offset!(save.br_from) == 0x678);
    assert!(vmcb_offset!(save.br_to) == 0x680);
    assert!(vmcb_offset!(save.last_excp_from) == 0x688);
    assert!(vmcb_offset!(save.last_excp_to) == 0x690);
    assert!(vmcb_offset!(save.spec_ctrl) == 0x6E0);
};

bitflags! {
    /// Intercept vector 3, VMCB offset 0x00C (APM Vol. 2 Table B-1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct InterceptMisc1: u32 {
        const INTR = 1 << 0;
        const NMI = 1 << 1;
        const SMI = 1 << 2;
        const INIT = 1 << 3;
        const VINTR = 1 << 4;
        const CR0_SEL_WRITE = 1 << 5;
        const IDTR_READ = 1 << 6;
        const GDTR_READ = 1 << 7;
        const LDTR_READ = 1 << 8;
        const TR_READ = 1 << 9;
        const IDTR_WRITE = 1 << 10;
        const GDTR_WRITE = 1 << 11;
        const LDTR_WRITE = 1 << 12;
        const TR_WRITE = 1 << 13;
        const RDTSC = 1 << 14;
        const RDPMC = 1 << 15;
        const PUSHF = 1 << 16;
        const POPF = 1 << 17;
        const CPUID = 1 << 18;
        const RSM = 1 << 19;
        const IRET = 1 << 20;
        const INTN = 1 << 21;
        const INVD = 1 << 22;
        const PAUSE = 1 << 23;
        const HLT = 1 << 24;
        const INVLPG = 1 << 25;
        const INVLPGA = 1 << 26;
        /// Port I/O through the IOPM (§15.10).
        const IOIO_PROT = 1 << 27;
        /// RDMSR/WRMSR through the MSRPM (§15.11).
        const MSR_PROT = 1 << 28;
        const TASK_SWITCH = 1 << 29;
        const FERR_FREEZE = 1 << 30;
        /// Shutdown (triple fault) in the guest.
        const SHUTDOWN = 1 << 31;
    }
}

bitflags! {
    /// Intercept vector 4, VMCB offset 0x010 (APM Vol. 2 Table B-1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct InterceptMisc2: u32 {
        /// Mandatory: VMRUN fails with VMEXIT_INVALID when clear (§15.5.1).
        const VMRUN = 1 << 0;
        const VMMCALL = 1 << 1;
        const VMLOAD = 1 << 2;
        const VMSAVE = 1 << 3;
        const STGI = 1 << 4;
        const CLGI = 1 << 5;
        const SKINIT = 1 << 6;
        const RDTSCP = 1 << 7;
        const ICEBP = 1 << 8;
        const WBINVD = 1 << 9;
        const MONITOR = 1 << 10;
        const MWAIT = 1 << 11;
        const MWAIT_ARMED = 1 << 12;
        const XSETBV = 1 << 13;
        const RDPRU = 1 << 14;
        const EFER_WRITE_TRAP = 1 << 15;
    }
}

/// Bits of the V_INTR field at 0x060 (APM Vol. 2 §15.21.1, Table B-1).
pub mod vintr {
    pub const V_TPR_MASK: u64 = 0xFF;
    /// A virtual interrupt is pending.
    pub const V_IRQ: u64 = 1 << 8;
    pub const V_GIF: u64 = 1 << 9;
    pub const V_INTR_PRIO_SHIFT: u32 = 16;
    pub const V_INTR_PRIO_MASK: u64 = 0xF << V_INTR_PRIO_SHIFT;
    /// The pending virtual interrupt ignores the virtual TPR.
    pub const V_IGN_TPR: u64 = 1 << 20;
    /// Virtualize interrupt masking: the guest's RFLAGS.IF and TPR mask only virtual
    /// interrupts; physical ones are masked by the host's RFLAGS.IF (§15.21.1).
    pub const V_INTR_MASKING: u64 = 1 << 24;
    pub const V_GIF_ENABLE: u64 = 1 << 25;
    pub const AVIC_ENABLE: u64 = 1 << 31;
    pub const V_INTR_VECTOR_SHIFT: u32 = 32;
    pub const V_INTR_VECTOR_MASK: u64 = 0xFF << V_INTR_VECTOR_SHIFT;
}

/// TLB_CONTROL values (APM Vol. 2 §15.16.1).
/// VMCB clean bits (APM Vol. 2 §15.15.3, Table 15-9): a set bit tells the CPU the area is
/// unchanged since the last VMRUN of this VMCB on this CPU, so it may use a cached copy.
pub mod clean {
    /// Intercept vectors, TSC_OFFSET, pause filter count and threshold.
    pub const INTERCEPTS: u32 = 1 << 0;
    /// IOPM_BASE_PA, MSRPM_BASE_PA.
    pub const IOPM: u32 = 1 << 1;
    /// GUEST_ASID.
    pub const ASID: u32 = 1 << 2;
    /// V_TPR, V_IRQ, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING, V_INTR_VECTOR.
    pub const TPR: u32 = 1 << 3;
    /// NP_ENABLE, N_CR3, G_PAT.
    pub const NP: u32 = 1 << 4;
    /// CR0, CR3, CR4, EFER.
    pub const CRX: u32 = 1 << 5;
    /// DR6, DR7.
    pub const DRX: u32 = 1 << 6;
    /// GDTR, IDTR.
    pub const DT: u32 = 1 << 7;
    /// CS, DS, SS, ES (selector, base, limit, attributes), CPL.
    pub const SEG: u32 = 1 << 8;
    /// CR2.
    pub const CR2: u32 = 1 << 9;
    /// The areas Vireo tracks. The others (LBR, AVIC, CET, ...) are always reloaded.
    pub const TRACKED: u32 = INTERCEPTS | IOPM | ASID | TPR | NP | CRX | DRX | DT | SEG | CR2;
    /// Every area: a new VMCB, or one last run elsewhere.
    pub const ALL: u32 = u32::MAX;

    /// VMCB_CLEAN for an entry: the tracked areas not in `dirty` (changed since this
    /// VMCB's last VMRUN), none when the CPU has no clean bits or the VMCB's last VMRUN
    /// was not the last one on this CPU (`same_place` false: another CPU, or another
    /// VMCB ran here since).
    pub fn for_entry(cpu_has_clean_bits: bool, same_place: bool, dirty: u32) -> u32 {
        if cpu_has_clean_bits && same_place {
            TRACKED & !dirty
        } else {
            0
        }
    }
}

pub mod tlb_control {
    pub const DO_NOTHING: u8 = 0;
    /// Flush the entire TLB (all ASIDs, the host's included) at VMRUN.
    pub const FLUSH_ALL: u8 = 1;
    /// Flush this guest's ASID only (CPUID Fn8000_000A EDX FlushByAsid).
    pub const FLUSH_ASID: u8 = 3;
    /// Flush this guest's non-global entries only.
    pub const FLUSH_ASID_NON_GLOBAL: u8 = 7;
}

/// NP_ENABLE, bit 0 of the field at 0x090 (APM Vol. 2 §15.25.3).
pub const NP_ENABLE: u64 = 1 << 0;

/// Interrupt shadow, bit 0 of the field at 0x068 (APM Vol. 2 §15.21.5).
pub const INTERRUPT_SHADOW: u64 = 1 << 0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_apm_tables() {
        let v = Vmcb::zeroed();
        let base = &v as *const Vmcb as usize;
        assert_eq!(&v.control.exitcode as *const _ as usize - base, 0x70);
        assert_eq!(&v.save.rax as *const _ as usize - base, 0x5F8);
        assert_eq!(&v.save.g_pat as *const _ as usize - base, 0x668);
        assert_eq!(size_of::<Vmcb>(), 4096);
    }

    #[test]
    fn intercept_bits() {
        assert_eq!(InterceptMisc1::CPUID.bits(), 1 << 18);
        assert_eq!(InterceptMisc1::HLT.bits(), 1 << 24);
        assert_eq!(InterceptMisc1::IOIO_PROT.bits(), 1 << 27);
        assert_eq!(InterceptMisc1::MSR_PROT.bits(), 1 << 28);
        assert_eq!(InterceptMisc1::SHUTDOWN.bits(), 1 << 31);
        assert_eq!(InterceptMisc2::VMRUN.bits(), 1);
        assert_eq!(InterceptMisc2::XSETBV.bits(), 1 << 13);
        assert_eq!(InterceptMisc2::RDPRU.bits(), 1 << 14);
    }
}
