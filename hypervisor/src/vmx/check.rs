//! The main guest-state checks of VM entry (SDM Vol. 3C §27.3.1), run by Vireo itself
//! after an "invalid guest state" entry failure: the hardware only says *that* a check
//! failed, this says *which* one (first failing check wins).
//!
//! Pure: it checks a snapshot of the VMCS guest-state fields; unit-tested on the host.

use super::{
    controls::{entry, secondary},
    cr::{CrFixed, CR4_PCIDE},
    decode::intr,
};
use crate::vmm::state::{CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};

/// One segment register's guest fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegFields {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// VMX access rights (bit 16 = unusable).
    pub ar: u32,
}

/// Index of each segment in [`GuestSnapshot::segs`] (VMCS order).
pub const ES: usize = 0;
pub const CS: usize = 1;
pub const SS: usize = 2;
pub const DS: usize = 3;
pub const FS: usize = 4;
pub const GS: usize = 5;
pub const LDTR: usize = 6;
pub const TR: usize = 7;

/// The guest-state fields the checks look at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestSnapshot {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub dr7: u64,
    pub efer: u64,
    pub pat: u64,
    pub rflags: u64,
    pub rip: u64,
    pub segs: [SegFields; 8],
    pub gdtr_base: u64,
    pub gdtr_limit: u32,
    pub idtr_base: u64,
    pub idtr_limit: u32,
    pub interruptibility: u32,
    pub activity: u32,
    pub link_pointer: u64,
    pub entry_controls: u32,
    pub secondary_controls: u32,
    pub entry_intr_info: u32,
}

const AR_TYPE: u32 = 0xF;
const AR_S: u32 = 1 << 4;
const AR_P: u32 = 1 << 7;
const AR_L: u32 = 1 << 13;
const AR_DB: u32 = 1 << 14;
const AR_G: u32 = 1 << 15;
const AR_UNUSABLE: u32 = 1 << 16;
const AR_RESERVED: u32 = 0xF00 | 0xFFFE_0000;

const RFLAGS_VM: u64 = 1 << 17;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_RESERVED_0: u64 = !0x3F_FFFF | (1 << 15) | (1 << 5) | (1 << 3);

const fn dpl(ar: u32) -> u32 {
    (ar >> 5) & 3
}

const fn canonical(addr: u64) -> bool {
    let top = (addr as i64) >> 47;
    top == 0 || top == -1
}

/// Limit and granularity agree (SDM Vol. 3C §27.3.1.2): limit[11:0] not all ones needs
/// G = 0; limit[31:20] not all zeros needs G = 1.
const fn limit_matches_g(limit: u32, ar: u32) -> bool {
    let g = ar & AR_G != 0;
    !((limit & 0xFFF != 0xFFF && g) || (limit & 0xFFF0_0000 != 0 && !g))
}

const fn pat_ok(pat: u64) -> bool {
    let mut i = 0;
    while i < 8 {
        let t = (pat >> (i * 8)) & 0xFF;
        if !matches!(t, 0 | 1 | 4 | 5 | 6 | 7) {
            return false;
        }
        i += 1;
    }
    true
}

