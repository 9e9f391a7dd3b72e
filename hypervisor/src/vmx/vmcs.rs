//! VMCS field encodings (SDM Vol. 3D App. B "Field Encoding in VMCS"), one enum per field
//! width so `vmread`/`vmwrite` are typed: a 16-bit field is read as `u16`, a natural-width
//! field as `u64`.
//!
//! An encoding is a 32-bit number: bit 0 access type (0 full, 1 high half of a 64-bit
//! field), bits 9:1 index, bits 11:10 type (0 control, 1 VM-exit information (read-only),
//! 2 guest state, 3 host state), bits 14:13 width (0 16-bit, 1 64-bit, 2 32-bit,
//! 3 natural width) (SDM Vol. 3C §25.11.2).

use crate::vmm::state::SegReg;

/// Defines a `#[repr(u32)]` field enum with `encoding()`.
macro_rules! fields {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident = $enc:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        pub enum $name {
            $($(#[$fmeta])* $field = $enc,)*
        }

        impl $name {
            /// Every field of this width (for tests and dumps).
            pub const ALL: &'static [$name] = &[$($name::$field,)*];

            /// The encoding VMREAD/VMWRITE take.
            pub const fn encoding(self) -> u32 {
                self as u32
            }
        }
    };
}

fields! {
    /// 16-bit fields (App. B.1).
    Field16 {
        // Control fields (B.1.1).
        VirtualProcessorId = 0x0000,
        PostedInterruptNotificationVector = 0x0002,
        EptpIndex = 0x0004,
        // Guest-state fields (B.1.2).
        GuestEsSelector = 0x0800,
        GuestCsSelector = 0x0802,
        GuestSsSelector = 0x0804,
        GuestDsSelector = 0x0806,
        GuestFsSelector = 0x0808,
        GuestGsSelector = 0x080A,
        GuestLdtrSelector = 0x080C,
        GuestTrSelector = 0x080E,
        GuestInterruptStatus = 0x0810,
        PmlIndex = 0x0812,
        // Host-state fields (B.1.3).
        HostEsSelector = 0x0C00,
        HostCsSelector = 0x0C02,
        HostSsSelector = 0x0C04,
        HostDsSelector = 0x0C06,
        HostFsSelector = 0x0C08,
        HostGsSelector = 0x0C0A,
        HostTrSelector = 0x0C0C,
    }
}

fields! {
    /// 64-bit fields (App. B.2), full access (the "high" encodings, +1, are for 32-bit
    /// VMMs only).
    Field64 {
        // Control fields (B.2.1).
        IoBitmapA = 0x2000,
        IoBitmapB = 0x2002,
        MsrBitmap = 0x2004,
        VmExitMsrStoreAddr = 0x2006,
        VmExitMsrLoadAddr = 0x2008,
        VmEntryMsrLoadAddr = 0x200A,
        ExecutiveVmcsPointer = 0x200C,
        PmlAddress = 0x200E,
        TscOffset = 0x2010,
        VirtualApicAddress = 0x2012,
        ApicAccessAddress = 0x2014,
        PostedInterruptDescriptor = 0x2016,
        VmFunctionControls = 0x2018,
        EptPointer = 0x201A,
        EoiExitBitmap0 = 0x201C,
        EoiExitBitmap1 = 0x201E,
        EoiExitBitmap2 = 0x2020,
        EoiExitBitmap3 = 0x2022,
        EptpListAddress = 0x2024,
        VmreadBitmap = 0x2026,
        VmwriteBitmap = 0x2028,
        VirtualizationExceptionInfo = 0x202A,
        XssExitingBitmap = 0x202C,
        EnclsExitingBitmap = 0x202E,
        SubPagePermissionTable = 0x2030,
        TscMultiplier = 0x2032,
        TertiaryProcBasedControls = 0x2034,
        // Read-only data fields (B.2.2).
        GuestPhysicalAddress = 0x2400,
        // Guest-state fields (B.2.3).
        VmcsLinkPointer = 0x2800,
        GuestIa32Debugctl = 0x2802,
        GuestIa32Pat = 0x2804,
        GuestIa32Efer = 0x2806,
        GuestIa32PerfGlobalCtrl = 0x2808,
        GuestPdpte0 = 0x280A,
        GuestPdpte1 = 0x280C,
        GuestPdpte2 = 0x280E,
        GuestPdpte3 = 0x2810,
        GuestIa32Bndcfgs = 0x2812,
        GuestIa32RtitCtl = 0x2814,
        GuestIa32Pkrs = 0x2818,
        // Host-state fields (B.2.4).
        HostIa32Pat = 0x2C00,
        HostIa32Efer = 0x2C02,
        HostIa32PerfGlobalCtrl = 0x2C04,
        HostIa32Pkrs = 0x2C06,
    }
}

fields! {
    /// 32-bit fields (App. B.3).
    Field32 {
        // Control fields (B.3.1).
        PinBasedControls = 0x4000,
        PrimaryProcBasedControls = 0x4002,
        ExceptionBitmap = 0x4004,
        PageFaultErrorCodeMask = 0x4006,
        PageFaultErrorCodeMatch = 0x4008,
        Cr3TargetCount = 0x400A,
        VmExitControls = 0x400C,
        VmExitMsrStoreCount = 0x400E,
        VmExitMsrLoadCount = 0x4010,
        VmEntryControls = 0x4012,
        VmEntryMsrLoadCount = 0x4014,
        VmEntryInterruptionInfo = 0x4016,
        VmEntryExceptionErrorCode = 0x4018,
        VmEntryInstructionLength = 0x401A,
        TprThreshold = 0x401C,
        SecondaryProcBasedControls = 0x401E,
        PleGap = 0x4020,
        PleWindow = 0x4022,
        // Read-only data fields (B.3.2).
        VmInstructionError = 0x4400,
        ExitReason = 0x4402,
        VmExitInterruptionInfo = 0x4404,
        VmExitInterruptionErrorCode = 0x4406,
        IdtVectoringInfo = 0x4408,
        IdtVectoringErrorCode = 0x440A,
        VmExitInstructionLength = 0x440C,
        VmExitInstructionInfo = 0x440E,
        // Guest-state fields (B.3.3).
        GuestEsLimit = 0x4800,
        GuestCsLimit = 0x4802,
        GuestSsLimit = 0x4804,
        GuestDsLimit = 0x4806,
        GuestFsLimit = 0x4808,
        GuestGsLimit = 0x480A,
        GuestLdtrLimit = 0x480C,
        GuestTrLimit = 0x480E,
        GuestGdtrLimit = 0x4810,
        GuestIdtrLimit = 0x4812,
        GuestEsAccessRights = 0x4814,
        GuestCsAccessRights = 0x4816,
        GuestSsAccessRights = 0x4818,
        GuestDsAccessRights = 0x481A,
        GuestFsAccessRights = 0x481C,
        GuestGsAccessRights = 0x481E,
        GuestLdtrAccessRights = 0x4820,
        GuestTrAccessRights = 0x4822,
        GuestInterruptibilityState = 0x4824,
        GuestActivityState = 0x4826,
        GuestSmbase = 0x4828,
        GuestIa32SysenterCs = 0x482A,
        VmxPreemptionTimerValue = 0x482E,
        // Host-state field (B.3.4).
        HostIa32SysenterCs = 0x4C00,
    }
}

fields! {
    /// Natural-width fields (App. B.4).
    FieldNat {
        // Control fields (B.4.1).
        Cr0GuestHostMask = 0x6000,
        Cr4GuestHostMask = 0x6002,
        Cr0ReadShadow = 0x6004,
        Cr4ReadShadow = 0x6006,
        Cr3Target0 = 0x6008,
        Cr3Target1 = 0x600A,
        Cr3Target2 = 0x600C,
        Cr3Target3 = 0x600E,
        // Read-only data fields (B.4.2).
        ExitQualification = 0x6400,
        IoRcx = 0x6402,
        IoRsi = 0x6404,
        IoRdi = 0x6406,
        IoRip = 0x6408,
        GuestLinearAddress = 0x640A,
        // Guest-state fields (B.4.3).
        GuestCr0 = 0x6800,
        GuestCr3 = 0x6802,
        GuestCr4 = 0x6804,
        GuestEsBase = 0x6806,
        GuestCsBase = 0x6808,
        GuestSsBase = 0x680A,
        GuestDsBase = 0x680C,
        GuestFsBase = 0x680E,
        GuestGsBase = 0x6810,
        GuestLdtrBase = 0x6812,
        GuestTrBase = 0x6814,
        GuestGdtrBase = 0x6816,
        GuestIdtrBase = 0x6818,
        GuestDr7 = 0x681A,
        GuestRsp = 0x681C,
        GuestRip = 0x681E,
        GuestRflags = 0x6820,
        GuestPendingDebugExceptions = 0x6822,
        GuestIa32SysenterEsp = 0x6824,
        GuestIa32SysenterEip = 0x6826,
        GuestIa32SCet = 0x6828,
        GuestSsp = 0x682A,
        GuestIa32InterruptSspTableAddr = 0x682C,
        // Host-state fields (B.4.4).
        HostCr0 = 0x6C00,
        HostCr3 = 0x6C02,
        HostCr4 = 0x6C04,
        HostFsBase = 0x6C06,
        HostGsBase = 0x6C08,
        HostTrBase = 0x6C0A,
        HostGdtrBase = 0x6C0C,
        HostIdtrBase = 0x6C0E,
        HostIa32SysenterEsp = 0x6C10,
        HostIa32SysenterEip = 0x6C12,
        HostRsp = 0x6C14,
        HostRip = 0x6C16,
    }
}

/// The four VMCS fields of one guest segment register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentFields {
    pub selector: Field16,
    pub base: FieldNat,
    pub limit: Field32,
    pub access_rights: Field32,
}

