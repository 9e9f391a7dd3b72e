//! Vendor-neutral guest CPU state: what a backend loads into its VMCB or VMCS.

/// Segment attributes in the packed 12-bit form of the AMD VMCB (APM Vol. 2 §15.5.1):
/// bits 7:0 = descriptor bits 47:40 (type, S, DPL, P), bits 11:8 = descriptor bits 55:52
/// (AVL, L, D/B, G). The VMX access-rights form (SDM Vol. 3C §25.4.1) is the same with
/// bits 11:8 moved to 15:12 and bit 16 = unusable; see [`SegAttr::to_vmx`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegAttr(pub u16);

impl SegAttr {
    pub const PRESENT: u16 = 1 << 7;
    pub const S_CODE_DATA: u16 = 1 << 4;
    pub const LONG: u16 = 1 << 9;
    pub const DB: u16 = 1 << 10;
    pub const GRANULARITY: u16 = 1 << 11;
    /// Type: execute/read code, accessed.
    pub const TYPE_CODE_RX_ACCESSED: u16 = 0xB;
    /// Type: read/write data, accessed.
    pub const TYPE_DATA_RW_ACCESSED: u16 = 0x3;
    /// Type: 64-bit busy TSS.
    pub const TYPE_TSS_BUSY: u16 = 0xB;
    /// Type: LDT.
    pub const TYPE_LDT: u16 = 0x2;

    pub fn dpl(self) -> u8 {
        ((self.0 >> 5) & 3) as u8
    }

    /// The VMX access-rights encoding (`unusable` sets bit 16).
    pub fn to_vmx(self, unusable: bool) -> u32 {
        let a = self.0 as u32;
        (a & 0xFF) | ((a & 0xF00) << 4) | ((unusable as u32) << 16)
    }

    /// From the VMX access-rights encoding (bit 16, unusable, is dropped).
    pub fn from_vmx(ar: u32) -> Self {
        Self(((ar & 0xFF) | ((ar >> 4) & 0xF00)) as u16)
    }
}

/// A segment register's visible selector and hidden descriptor cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub attr: SegAttr,
    /// VMX "segment unusable" (a null selector loaded in protected mode). SVM ignores it.
    pub unusable: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Which segment register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegReg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
    Tr,
    Ldtr,
}

/// The architectural guest state a vCPU starts from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// IA32_PAT (power-on value 0x0007_0406_0007_0406).
    pub pat: u64,
    pub dr7: u64,
    pub es: Segment,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub tr: Segment,
    pub ldtr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
}

pub const CR0_PE: u64 = 1 << 0;
/// CR0 not-write-through and cache-disable (kept by INIT, SDM Vol. 3A Table 10-1).
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4.PCE (bit 8): RDPMC is allowed at any privilege level.
pub const CR4_PCE: u64 = 1 << 8;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
pub const EFER_SVME: u64 = 1 << 12;
pub const RFLAGS_RESERVED_1: u64 = 1 << 1;
pub const RFLAGS_IF: u64 = 1 << 9;
pub const RFLAGS_DF: u64 = 1 << 10;
pub const PAT_POWER_ON: u64 = 0x0007_0406_0007_0406;

/// Selectors of the flat GDT that [`CpuState::long_mode_flat`] assumes (the same layout
/// Linux's 64-bit boot protocol asks for: code 0x10, data 0x18).
pub const FLAT_CODE_SELECTOR: u16 = 0x10;
pub const FLAT_DATA_SELECTOR: u16 = 0x18;
pub const FLAT_TSS_SELECTOR: u16 = 0x20;

impl CpuState {
    /// The architectural state after RESET or INIT (SDM Vol. 3A §10.1.1 Table 10-1;
    /// APM Vol. 2 §14.1.3): real mode, CS:IP = F000:FFF0 with CS base FFFF_0000.
    pub fn reset() -> Self {
        let data = Segment {
            selector: 0,
            base: 0,
            limit: 0xFFFF,
            attr: SegAttr(SegAttr::PRESENT | SegAttr::S_CODE_DATA | SegAttr::TYPE_DATA_RW_ACCESSED),
            unusable: false,
        };
        Self {
            rip: 0xFFF0,
            rsp: 0,
            rflags: RFLAGS_RESERVED_1,
            cr0: 0x6000_0010,
            cr3: 0,
            cr4: 0,
            efer: 0,
            pat: PAT_POWER_ON,
            dr7: 0x400,
            es: data,
            cs: Segment {
                selector: 0xF000,
                base: 0xFFFF_0000,
                limit: 0xFFFF,
                attr: SegAttr(SegAttr::PRESENT | SegAttr::S_CODE_DATA | SegAttr::TYPE_CODE_RX_ACCESSED),
                unusable: false,
            },
            ss: data,
            ds: data,
            fs: data,
            gs: data,
            tr: Segment {
                selector: 0,
                base: 0,
                limit: 0xFFFF,
                attr: SegAttr(SegAttr::PRESENT | SegAttr::TYPE_TSS_BUSY),
                unusable: false,
            },
            ldtr: Segment {
                selector: 0,
                base: 0,
                limit: 0xFFFF,
                attr: SegAttr(SegAttr::PRESENT | SegAttr::TYPE_LDT),
                unusable: false,
            },
            gdtr: DescriptorTable { base: 0, limit: 0xFFFF },
            idtr: DescriptorTable { base: 0, limit: 0xFFFF },
        }
    }

