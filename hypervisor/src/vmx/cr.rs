//! CR0/CR4 under VMX: the fixed bits (IA32_VMX_CR0_FIXED0/1, CR4_FIXED0/1; SDM Vol. 3D
//! App. A.7-A.8), the guest/host masks and read shadows that let the guest see its own
//! values while the real registers keep the fixed bits (SDM Vol. 3C §25.6.6), and the
//! emulation of the MOV-to-CR exits the masks cause (SDM Vol. 3C §27.1.3, and the MOV CR,
//! CLTS and LMSW pages of Vol. 2 for the faults the guest must see).
//!
//! Pure logic: unit-tested on the host.

use crate::vmm::state::{CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};

pub const CR0_TS: u64 = 1 << 3;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PGE: u64 = 1 << 7;
pub const CR4_VMXE: u64 = 1 << 13;
pub const CR4_SMXE: u64 = 1 << 14;
/// CR4 bits a guest may never set: VMX and SMX are not offered to guests (CPUID hides
/// them), so setting either is refused with #GP as on a CPU without the feature.
pub const CR4_HIDDEN: u64 = CR4_VMXE | CR4_SMXE;
pub const CR4_PCIDE: u64 = 1 << 17;
pub const CR4_SMEP: u64 = 1 << 20;
const HIGH_32: u64 = 0xFFFF_FFFF_0000_0000;
/// CR0 bits the guest may set in its view but never in the real register.
pub const CR0_ALWAYS_OFF: u64 = CR0_CD | CR0_NW;

/// The CPU's fixed CR0/CR4 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrFixed {
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    /// "Unrestricted guest" is on: CR0.PE and CR0.PG are free in VMX non-root operation
    /// (SDM Vol. 3C §27.3.1.1).
    pub unrestricted: bool,
}

impl CrFixed {
    /// CR0 bits that must be 1 while the guest runs.
    pub const fn cr0_must_be_one(&self) -> u64 {
        let freed = if self.unrestricted { CR0_PE | CR0_PG } else { 0 };
        self.cr0_fixed0 & !freed
    }

    /// CR0 bits that must be 0 (bits 63:32 among them).
    pub const fn cr0_must_be_zero(&self) -> u64 {
        !self.cr0_fixed1
    }

    /// The real CR0 for a guest that wants `guest`. CD and NW never reach the real
    /// register (as in KVM): a guest that disables its caches would otherwise slow the
    /// whole CPU down while it runs; EPT memory types stay in charge.
    pub const fn cr0_real(&self, guest: u64) -> u64 {
        (guest | self.cr0_must_be_one()) & self.cr0_fixed1 & !CR0_ALWAYS_OFF
    }

    /// The CR0 guest/host mask: the fixed bits (the guest may believe otherwise), CD/NW
    /// (kept off in the real register) and PG, whose toggles switch EFER.LMA and the
    /// IA-32e mode entry control.
    pub const fn cr0_mask(&self) -> u64 {
        self.cr0_must_be_one() | self.cr0_must_be_zero() | CR0_PG | CR0_NE | CR0_ALWAYS_OFF
    }

    /// CR4 bits that must be 1 (VMXE at least).
    pub const fn cr4_must_be_one(&self) -> u64 {
        self.cr4_fixed0 | CR4_VMXE
    }

    /// The real CR4 for a guest that wants `guest`.
    pub const fn cr4_real(&self, guest: u64) -> u64 {
        (guest | self.cr4_must_be_one()) & self.cr4_fixed1
    }

    /// The CR4 guest/host mask: the fixed-1 bits (VMXE, hidden from the guest), SMXE and
    /// every bit the CPU does not allow, so setting one exits and is refused with #GP.
    pub const fn cr4_mask(&self) -> u64 {
        self.cr4_must_be_one() | CR4_HIDDEN | !self.cr4_fixed1
    }

    /// The host's CR0 adjusted for VMXON.
    pub const fn host_cr0(&self, cr0: u64) -> u64 {
        (cr0 | self.cr0_fixed0) & self.cr0_fixed1
    }

