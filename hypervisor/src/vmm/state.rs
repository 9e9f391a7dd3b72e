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
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
pub const EFER_SVME: u64 = 1 << 12;
pub const RFLAGS_RESERVED_1: u64 = 1 << 1;
pub const RFLAGS_IF: u64 = 1 << 9;
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

#[cfg(test)]
mod tests {
    use super::*;

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
