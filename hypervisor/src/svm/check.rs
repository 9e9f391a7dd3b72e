//! VMRUN's consistency checks (APM Vol. 2 §15.5.1 "Canonicalization and Consistency
//! Checks"), run by Vireo on a VMCB the CPU refused with VMEXIT_INVALID, to name the
//! failing one. The hardware reports only "invalid"; this turns it into readable text.
//!
//! The APM's list comes first, in its order; then checks emulators and CPUs are known to
//! make beyond it (Bochs: G_PAT, N_CR3, CS.L with CS.D in any mode).

use super::{
    event,
    vmcb::{InterceptMisc2, Vmcb, NP_ENABLE},
};
use crate::vmm::state::{CR0_PE, CR0_PG, CR4_PAE, EFER_LME, EFER_SVME};

const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;

/// CR3 bits 63:52 are reserved in every paging mode (APM Vol. 2 §3.1.2); bits between
/// the CPU's physical-address width and 51 are too, but that width is not known here.
const CR3_MBZ: u64 = 0xFFF0_0000_0000_0000;

/// CR4 bits that are reserved on every AMD CPU (APM Vol. 2 §3.1.3): 63:32, and 15, 14, 13
/// (VMXE and SMXE are Intel's). Bits newer CPUs define (LA57, CET, PKE ...) are left out,
/// so this never blames a bit some CPU accepts.
const CR4_MBZ: u64 = 0xFFFF_FFFF_0000_0000 | (1 << 15) | (1 << 14) | (1 << 13);

/// EFER bits reserved on every AMD CPU (APM Vol. 2 §3.1.7): 63:32, 7:1, 9 and 16.
const EFER_MBZ: u64 = 0xFFFF_FFFF_0000_0000 | 0xFE | (1 << 9) | (1 << 16);

/// S_CET bits 9:6 are reserved (APM Vol. 2 §18.3.2).
const S_CET_MBZ: u64 = 0x3C0;

/// Bits 63:52 of a physical address are beyond any x86-64 CPU's physical-address width.
const PHYS_LIMIT: u64 = 1 << 52;
const IOPM_SIZE: u64 = 3 * 4096;
const MSRPM_SIZE: u64 = 2 * 4096;

/// Segment attribute bits in the VMCB's packed form (see `vmm::state::SegAttr`).
const ATTR_L: u16 = 1 << 9;
const ATTR_D: u16 = 1 << 10;