    /// The host's CR4 adjusted for VMXON (VMXE set).
    pub const fn host_cr4(&self, cr4: u64) -> u64 {
        (cr4 | self.cr4_fixed0 | CR4_VMXE) & self.cr4_fixed1
    }
}

/// What the guest reads: host-owned (masked) bits from the shadow, the rest from the real
/// register.
pub const fn guest_view(real: u64, shadow: u64, mask: u64) -> u64 {
    (real & !mask) | (shadow & mask)
}

/// A control-register access exit, decoded (SDM Vol. 3C §28.2.1, Table 28-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    MovTo { cr: u8, gpr: u8 },
    MovFrom { cr: u8, gpr: u8 },
    Clts,
    Lmsw { source: u16 },
}

impl CrAccess {
    pub const fn decode(qualification: u64) -> Self {
        let cr = (qualification & 0xF) as u8;
        let gpr = ((qualification >> 8) & 0xF) as u8;
        match (qualification >> 4) & 3 {
            0 => CrAccess::MovTo { cr, gpr },
            1 => CrAccess::MovFrom { cr, gpr },
            2 => CrAccess::Clts,
            _ => CrAccess::Lmsw { source: (qualification >> 16) as u16 },
        }
    }
}

/// The guest must get #GP(0) instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpFault(pub &'static str);

/// The guest-visible state a CR write is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrContext {
    /// Guest-visible CR0 and CR4 before the write.
    pub cr0: u64,
    pub cr4: u64,
    pub cr3: u64,
    pub efer: u64,
    /// CS.L: the guest runs 64-bit code.
    pub cs_long: bool,
}

/// The result of an emulated write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrWrite {
    /// Real value for the VMCS guest field.
    pub real: u64,
    /// Guest view for the read shadow.
    pub shadow: u64,
    /// New guest EFER (LMA follows CR0.PG when EFER.LME is set).
    pub efer: u64,
    /// PAE paging (not IA-32e) is in force and the write reloads the PDPTEs.
    pub load_pdptes: bool,
    /// The write changed something that flushes the guest's TLB.
    pub flush_tlb: bool,
}

/// PAE paging without IA-32e mode: the PDPTEs live in the VMCS (SDM Vol. 3C §27.3.2.4).
pub const fn pae_paging(cr0: u64, cr4: u64, efer: u64) -> bool {
    cr0 & CR0_PG != 0 && cr4 & CR4_PAE != 0 && efer & EFER_LMA == 0
}

/// MOV to CR0 (also the result of CLTS and LMSW).
pub fn write_cr0(fixed: &CrFixed, ctx: &CrContext, value: u64) -> Result<CrWrite, GpFault> {
    let old = ctx.cr0;
    if value & HIGH_32 != 0 {
        return Err(GpFault("CR0 bits 63:32 are reserved"));
    }
    if value & CR0_PG != 0 && value & CR0_PE == 0 {
        return Err(GpFault("CR0.PG without CR0.PE"));
    }
    if value & CR0_NW != 0 && value & CR0_CD == 0 {
        return Err(GpFault("CR0.NW without CR0.CD"));
    }
    let pg_on = old & CR0_PG == 0 && value & CR0_PG != 0;
    let pg_off = old & CR0_PG != 0 && value & CR0_PG == 0;
    let mut efer = ctx.efer;
    if pg_on && efer & EFER_LME != 0 {
        if ctx.cr4 & CR4_PAE == 0 {
            return Err(GpFault("IA-32e mode activation with CR4.PAE clear"));
        }
        efer |= EFER_LMA;
    }
    if pg_off {
        if efer & EFER_LMA != 0 && ctx.cs_long {
            return Err(GpFault("CR0.PG cleared in 64-bit mode"));
        }
        if ctx.cr4 & CR4_PCIDE != 0 {
            return Err(GpFault("CR0.PG cleared with CR4.PCIDE set"));
        }
        efer &= !EFER_LMA;
    }
    let changed = old ^ value;
    Ok(CrWrite {
        real: fixed.cr0_real(value),
        shadow: value,
        efer,
        load_pdptes: pae_paging(value, ctx.cr4, efer) && changed & (CR0_PG | CR0_CD | CR0_NW) != 0,
        flush_tlb: changed & (CR0_PG | CR0_PE | (1 << 16)) != 0,
    })
}