    /// The state an application processor starts in after INIT and a STARTUP IPI with
    /// `vector` (SDM Vol. 3A §9.4.4.1, §12.6.1; APM Vol. 2 §14.1.3 for the INIT state): the INIT
    /// state ([`CpuState::reset`]) with CS.selector = `vector` << 8, CS.base = `vector` << 12
    /// and RIP = 0, i.e. real mode at physical address `vector` * 4 KiB.
    ///
    /// This is an AP's first start after power-up. For a vCPU that ran before its INIT use
    /// [`CpuState::after_init`] and [`CpuState::at_sipi`]: INIT keeps what RESET clears.
    pub fn sipi(vector: u8) -> Self {
        Self::reset().at_sipi(vector)
    }

    /// This state with CS:IP moved to the STARTUP vector `vector` (see [`CpuState::sipi`]).
    pub fn at_sipi(self, vector: u8) -> Self {
        let page = u64::from(vector);
        Self { rip: 0, cs: Segment { selector: (page << 8) as u16, base: page << 12, ..self.cs }, ..self }
    }

    /// The state after an INIT of a vCPU that was in state `self` (SDM Vol. 3A §10.1.1,
    /// Table 10-1, INIT column): [`CpuState::reset`], except that CR0.CD and CR0.NW and
    /// IA32_PAT keep their values. What INIT also keeps but this type does not hold (x87,
    /// SSE and AVX state, MXCSR, MTRRs, the TSC, the other MSRs, caches) is the owner's to
    /// leave alone; what it clears outside this type is too (the general registers are 0,
    /// except RDX = the CPUID.1:EAX signature; DR0-DR3 = 0, DR6 = 0xFFFF_0FF0).
    pub fn after_init(&self) -> Self {
        let reset = Self::reset();
        let cr0 = (reset.cr0 & !(CR0_CD | CR0_NW)) | (self.cr0 & (CR0_CD | CR0_NW));
        Self { cr0, pat: self.pat, ..reset }
    }

    /// 64-bit mode, paging on with `cr3`, flat segments, interrupts off: the state Linux's
    /// 64-bit boot protocol and Vireo's test guests start in. `gdt` is the guest-physical
    /// address of a GDT with flat 64-bit code at 0x10 and data at 0x18.
    pub fn long_mode_flat(rip: u64, rsp: u64, cr3: u64, gdt: DescriptorTable) -> Self {
        let code = Segment {
            selector: FLAT_CODE_SELECTOR,
            base: 0,
            limit: 0xFFFF_FFFF,
            attr: SegAttr(
                SegAttr::TYPE_CODE_RX_ACCESSED
                    | SegAttr::S_CODE_DATA
                    | SegAttr::PRESENT
                    | SegAttr::LONG
                    | SegAttr::GRANULARITY,
            ),
            unusable: false,
        };
        let data = Segment {
            selector: FLAT_DATA_SELECTOR,
            base: 0,
            limit: 0xFFFF_FFFF,
            attr: SegAttr(
                SegAttr::TYPE_DATA_RW_ACCESSED
                    | SegAttr::S_CODE_DATA
                    | SegAttr::PRESENT
                    | SegAttr::DB
                    | SegAttr::GRANULARITY,
            ),
            unusable: false,
        };
        // A usable TR is required by VM entry (SDM Vol. 3C §27.3.1.2) even if the guest
        // never switches stacks through it.
        let tr = Segment {
            selector: FLAT_TSS_SELECTOR,
            base: 0,
            limit: 0x67,
            attr: SegAttr(SegAttr::TYPE_TSS_BUSY | SegAttr::PRESENT),
            unusable: false,
        };
        let ldtr = Segment {
            selector: 0,
            base: 0,
            limit: 0,
            attr: SegAttr(SegAttr::TYPE_LDT | SegAttr::PRESENT),
            unusable: true,
        };
        Self {
            rip,
            rsp,
            rflags: RFLAGS_RESERVED_1,
            cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
            cr3,
            cr4: CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
            efer: EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE,
            pat: PAT_POWER_ON,
            dr7: 0x400,
            es: data,
            cs: code,
            ss: data,
            ds: data,
            fs: data,
            gs: data,
            tr,
            ldtr,
            gdtr: gdt,
            idtr: DescriptorTable { base: 0, limit: 0xFFFF },
        }
    }
}