/// Returns the first consistency check `vmcb` fails, as text, or `None` if it passes all
/// the checks Vireo knows.
pub fn first_failure(vmcb: &Vmcb) -> Option<&'static str> {
    let s = &vmcb.save;
    let c = &vmcb.control;
    let lme_pg = s.efer & EFER_LME != 0 && s.cr0 & CR0_PG != 0;
    let cs_l = s.cs.attrib & ATTR_L != 0;
    let cs_d = s.cs.attrib & ATTR_D != 0;
    let checks: [(bool, &'static str); 21] = [
        (s.efer & EFER_SVME == 0, "guest EFER.SVME is clear (APM §15.5.1)"),
        (s.cr0 & CR0_CD == 0 && s.cr0 & CR0_NW != 0, "guest CR0.NW is set while CR0.CD is clear (APM §15.5.1)"),
        (s.cr0 >> 32 != 0, "guest CR0[63:32] is not zero (APM §15.5.1)"),
        (s.cr3 & CR3_MBZ != 0, "guest CR3 has must-be-zero bits set (63:52) (APM §15.5.1)"),
        (s.cr4 & CR4_MBZ != 0, "guest CR4 has must-be-zero bits set (APM §15.5.1)"),
        (s.dr6 >> 32 != 0, "guest DR6[63:32] is not zero (APM §15.5.1)"),
        (s.dr7 >> 32 != 0, "guest DR7[63:32] is not zero (APM §15.5.1)"),
        (s.efer & EFER_MBZ != 0, "guest EFER has must-be-zero bits set (APM §15.5.1)"),
        (lme_pg && s.cr4 & CR4_PAE == 0, "guest EFER.LME and CR0.PG are set but CR4.PAE is clear (APM §15.5.1)"),
        (lme_pg && s.cr0 & CR0_PE == 0, "guest EFER.LME and CR0.PG are set but CR0.PE is clear (APM §15.5.1)"),
        (
            lme_pg && s.cr4 & CR4_PAE != 0 && cs_l && cs_d,
            "guest EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D are all set (APM §15.5.1)",
        ),
        (c.intercept_misc2 & InterceptMisc2::VMRUN.bits() == 0, "the VMRUN intercept is clear (APM §15.5.1)"),
        (
            (c.iopm_base_pa & !0xFFF).saturating_add(IOPM_SIZE) > PHYS_LIMIT,
            "the IOPM extends beyond the maximum physical address (APM §15.5.1)",
        ),
        (
            (c.msrpm_base_pa & !0xFFF).saturating_add(MSRPM_SIZE) > PHYS_LIMIT,
            "the MSRPM extends beyond the maximum physical address (APM §15.5.1)",
        ),
        (
            event::is_illegal(c.eventinj),
            "EVENTINJ holds an illegal injection: reserved type, or exception vector 2 or above 31 (APM §15.20)",
        ),
        (c.guest_asid == 0, "guest ASID is 0, the host's (APM §15.5.1)"),
        (s.s_cet & S_CET_MBZ != 0, "guest S_CET has reserved bits set (APM §15.5.1)"),
        (
            c.np_enable & NP_ENABLE != 0 && c.n_cr3 & CR3_MBZ != 0,
            "N_CR3 has bits beyond the physical-address width set (APM §15.25.3)",
        ),
        (c.np_enable & NP_ENABLE != 0 && !pat_valid(s.g_pat), "G_PAT holds a reserved memory type (APM §15.25.8)"),
        (cs_l && cs_d, "guest CS.L and CS.D are both set (refused in any mode by Bochs)"),
        (!matches!(c.tlb_control, 0 | 1 | 3 | 7), "TLB_CONTROL holds a reserved value (APM §15.16.1)"),
    ];
    checks.iter().find(|(failed, _)| *failed).map(|(_, text)| *text)
}

/// Text for a VMEXIT_INVALID: the failing check, or a note that none was found.
pub fn explain_invalid(vmcb: &Vmcb) -> &'static str {
    first_failure(vmcb)
        .unwrap_or("VMRUN failed (VMEXIT_INVALID) though the VMCB passes every consistency check Vireo knows")
}