/// CLTS: clears CR0.TS.
pub fn clts(fixed: &CrFixed, ctx: &CrContext) -> Result<CrWrite, GpFault> {
    write_cr0(fixed, ctx, ctx.cr0 & !CR0_TS)
}

/// LMSW: loads CR0 bits 3:0 (PE, MP, EM, TS) but cannot clear PE.
pub fn lmsw(fixed: &CrFixed, ctx: &CrContext, source: u16) -> Result<CrWrite, GpFault> {
    let value = (ctx.cr0 & !0xF) | (source as u64 & 0xF) | (ctx.cr0 & CR0_PE);
    write_cr0(fixed, ctx, value)
}

/// MOV to CR4.
pub fn write_cr4(fixed: &CrFixed, ctx: &CrContext, value: u64) -> Result<CrWrite, GpFault> {
    let old = ctx.cr4;
    if value & CR4_HIDDEN != 0 {
        return Err(GpFault("CR4.VMXE/SMXE: VMX and SMX are not offered to guests"));
    }
    if value & !fixed.cr4_fixed1 != 0 {
        return Err(GpFault("CR4 bit not supported by the CPU"));
    }
    let lma = ctx.efer & EFER_LMA != 0;
    if lma && value & CR4_PAE == 0 {
        return Err(GpFault("CR4.PAE cleared in IA-32e mode"));
    }
    if old & CR4_PCIDE == 0 && value & CR4_PCIDE != 0 && (!lma || ctx.cr3 & 0xFFF != 0) {
        return Err(GpFault("CR4.PCIDE set outside IA-32e mode or with CR3[11:0] != 0"));
    }
    let changed = old ^ value;
    Ok(CrWrite {
        real: fixed.cr4_real(value),
        shadow: value,
        efer: ctx.efer,
        load_pdptes: pae_paging(ctx.cr0, value, ctx.efer) && changed & (CR4_PAE | CR4_PSE | CR4_PGE | CR4_SMEP) != 0,
        flush_tlb: changed & (CR4_PAE | CR4_PSE | CR4_PGE | CR4_PCIDE | CR4_SMEP) != 0,
    })
}