/// The guest fields of `seg`. The VMCS orders segments ES, CS, SS, DS, FS, GS, LDTR, TR
/// (SDM Vol. 3D App. B): not the order of [`SegReg`], whose TR comes before LDTR.
pub const fn segment_fields(seg: SegReg) -> SegmentFields {
    use Field16::*;
    use Field32::*;
    use FieldNat::*;
    match seg {
        SegReg::Es => SegmentFields {
            selector: GuestEsSelector,
            base: GuestEsBase,
            limit: GuestEsLimit,
            access_rights: GuestEsAccessRights,
        },
        SegReg::Cs => SegmentFields {
            selector: GuestCsSelector,
            base: GuestCsBase,
            limit: GuestCsLimit,
            access_rights: GuestCsAccessRights,
        },
        SegReg::Ss => SegmentFields {
            selector: GuestSsSelector,
            base: GuestSsBase,
            limit: GuestSsLimit,
            access_rights: GuestSsAccessRights,
        },
        SegReg::Ds => SegmentFields {
            selector: GuestDsSelector,
            base: GuestDsBase,
            limit: GuestDsLimit,
            access_rights: GuestDsAccessRights,
        },
        SegReg::Fs => SegmentFields {
            selector: GuestFsSelector,
            base: GuestFsBase,
            limit: GuestFsLimit,
            access_rights: GuestFsAccessRights,
        },
        SegReg::Gs => SegmentFields {
            selector: GuestGsSelector,
            base: GuestGsBase,
            limit: GuestGsLimit,
            access_rights: GuestGsAccessRights,
        },
        SegReg::Ldtr => SegmentFields {
            selector: GuestLdtrSelector,
            base: GuestLdtrBase,
            limit: GuestLdtrLimit,
            access_rights: GuestLdtrAccessRights,
        },
        SegReg::Tr => SegmentFields {
            selector: GuestTrSelector,
            base: GuestTrBase,
            limit: GuestTrLimit,
            access_rights: GuestTrAccessRights,
        },
    }
}