/// The first failing check, as text, or `None` if these checks pass.
pub fn check(s: &GuestSnapshot, fixed: &CrFixed) -> Option<&'static str> {
    let ug = s.secondary_controls & secondary::UNRESTRICTED_GUEST != 0;
    let fixed = CrFixed { unrestricted: ug, ..*fixed };
    let ia32e = s.entry_controls & entry::IA32E_MODE_GUEST != 0;
    let pe = s.cr0 & CR0_PE != 0;
    let v8086 = s.rflags & RFLAGS_VM != 0;

    // §27.3.1.1 control registers, debug registers, MSRs.
    if s.cr0 & fixed.cr0_must_be_one() != fixed.cr0_must_be_one() || s.cr0 & fixed.cr0_must_be_zero() != 0 {
        return Some("invalid guest state: CR0 violates IA32_VMX_CR0_FIXED0/FIXED1");
    }
    if s.cr0 & CR0_PG != 0 && !pe {
        return Some("invalid guest state: CR0.PG set with CR0.PE clear");
    }
    if s.cr4 & fixed.cr4_fixed0 != fixed.cr4_fixed0 || s.cr4 & !fixed.cr4_fixed1 != 0 {
        return Some("invalid guest state: CR4 violates IA32_VMX_CR4_FIXED0/FIXED1");
    }
    if s.entry_controls & entry::LOAD_DEBUG_CONTROLS != 0 && s.dr7 >> 32 != 0 {
        return Some("invalid guest state: DR7 bits 63:32 set");
    }
    if ia32e && (s.cr0 & CR0_PG == 0 || s.cr4 & CR4_PAE == 0) {
        return Some("invalid guest state: IA-32e mode guest without CR0.PG and CR4.PAE");
    }
    if !ia32e && s.cr4 & CR4_PCIDE != 0 {
        return Some("invalid guest state: CR4.PCIDE set outside IA-32e mode");
    }
    if s.entry_controls & entry::LOAD_PAT != 0 && !pat_ok(s.pat) {
        return Some("invalid guest state: IA32_PAT has an invalid memory type");
    }
    if s.entry_controls & entry::LOAD_EFER != 0 {
        if s.efer & !(1 | EFER_LME | EFER_LMA | (1 << 11)) != 0 {
            return Some("invalid guest state: IA32_EFER reserved bits set");
        }
        if (s.efer & EFER_LMA != 0) != ia32e {
            return Some("invalid guest state: EFER.LMA differs from the IA-32e mode guest entry control");
        }
        if s.cr0 & CR0_PG != 0 && (s.efer & EFER_LMA != 0) != (s.efer & EFER_LME != 0) {
            return Some("invalid guest state: EFER.LME differs from EFER.LMA with CR0.PG set");
        }
    }

    // §27.3.1.2 segment registers.
    let seg = |i: usize| s.segs[i];
    let usable = |i: usize| seg(i).ar & AR_UNUSABLE == 0;
    let cs = seg(CS);
    let ss = seg(SS);
    if seg(TR).selector & 4 != 0 {
        return Some("invalid guest state: TR selector TI flag set");
    }
    if usable(LDTR) && seg(LDTR).selector & 4 != 0 {
        return Some("invalid guest state: LDTR selector TI flag set");
    }
    if !v8086 && !ug && ss.selector & 3 != cs.selector & 3 {
        return Some("invalid guest state: SS.RPL differs from CS.RPL");
    }
    for (i, name) in [(TR, "TR"), (FS, "FS"), (GS, "GS"), (LDTR, "LDTR")] {
        if (i != LDTR || usable(LDTR)) && !canonical(seg(i).base) {
            return Some(match name {
                "TR" => "invalid guest state: TR base not canonical",
                "FS" => "invalid guest state: FS base not canonical",
                "GS" => "invalid guest state: GS base not canonical",
                _ => "invalid guest state: LDTR base not canonical",
            });
        }
    }
    if cs.base >> 32 != 0 {
        return Some("invalid guest state: CS base bits 63:32 set");
    }
    for i in [SS, DS, ES] {
        if usable(i) && seg(i).base >> 32 != 0 {
            return Some("invalid guest state: SS/DS/ES base bits 63:32 set");
        }
    }
    if v8086 {
        for i in [CS, SS, DS, ES, FS, GS] {
            let g = seg(i);
            if g.base != (g.selector as u64) << 4 || g.limit != 0xFFFF || g.ar != 0xF3 {
                return Some("invalid guest state: virtual-8086 segment not base=selector*16, limit=0xFFFF, AR=0xF3");
            }
        }
    } else {
        // CS.
        let cs_type = cs.ar & AR_TYPE;
        if !(matches!(cs_type, 9 | 11 | 13 | 15) || (ug && cs_type == 3)) {
            return Some(
                "invalid guest state: CS type must be accessed code (9, 11, 13, 15; 3 with unrestricted guest)",
            );
        }
        if cs.ar & AR_S == 0 || cs.ar & AR_P == 0 {
            return Some("invalid guest state: CS must be a present code/data segment (S=1, P=1)");
        }
        if cs.ar & AR_UNUSABLE != 0 {
            return Some("invalid guest state: CS unusable");
        }
        match cs_type {
            3 if dpl(cs.ar) != 0 => return Some("invalid guest state: CS type 3 needs DPL 0"),
            9 | 11 if usable(SS) && dpl(cs.ar) != dpl(ss.ar) => {
                return Some("invalid guest state: non-conforming CS DPL differs from SS DPL")
            }
            13 | 15 if usable(SS) && dpl(cs.ar) > dpl(ss.ar) => {
                return Some("invalid guest state: conforming CS DPL above SS DPL")
            }
            _ => {}
        }
        if cs.ar & AR_RESERVED != 0 {
            return Some("invalid guest state: CS access-rights reserved bits set");
        }
        if ia32e && cs.ar & AR_L != 0 && cs.ar & AR_DB != 0 {
            return Some("invalid guest state: CS.L and CS.D both set in IA-32e mode");
        }
        if !limit_matches_g(cs.limit, cs.ar) {
            return Some("invalid guest state: CS limit and granularity disagree");
        }
        // SS.
        if usable(SS) {
            if !matches!(ss.ar & AR_TYPE, 3 | 7) {
                return Some("invalid guest state: SS type must be read/write data (3 or 7)");
            }
            if ss.ar & AR_S == 0 || ss.ar & AR_P == 0 {
                return Some("invalid guest state: SS must be a present data segment (S=1, P=1)");
            }
            if ss.ar & AR_RESERVED != 0 {
                return Some("invalid guest state: SS access-rights reserved bits set");
            }
            if !limit_matches_g(ss.limit, ss.ar) {
                return Some("invalid guest state: SS limit and granularity disagree");
            }
        }
        if !ug && dpl(ss.ar) != (ss.selector & 3) as u32 {
            return Some("invalid guest state: SS DPL differs from SS.RPL");
        }
        if (cs_type == 3 || !pe) && dpl(ss.ar) != 0 {
            return Some("invalid guest state: SS DPL must be 0 in real mode or with CS type 3");
        }
        // DS, ES, FS, GS.
        for i in [DS, ES, FS, GS] {
            let g = seg(i);
            if !usable(i) {
                continue;
            }
            if g.ar & 1 == 0 {
                return Some("invalid guest state: DS/ES/FS/GS type not accessed");
            }
            if g.ar & 8 != 0 && g.ar & 2 == 0 {
                return Some("invalid guest state: DS/ES/FS/GS is execute-only code");
            }
            if g.ar & AR_S == 0 || g.ar & AR_P == 0 {
                return Some("invalid guest state: DS/ES/FS/GS must be present code/data (S=1, P=1)");
            }
            if g.ar & AR_RESERVED != 0 {
                return Some("invalid guest state: DS/ES/FS/GS access-rights reserved bits set");
            }
            if !limit_matches_g(g.limit, g.ar) {
                return Some("invalid guest state: DS/ES/FS/GS limit and granularity disagree");
            }
        }
    }
    // TR.
    let tr = seg(TR);
    let tr_type = tr.ar & AR_TYPE;
    if !(tr_type == 11 || (tr_type == 3 && !ia32e)) {
        return Some("invalid guest state: TR type must be a busy TSS (11; 3 outside IA-32e mode)");
    }
    if tr.ar & AR_S != 0 || tr.ar & AR_P == 0 || tr.ar & AR_UNUSABLE != 0 {
        return Some("invalid guest state: TR must be a usable, present system segment");
    }
    if tr.ar & AR_RESERVED != 0 || !limit_matches_g(tr.limit, tr.ar) {
        return Some("invalid guest state: TR access-rights reserved bits or limit/granularity");
    }
    // LDTR.
    if usable(LDTR) {
        let l = seg(LDTR);
        if l.ar & AR_TYPE != 2 || l.ar & AR_S != 0 || l.ar & AR_P == 0 {
            return Some("invalid guest state: LDTR must be a present LDT descriptor (type 2, S=0, P=1)");
        }
        if l.ar & AR_RESERVED != 0 || !limit_matches_g(l.limit, l.ar) {
            return Some("invalid guest state: LDTR access-rights reserved bits or limit/granularity");
        }
    }

    // §27.3.1.3 descriptor-table registers.
    if !canonical(s.gdtr_base) || !canonical(s.idtr_base) {
        return Some("invalid guest state: GDTR/IDTR base not canonical");
    }
    if s.gdtr_limit >> 16 != 0 || s.idtr_limit >> 16 != 0 {
        return Some("invalid guest state: GDTR/IDTR limit above 0xFFFF");
    }

    // §27.3.1.4 RIP and RFLAGS.
    if !(ia32e && cs.ar & AR_L != 0) && s.rip >> 32 != 0 {
        return Some("invalid guest state: RIP bits 63:32 set outside 64-bit mode");
    }
    if ia32e && cs.ar & AR_L != 0 && !canonical(s.rip) {
        return Some("invalid guest state: RIP not canonical");
    }
    if s.rflags & RFLAGS_RESERVED_0 != 0 || s.rflags & 2 == 0 {
        return Some("invalid guest state: RFLAGS reserved bits (bit 1 must be 1; 3, 5, 15, 63:22 must be 0)");
    }
    if (ia32e || !pe) && v8086 {
        return Some("invalid guest state: RFLAGS.VM set in IA-32e mode or real mode");
    }
    let injecting = s.entry_intr_info & intr::VALID != 0;
    let inject_type = intr::kind(s.entry_intr_info);
    if injecting && inject_type == intr::TYPE_EXTERNAL && s.rflags & RFLAGS_IF == 0 {
        return Some("invalid guest state: injecting an external interrupt with RFLAGS.IF clear");
    }

    // §27.3.1.5 non-register state.
    if s.activity > 3 {
        return Some("invalid guest state: activity state not 0-3");
    }
    if s.activity == 1 && dpl(ss.ar) != 0 {
        return Some("invalid guest state: HLT activity state with SS.DPL != 0");
    }
    let sti = s.interruptibility & 1 != 0;
    let mov_ss = s.interruptibility & 2 != 0;
    if s.interruptibility & !0x1F != 0 {
        return Some("invalid guest state: interruptibility state reserved bits set");
    }
    if sti && mov_ss {
        return Some("invalid guest state: blocking by STI and by MOV SS both set");
    }
    if sti && s.rflags & RFLAGS_IF == 0 {
        return Some("invalid guest state: blocking by STI with RFLAGS.IF clear");
    }
    if injecting && matches!(inject_type, intr::TYPE_EXTERNAL | intr::TYPE_NMI) && (sti || mov_ss) {
        return Some("invalid guest state: injecting an interrupt or NMI inside an STI/MOV SS shadow");
    }
    if s.link_pointer != !0 {
        return Some("invalid guest state: VMCS link pointer is not FFFFFFFF_FFFFFFFFH");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::state::{CpuState, DescriptorTable, Segment, CR0_NE, RFLAGS_IF};

    const FIXED: CrFixed = CrFixed {
        cr0_fixed0: 0x8000_0021,
        cr0_fixed1: 0xFFFF_FFFF,
        cr4_fixed0: 0x2000,
        cr4_fixed1: 0x3767FF,
        unrestricted: true,
    };

    fn fields(s: &Segment) -> SegFields {
        SegFields { selector: s.selector, base: s.base, limit: s.limit, ar: s.attr.to_vmx(s.unusable) }
    }

    /// The snapshot `load_state` would produce from the 64-bit flat state.
    fn long_mode() -> GuestSnapshot {
        let st = CpuState::long_mode_flat(0x10_0000, 0x8000, 0x1000, DescriptorTable { base: 0x5000, limit: 0x27 });
        GuestSnapshot {
            cr0: FIXED.cr0_real(st.cr0),
            cr3: st.cr3,
            cr4: FIXED.cr4_real(st.cr4),
            dr7: st.dr7,
            efer: st.efer,
            pat: st.pat,
            rflags: st.rflags,
            rip: st.rip,
            segs: [
                fields(&st.es),
                fields(&st.cs),
                fields(&st.ss),
                fields(&st.ds),
                fields(&st.fs),
                fields(&st.gs),
                fields(&st.ldtr),
                fields(&st.tr),
            ],
            gdtr_base: st.gdtr.base,
            gdtr_limit: st.gdtr.limit as u32,
            idtr_base: st.idtr.base,
            idtr_limit: st.idtr.limit as u32,
            interruptibility: 0,
            activity: 0,
            link_pointer: !0,
            entry_controls: entry::LOAD_EFER | entry::LOAD_PAT | entry::IA32E_MODE_GUEST,
            secondary_controls: secondary::ENABLE_EPT | secondary::UNRESTRICTED_GUEST,
            entry_intr_info: 0,
        }
    }

    /// Real mode at the reset vector (unrestricted guest).
    fn real_mode() -> GuestSnapshot {
        let seg = |sel: u16, base: u64, ty: u32| SegFields { selector: sel, base, limit: 0xFFFF, ar: 0x90 | ty };
        let data = seg(0, 0, 3);
        GuestSnapshot {
            cr0: 0x10 | CR0_NE,
            cr4: 0x2000,
            dr7: 0x400,
            pat: crate::vmm::state::PAT_POWER_ON,
            rflags: 2,
            rip: 0xFFF0,
            segs: [
                data,
                seg(0xF000, 0xFFFF_0000, 0xB),
                data,
                data,
                data,
                data,
                SegFields { selector: 0, base: 0, limit: 0xFFFF, ar: 0x82 },
                SegFields { selector: 0, base: 0, limit: 0xFFFF, ar: 0x8B },
            ],
            gdtr_limit: 0xFFFF,
            idtr_limit: 0xFFFF,
            link_pointer: !0,
            entry_controls: entry::LOAD_EFER | entry::LOAD_PAT,
            secondary_controls: secondary::ENABLE_EPT | secondary::UNRESTRICTED_GUEST,
            ..GuestSnapshot::default()
        }
    }

    #[test]
    fn valid_states_pass() {
        assert_eq!(check(&long_mode(), &FIXED), None);
        assert_eq!(check(&real_mode(), &FIXED), None);
    }

    #[test]
    fn control_register_failures_are_named() {
        let mut s = long_mode();
        s.cr0 &= !CR0_NE;
        assert_eq!(check(&s, &FIXED), Some("invalid guest state: CR0 violates IA32_VMX_CR0_FIXED0/FIXED1"));
        let mut s = real_mode();
        s.cr4 = 0;
        assert_eq!(check(&s, &FIXED), Some("invalid guest state: CR4 violates IA32_VMX_CR4_FIXED0/FIXED1"));
        let mut s = long_mode();
        s.entry_controls &= !entry::IA32E_MODE_GUEST;
        assert_eq!(
            check(&s, &FIXED),
            Some("invalid guest state: EFER.LMA differs from the IA-32e mode guest entry control")
        );
        // Without unrestricted guest, real mode violates the CR0 fixed bits.
        let mut s = real_mode();
        s.secondary_controls = secondary::ENABLE_EPT;
        assert_eq!(check(&s, &FIXED), Some("invalid guest state: CR0 violates IA32_VMX_CR0_FIXED0/FIXED1"));
    }

    #[test]
    fn segment_failures_are_named() {
        let mut s = long_mode();
        s.segs[CS].ar &= !1; // not accessed
        assert!(check(&s, &FIXED).unwrap().contains("CS type"));
        let mut s = long_mode();
        s.segs[TR].ar = (s.segs[TR].ar & !0xF) | 9; // available, not busy
        assert!(check(&s, &FIXED).unwrap().contains("TR type"));
        let mut s = long_mode();
        s.segs[TR].ar |= AR_UNUSABLE;
        assert!(check(&s, &FIXED).unwrap().contains("TR must be"));
        let mut s = long_mode();
        s.segs[CS].ar |= AR_DB;
        assert!(check(&s, &FIXED).unwrap().contains("CS.L and CS.D"));
        let mut s = long_mode();
        s.segs[DS].ar &= !AR_G; // a 4 GiB limit needs G = 1
        assert!(check(&s, &FIXED).unwrap().contains("limit and granularity"));
        let mut s = long_mode();
        s.segs[GS].base = 0x0000_8000_0000_0000;
        assert_eq!(check(&s, &FIXED), Some("invalid guest state: GS base not canonical"));
        // An unusable DS may hold anything.
        let mut s = long_mode();
        s.segs[DS] = SegFields { selector: 0, base: 0, limit: 0, ar: AR_UNUSABLE };
        assert_eq!(check(&s, &FIXED), None);
    }

    #[test]
    fn rip_rflags_and_interruptibility() {
        let mut s = real_mode();
        s.rip = 1 << 32;
        assert!(check(&s, &FIXED).unwrap().contains("RIP bits 63:32"));
        let mut s = long_mode();
        s.rflags = 0;
        assert!(check(&s, &FIXED).unwrap().contains("RFLAGS reserved"));
        let mut s = long_mode();
        s.interruptibility = 1;
        assert_eq!(check(&s, &FIXED), Some("invalid guest state: blocking by STI with RFLAGS.IF clear"));
        s.rflags |= RFLAGS_IF;
        s.entry_intr_info = intr::VALID | 0x20;
        assert!(check(&s, &FIXED).unwrap().contains("STI/MOV SS shadow"));
        let mut s = long_mode();
        s.entry_intr_info = intr::VALID | 0x20;
        assert!(check(&s, &FIXED).unwrap().contains("RFLAGS.IF clear"));
        let mut s = long_mode();
        s.link_pointer = 0;
        assert!(check(&s, &FIXED).unwrap().contains("link pointer"));
        let mut s = long_mode();
        s.pat = 0x02;
        assert!(check(&s, &FIXED).unwrap().contains("IA32_PAT"));
    }
}