impl CpuState {
    /// 32-bit protected mode, paging off, flat 4 GiB code (selector 0x10) and data (0x18)
    /// segments, interrupts off: the state a multiboot kernel starts in (Multiboot 0.6.96
    /// §3.2). `gdt`: a GDT in guest memory whose descriptors match (the specification lets
    /// the kernel assume nothing about GDTR; one that matches costs nothing). TR holds a
    /// busy 32-bit TSS (VM entry wants a usable TR, SDM Vol. 3C §27.3.1.2).
    pub fn protected_mode_flat(rip: u64, rsp: u64, gdt: DescriptorTable) -> Self {
        let long = Self::long_mode_flat(rip, rsp, 0, gdt);
        let code = Segment {
            attr: SegAttr(
                SegAttr::TYPE_CODE_RX_ACCESSED
                    | SegAttr::S_CODE_DATA
                    | SegAttr::PRESENT
                    | SegAttr::DB
                    | SegAttr::GRANULARITY,
            ),
            ..long.cs
        };
        Self {
            cr0: CR0_PE | CR0_ET,
            cr3: 0,
            cr4: 0,
            efer: 0,
            cs: code,
            idtr: DescriptorTable { base: 0, limit: 0x3FF },
            ..long
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_and_sipi_states() {
        let r = CpuState::reset();
        assert_eq!((r.cs.selector, r.cs.base, r.rip), (0xF000, 0xFFFF_0000, 0xFFF0));
        assert_eq!(r.cr0, 0x6000_0010);
        for v in [0u8, 0x08, 0x9A, 0xFF] {
            let s = CpuState::sipi(v);
            assert_eq!(s.cs.selector, (v as u16) << 8);
            assert_eq!(s.cs.base, (v as u64) << 12);
            assert_eq!(s.rip, 0);
            assert_eq!(s.cs.base + s.rip, v as u64 * 4096, "starts at the vector's page");
            assert_eq!(s.cs.limit, 0xFFFF);
            assert_eq!(s.cs.attr, r.cs.attr);
            // Everything else is the INIT state: real mode, no paging, interrupts off.
            assert_eq!(CpuState { rip: r.rip, cs: r.cs, ..s }, r);
            assert_eq!(s.cr0 & (CR0_PE | CR0_PG), 0);
            assert_eq!(s.rflags, RFLAGS_RESERVED_1);
            assert_eq!(s.efer, 0);
        }
        // Linux's trampoline page, e.g. 0x9A000: CS = 9A00, IP = 0.
        assert_eq!(CpuState::sipi(0x9A).cs.selector, 0x9A00);
    }

    #[test]
    fn init_keeps_cache_control_and_pat() {
        let gdt = DescriptorTable { base: 0x1000, limit: 0x27 };
        let mut running = CpuState::long_mode_flat(0xFFFF_8000_0000_0000, 0x8000, 0x5000, gdt);
        running.pat = 0x0007_0106_0007_0106;
        running.cr0 |= CR0_CD;
        let i = running.after_init();
        assert_eq!(i.cr0, 0x4000_0010, "CD kept, NW kept clear, ET set, the rest cleared");
        assert_eq!(i.pat, 0x0007_0106_0007_0106);
        assert_eq!(CpuState { cr0: 0x6000_0010, pat: PAT_POWER_ON, ..i }, CpuState::reset());
        assert_eq!(CpuState::reset().after_init(), CpuState::reset());
        let s = i.at_sipi(0x10);
        assert_eq!((s.cs.selector, s.cs.base, s.rip, s.cr0), (0x1000, 0x1_0000, 0, 0x4000_0010));
    }

    #[test]
    fn protected_mode_state() {
        let s = CpuState::protected_mode_flat(0x10_0000, 0x2000, DescriptorTable { base: 0x2080, limit: 39 });
        assert_eq!((s.cr0 & (CR0_PE | CR0_PG), s.efer, s.cr4), (CR0_PE, 0, 0));
        assert_eq!(s.cs.attr.0 & (SegAttr::LONG | SegAttr::DB), SegAttr::DB, "32-bit code, not 64-bit");
        assert_eq!((s.cs.base, s.cs.limit, s.ds.base, s.ds.limit), (0, 0xFFFF_FFFF, 0, 0xFFFF_FFFF));
        assert_eq!(s.rflags & RFLAGS_IF, 0);
        assert_eq!((s.rip, s.rsp), (0x10_0000, 0x2000));
    }

    #[test]
    fn attr_conversions() {
        let code = SegAttr(
            SegAttr::TYPE_CODE_RX_ACCESSED
                | SegAttr::S_CODE_DATA
                | SegAttr::PRESENT
                | SegAttr::LONG
                | SegAttr::GRANULARITY,
        );
        assert_eq!(code.0, 0xA9B);
        assert_eq!(code.to_vmx(false), 0xA09B);
        assert_eq!(SegAttr::from_vmx(0xA09B), code);
        assert_eq!(SegAttr::from_vmx(0x1_0000), SegAttr(0));
        assert_eq!(code.to_vmx(true) >> 16, 1);
    }
}