/// Every byte of a PAT holds a defined memory type: UC 0, WC 1, WT 4, WP 5, WB 6, UC- 7
/// (APM Vol. 2 §7.8.1).
fn pat_valid(pat: u64) -> bool {
    pat.to_le_bytes().iter().all(|&t| matches!(t, 0 | 1 | 4 | 5 | 6 | 7))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::state::{CpuState, DescriptorTable, EFER_LMA, PAT_POWER_ON};

    /// A VMCB as Vireo builds it for a 64-bit guest: passes every check.
    fn good() -> Vmcb {
        let st = CpuState::long_mode_flat(0x1000, 0x8000, 0x10_0000, DescriptorTable { base: 0x5000, limit: 0x27 });
        let mut v = Vmcb::zeroed();
        v.save.efer = st.efer | EFER_SVME;
        v.save.cr0 = st.cr0;
        v.save.cr3 = st.cr3;
        v.save.cr4 = st.cr4;
        v.save.dr6 = 0xFFFF_0FF0;
        v.save.dr7 = st.dr7;
        v.save.g_pat = PAT_POWER_ON;
        v.save.cs.attrib = st.cs.attr.0;
        v.control.intercept_misc2 = InterceptMisc2::VMRUN.bits();
        v.control.iopm_base_pa = 0x20_0000;
        v.control.msrpm_base_pa = 0x20_3000;
        v.control.guest_asid = 1;
        v.control.np_enable = NP_ENABLE;
        v.control.n_cr3 = 0x30_0000;
        v.control.tlb_control = 1;
        v
    }

    fn fails(f: impl FnOnce(&mut Vmcb)) -> &'static str {
        let mut v = good();
        f(&mut v);
        first_failure(&v).expect("expected a failing check")
    }

    #[test]
    fn good_vmcb_passes() {
        assert_eq!(first_failure(&good()), None);
        assert!(explain_invalid(&good()).contains("passes every consistency check"));
    }

    #[test]
    fn each_check_is_named() {
        assert_eq!(fails(|v| v.save.efer &= !EFER_SVME), "guest EFER.SVME is clear (APM §15.5.1)");
        assert!(fails(|v| v.save.cr0 |= CR0_NW).starts_with("guest CR0.NW is set while CR0.CD is clear"));
        assert_eq!(
            first_failure(&{
                let mut v = good();
                v.save.cr0 |= CR0_NW | CR0_CD;
                v
            }),
            None,
            "CD=1 NW=1 is legal"
        );
        assert!(fails(|v| v.save.cr0 |= 1 << 40).starts_with("guest CR0[63:32]"));
        assert!(fails(|v| v.save.cr3 |= 1 << 60).starts_with("guest CR3 has must-be-zero"));
        assert!(fails(|v| v.save.cr4 |= 1 << 13).starts_with("guest CR4 has must-be-zero"));
        assert!(fails(|v| v.save.dr6 |= 1 << 32).starts_with("guest DR6[63:32]"));
        assert!(fails(|v| v.save.dr7 |= 1 << 63).starts_with("guest DR7[63:32]"));
        assert!(fails(|v| v.save.efer |= 1 << 2).starts_with("guest EFER has must-be-zero"));
        assert!(fails(|v| v.save.cr4 &= !CR4_PAE).starts_with("guest EFER.LME and CR0.PG are set but CR4.PAE"));
        assert!(fails(|v| v.save.cr0 &= !CR0_PE).starts_with("guest EFER.LME and CR0.PG are set but CR0.PE"));
        assert!(fails(|v| v.save.cs.attrib |= ATTR_D).starts_with("guest EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D"));
        assert_eq!(fails(|v| v.control.intercept_misc2 = 0), "the VMRUN intercept is clear (APM §15.5.1)");
        assert!(fails(|v| v.control.iopm_base_pa = PHYS_LIMIT - 0x1000).starts_with("the IOPM extends"));
        assert!(fails(|v| v.control.msrpm_base_pa = u64::MAX).starts_with("the MSRPM extends"));
        assert!(fails(|v| v.control.eventinj = event::VALID | (3 << 8) | 2).starts_with("EVENTINJ holds an illegal"));
        assert_eq!(fails(|v| v.control.guest_asid = 0), "guest ASID is 0, the host's (APM §15.5.1)");
        assert!(fails(|v| v.save.s_cet = 1 << 6).starts_with("guest S_CET"));
        assert!(fails(|v| v.control.n_cr3 |= 1 << 55).starts_with("N_CR3"));
        assert!(fails(|v| v.save.g_pat = 0x0007_0406_0007_0402).starts_with("G_PAT"));
        assert!(fails(|v| v.control.tlb_control = 2).starts_with("TLB_CONTROL"));
        // CS.L with CS.D outside long mode: only the Bochs-observed check names it.
        assert!(fails(|v| {
            v.save.efer &= !(EFER_LME | EFER_LMA);
            v.save.cs.attrib |= ATTR_D;
        })
        .contains("CS.L and CS.D are both set"));
    }

    #[test]
    fn first_failure_wins() {
        // SVME clear and ASID 0: the APM's order names SVME first.
        assert!(fails(|v| {
            v.control.guest_asid = 0;
            v.save.efer = 0;
        })
        .contains("SVME"));
    }

    #[test]
    fn pat_types() {
        assert!(pat_valid(PAT_POWER_ON));
        assert!(pat_valid(0x0706_0504_0100_0706));
        assert!(!pat_valid(0x0000_0000_0000_0002));
        assert!(!pat_valid(0x0800_0000_0000_0000));
    }
}