/// Bits that must be 0 in a present PAE PDPTE (SDM Vol. 3A §4.4.1): 2:1, 8:5 and those
/// above the physical-address width.
pub const fn pdpte_reserved(entry: u64, phys_bits: u8) -> bool {
    let high = if phys_bits >= 52 { 0 } else { !((1u64 << phys_bits) - 1) };
    entry & 1 != 0 && entry & (0b110 | 0b1_1110_0000 | high) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::state::{CR0_ET, CR0_MP, CR0_WP, EFER_NXE, EFER_SCE};

    /// Skylake-like values.
    const FIXED: CrFixed = CrFixed {
        cr0_fixed0: 0x8000_0021,
        cr0_fixed1: 0xFFFF_FFFF,
        cr4_fixed0: 0x2000,
        cr4_fixed1: 0x3767FF,
        unrestricted: true,
    };

    fn ctx(cr0: u64, cr4: u64, efer: u64) -> CrContext {
        CrContext { cr0, cr4, cr3: 0x1000, efer, cs_long: false }
    }

    #[test]
    fn fixed_bits_with_and_without_unrestricted_guest() {
        assert_eq!(FIXED.cr0_must_be_one(), CR0_NE);
        let restricted = CrFixed { unrestricted: false, ..FIXED };
        assert_eq!(restricted.cr0_must_be_one(), CR0_PE | CR0_NE | CR0_PG);
        // Real mode guest: only NE is forced on.
        assert_eq!(FIXED.cr0_real(0x10), 0x30);
        assert_eq!(restricted.cr0_real(0x10), 0x8000_0031);
        assert_eq!(FIXED.cr0_must_be_zero(), HIGH_32);
        assert_eq!(FIXED.cr0_mask(), CR0_NE | CR0_PG | CR0_CD | CR0_NW | HIGH_32);
        // Reset CR0 (CD, NW, ET): caches stay on in the real register.
        assert_eq!(FIXED.cr0_real(0x6000_0010), 0x30);
        assert_eq!(guest_view(0x30, 0x6000_0010, FIXED.cr0_mask()), 0x6000_0010);
        assert_eq!(FIXED.cr4_real(CR4_PAE), CR4_PAE | CR4_VMXE);
        // Bits the CPU lacks are masked so the guest's attempt exits.
        assert_eq!(FIXED.cr4_mask() & CR4_VMXE, CR4_VMXE);
        assert_eq!(FIXED.cr4_mask() & (1 << 22), 1 << 22);
        assert_eq!(FIXED.cr4_mask() & CR4_PAE, 0);
        assert_eq!(FIXED.host_cr4(0x20), 0x2020);
        assert_eq!(FIXED.host_cr0(0x8000_0011), 0x8000_0031);
    }

    #[test]
    fn guest_sees_its_own_values() {
        let guest_cr0 = CR0_ET | CR0_PE; // NE clear, as after a legacy reset sequence
        let real = FIXED.cr0_real(guest_cr0);
        assert_eq!(real & CR0_NE, CR0_NE);
        assert_eq!(guest_view(real, guest_cr0, FIXED.cr0_mask()), guest_cr0);
        let guest_cr4 = CR4_PAE;
        assert_eq!(guest_view(FIXED.cr4_real(guest_cr4), guest_cr4, FIXED.cr4_mask()), guest_cr4);
    }

    #[test]
    fn enabling_paging_with_lme_activates_long_mode() {
        let c = ctx(CR0_PE | CR0_ET | CR0_NE, CR4_PAE, EFER_LME | EFER_SCE);
        let w = write_cr0(&FIXED, &c, c.cr0 | CR0_PG).unwrap();
        assert_eq!(w.efer, EFER_LME | EFER_LMA | EFER_SCE);
        assert_eq!(w.real, c.cr0 | CR0_PG);
        assert!(!w.load_pdptes && w.flush_tlb);
        // And disabling it (from compatibility mode) deactivates it.
        let c = ctx(w.shadow, CR4_PAE, w.efer);
        let w = write_cr0(&FIXED, &c, c.cr0 & !CR0_PG).unwrap();
        assert_eq!(w.efer & EFER_LMA, 0);
        // Not from 64-bit mode.
        let c = CrContext { cs_long: true, ..ctx(c.cr0, CR4_PAE, EFER_LME | EFER_LMA) };
        assert!(write_cr0(&FIXED, &c, c.cr0 & !CR0_PG).is_err());
    }

    #[test]
    fn paging_without_lme_keeps_lma_clear_and_pae_loads_pdptes() {
        let c = ctx(CR0_PE | CR0_ET, CR4_PAE, EFER_NXE);
        let w = write_cr0(&FIXED, &c, c.cr0 | CR0_PG).unwrap();
        assert_eq!(w.efer, EFER_NXE);
        assert!(w.load_pdptes);
        assert_eq!(w.real & CR0_NE, CR0_NE);
        assert_eq!(w.shadow & CR0_NE, 0);
        let c = ctx(CR0_PE | CR0_ET, 0, 0);
        assert!(!write_cr0(&FIXED, &c, c.cr0 | CR0_PG).unwrap().load_pdptes);
    }

    #[test]
    fn invalid_cr0_writes_fault() {
        let c = ctx(CR0_PE | CR0_ET | CR0_NE, 0, EFER_LME);
        assert!(write_cr0(&FIXED, &c, 1 << 32).is_err());
        assert!(write_cr0(&FIXED, &c, CR0_PG).is_err());
        assert!(write_cr0(&FIXED, &c, CR0_PE | CR0_NW).is_err());
        // LME with PAE clear.
        assert_eq!(write_cr0(&FIXED, &c, c.cr0 | CR0_PG), Err(GpFault("IA-32e mode activation with CR4.PAE clear")));
    }

    #[test]
    fn clts_and_lmsw() {
        let c = ctx(CR0_PE | CR0_TS | CR0_MP | CR0_WP, 0, 0);
        assert_eq!(clts(&FIXED, &c).unwrap().shadow, CR0_PE | CR0_MP | CR0_WP);
        // LMSW cannot clear PE but sets TS.
        let w = lmsw(&FIXED, &c, 0b1000).unwrap();
        assert_eq!(w.shadow, CR0_PE | CR0_TS | CR0_WP);
        let real_mode = ctx(0, 0, 0);
        assert_eq!(lmsw(&FIXED, &real_mode, 0b0001).unwrap().shadow, CR0_PE);
    }

    #[test]
    fn cr4_writes() {
        let lm = ctx(CR0_PE | CR0_PG | CR0_NE, CR4_PAE, EFER_LME | EFER_LMA);
        assert!(write_cr4(&FIXED, &lm, CR4_PAE | CR4_VMXE).is_err());
        assert!(write_cr4(&FIXED, &lm, CR4_PAE | CR4_SMXE).is_err());
        assert_eq!(FIXED.cr4_mask() & CR4_SMXE, CR4_SMXE);
        assert!(write_cr4(&FIXED, &lm, CR4_PAE | (1 << 22)).is_err());
        assert!(write_cr4(&FIXED, &lm, 0).is_err());
        let w = write_cr4(&FIXED, &lm, CR4_PAE | CR4_PGE).unwrap();
        assert_eq!(w.real, CR4_PAE | CR4_PGE | CR4_VMXE);
        assert_eq!(w.shadow, CR4_PAE | CR4_PGE);
        assert!(w.flush_tlb && !w.load_pdptes);
        // PCIDE needs IA-32e mode and CR3[11:0] = 0.
        let pcid_in_cr3 = CrContext { cr3: 0x2018, ..lm };
        assert!(write_cr4(&FIXED, &pcid_in_cr3, CR4_PAE | CR4_PCIDE).is_err());
        assert!(write_cr4(&FIXED, &lm, CR4_PAE | CR4_PCIDE).is_ok());
        let legacy_pae = ctx(CR0_PE | CR0_PG, CR4_PAE, 0);
        assert!(write_cr4(&FIXED, &legacy_pae, CR4_PAE | CR4_PCIDE).is_err());
        let legacy = ctx(CR0_PE | CR0_PG, 0, 0);
        let w = write_cr4(&FIXED, &legacy, CR4_PAE).unwrap();
        assert!(w.load_pdptes);
    }

    #[test]
    fn cr_access_qualification() {
        assert_eq!(CrAccess::decode(0x0000_0300), CrAccess::MovTo { cr: 0, gpr: 3 });
        assert_eq!(CrAccess::decode(0x0000_0414), CrAccess::MovFrom { cr: 4, gpr: 4 });
        assert_eq!(CrAccess::decode(0x0000_0020), CrAccess::Clts);
        assert_eq!(CrAccess::decode(0x0009_0030), CrAccess::Lmsw { source: 9 });
        assert_eq!(CrAccess::decode(0x0000_0F13), CrAccess::MovFrom { cr: 3, gpr: 15 });
    }

    #[test]
    fn pdpte_reserved_bits() {
        assert!(!pdpte_reserved(0x1000 | 1, 36));
        assert!(!pdpte_reserved(0x6, 36), "not present: not checked");
        assert!(pdpte_reserved(0x1000 | 1 | 2, 36));
        assert!(pdpte_reserved((1 << 40) | 1, 36));
        assert!(!pdpte_reserved((1 << 40) | 1, 46));
    }
}