/// All segment registers, in VMCS order.
pub const SEGMENTS: [SegReg; 8] =
    [SegReg::Es, SegReg::Cs, SegReg::Ss, SegReg::Ds, SegReg::Fs, SegReg::Gs, SegReg::Ldtr, SegReg::Tr];

/// Width of a field from its encoding, bits 14:13 (SDM Vol. 3C §25.11.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    W16,
    W64,
    W32,
    Natural,
}

pub const fn width_of(encoding: u32) -> Width {
    match (encoding >> 13) & 3 {
        0 => Width::W16,
        1 => Width::W64,
        2 => Width::W32,
        _ => Width::Natural,
    }
}

/// Whether an encoding names a read-only VM-exit information field (type 1, bits 11:10).
pub const fn is_read_only(encoding: u32) -> bool {
    (encoding >> 10) & 3 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_are_in_their_width_enum() {
        assert!(Field16::ALL.iter().all(|f| width_of(f.encoding()) == Width::W16));
        assert!(Field64::ALL.iter().all(|f| width_of(f.encoding()) == Width::W64 && f.encoding() & 1 == 0));
        assert!(Field32::ALL.iter().all(|f| width_of(f.encoding()) == Width::W32));
        assert!(FieldNat::ALL.iter().all(|f| width_of(f.encoding()) == Width::Natural));
    }

    #[test]
    fn known_encodings() {
        assert_eq!(Field32::IdtVectoringInfo.encoding(), 0x4408);
        assert_eq!(FieldNat::HostRsp.encoding(), 0x6C14);
        assert_eq!(Field64::EptPointer.encoding(), 0x201A);
        assert!(is_read_only(Field32::ExitReason.encoding()));
        assert!(is_read_only(FieldNat::ExitQualification.encoding()));
        assert!(is_read_only(Field64::GuestPhysicalAddress.encoding()));
        assert!(!is_read_only(FieldNat::GuestRip.encoding()));
    }

    #[test]
    fn segment_fields_follow_vmcs_order() {
        for (i, seg) in SEGMENTS.iter().enumerate() {
            let f = segment_fields(*seg);
            let i = i as u32;
            assert_eq!(f.selector.encoding(), 0x0800 + 2 * i);
            assert_eq!(f.limit.encoding(), 0x4800 + 2 * i);
            assert_eq!(f.access_rights.encoding(), 0x4814 + 2 * i);
            assert_eq!(f.base.encoding(), 0x6806 + 2 * i);
        }
    }

    #[test]
    fn no_duplicate_encodings() {
        let mut all: Vec<u32> = Field16::ALL.iter().map(|f| f.encoding()).collect();
        all.extend(Field64::ALL.iter().map(|f| f.encoding()));
        all.extend(Field32::ALL.iter().map(|f| f.encoding()));
        all.extend(FieldNat::ALL.iter().map(|f| f.encoding()));
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
