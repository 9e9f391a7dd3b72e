//! What the CPU offers Vireo: vendor, paging features and the virtualization extension
//! (Intel VMX with EPT/VPID/unrestricted guest, or AMD SVM with NPT/nRIP/ASIDs).
//!
//! Detection is split into reading (CPUID through `raw-cpuid`, MSRs through a closure) and
//! decoding, so the decoding is unit-tested on the host with recorded register values.

use core::fmt;

use raw_cpuid::{CpuId, CpuIdReader};

use super::msr;

/// Fixed-capacity ASCII text (CPUID vendor and brand strings).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CpuText<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> CpuText<N> {
    fn from_str(s: &str) -> Self {
        let mut bytes = [0; N];
        let s = s.trim();
        let mut len = 0;
        for (dst, b) in bytes.iter_mut().zip(s.bytes().filter(|b| b.is_ascii_graphic() || *b == b' ')) {
            *dst = b;
            len += 1;
        }
        Self { bytes, len }
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("?")
    }
}

impl<const N: usize> fmt::Debug for CpuText<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// Intel VMX capabilities (SDM Vol. 3D App. A "VMX Capability Reporting Facility").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxCaps {
    /// IA32_FEATURE_CONTROL locked with VMXON outside SMX disabled: firmware turned VMX off.
    pub disabled_by_firmware: bool,
    /// IA32_VMX_BASIC bit 55: the TRUE_*_CTLS MSRs exist (App. A.1).
    pub true_ctls: bool,
    pub vmcs_revision: u32,
    pub ept: bool,
    pub vpid: bool,
    pub unrestricted_guest: bool,
    pub preemption_timer: bool,
    pub ept_4level: bool,
    pub ept_wb: bool,
    pub ept_2m: bool,
    pub ept_1g: bool,
    pub ept_ad: bool,
    pub invvpid: bool,
    /// Both "load IA32_PERF_GLOBAL_CTRL" controls may be 1: VM-exit control bit 12 and
    /// VM-entry control bit 13 (SDM Vol. 3C §25.7.1, §25.8.1; allowed-1 settings in the
    /// high halves of IA32_VMX_(TRUE_)EXIT_CTLS / ENTRY_CTLS, App. A.4, A.5).
    pub perf_global_ctrl: bool,
}

impl VmxCaps {
    /// Decodes the capability MSRs; `read` returns `None` for an MSR that is absent.
    pub fn decode(read: impl Fn(u32) -> Option<u64>) -> Self {
        let basic = read(msr::IA32_VMX_BASIC).unwrap_or(0);
        let feature_control = read(msr::IA32_FEATURE_CONTROL).unwrap_or(0);
        let pinbased = read(msr::IA32_VMX_PINBASED_CTLS).unwrap_or(0);
        let procbased = read(msr::IA32_VMX_PROCBASED_CTLS).unwrap_or(0);
        // Allowed-1 settings are the high 32 bits (App. A.3); secondary controls exist only
        // if "activate secondary controls" (primary bit 31) may be 1.
        let secondary =
            if procbased & (1 << 63) != 0 { read(msr::IA32_VMX_PROCBASED_CTLS2).unwrap_or(0) >> 32 } else { 0 };
        let ept = secondary & (1 << 1) != 0;
        let vpid = secondary & (1 << 5) != 0;
        let ept_vpid = if ept || vpid { read(msr::IA32_VMX_EPT_VPID_CAP).unwrap_or(0) } else { 0 };
        // The TRUE_* control MSRs (0x48F exit, 0x490 entry) govern when they exist.
        let (exit_ctls, entry_ctls) = if basic & (1 << 55) != 0 { (0x48F, 0x490) } else { (0x483, 0x484) };
        let allowed1 = |m: u32, bit: u32| read(m).unwrap_or(0) >> 32 & (1 << bit) != 0;
        let perf_global_ctrl = allowed1(exit_ctls, 12) && allowed1(entry_ctls, 13);
        const FC_LOCK: u64 = 1 << 0;
        const FC_VMXON_OUTSIDE_SMX: u64 = 1 << 2;
        Self {
            disabled_by_firmware: feature_control & FC_LOCK != 0 && feature_control & FC_VMXON_OUTSIDE_SMX == 0,
            true_ctls: basic & (1 << 55) != 0,
            vmcs_revision: (basic & 0x7FFF_FFFF) as u32,
            ept,
            vpid,
            unrestricted_guest: secondary & (1 << 7) != 0,
            preemption_timer: (pinbased >> 32) & (1 << 6) != 0,
            ept_4level: ept_vpid & (1 << 6) != 0,
            ept_wb: ept_vpid & (1 << 14) != 0,
            ept_2m: ept_vpid & (1 << 16) != 0,
            ept_1g: ept_vpid & (1 << 17) != 0,
            ept_ad: ept_vpid & (1 << 21) != 0,
            invvpid: ept_vpid & (1 << 32) != 0,
            perf_global_ctrl,
        }
    }
}

/// AMD SVM capabilities (CPUID Fn8000_000A, APM Vol. 3 App. E.4.9; VM_CR APM Vol. 2 §15.30.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvmCaps {
    pub disabled_by_firmware: bool,
    pub revision: u8,
    pub asids: u32,
    pub npt: bool,
    pub nrip: bool,
    pub vmcb_clean: bool,
    pub flush_by_asid: bool,
    pub decode_assists: bool,
    pub pause_filter: bool,
    pub avic: bool,
    pub lbr_virt: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Virtualization {
    Vmx(VmxCaps),
    Svm(SvmCaps),
    None,
}

/// The CPU as Vireo sees it at boot.
#[derive(Clone, Copy, Debug)]
pub struct CpuInfo {
    pub vendor: Vendor,
    pub vendor_id: CpuText<12>,
    pub brand: CpuText<48>,
    pub family: u8,
    pub model: u8,
    pub stepping: u8,
    pub nx: bool,
    pub pages_1g: bool,
    pub phys_addr_bits: u8,
    pub virt: Virtualization,
}

impl CpuInfo {
    /// Reads this CPU.
    pub fn detect() -> Self {
        Self::decode(CpuId::new(), |m| {
            // SAFETY: decode() asks only for MSRs whose presence CPUID has shown
            // (VMX capability MSRs when CPUID.1:ECX.VMX=1, VM_CR when SVM is present).
            Some(unsafe { msr::read(m) })
        })
    }

    /// Decodes CPUID (through any `raw-cpuid` reader) and MSRs (through `read_msr`).
    pub fn decode<R: CpuIdReader>(cpuid: CpuId<R>, read_msr: impl Fn(u32) -> Option<u64>) -> Self {
        let vendor_id =
            cpuid.get_vendor_info().map(|v| CpuText::from_str(v.as_str())).unwrap_or(CpuText::from_str("unknown"));
        let vendor = match vendor_id.as_str() {
            "GenuineIntel" => Vendor::Intel,
            "AuthenticAMD" | "HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        };
        let brand =
            cpuid.get_processor_brand_string().map(|b| CpuText::from_str(b.as_str())).unwrap_or(CpuText::from_str(""));
        let features = cpuid.get_feature_info();
        let ext = cpuid.get_extended_processor_and_feature_identifiers();
        let capacity = cpuid.get_processor_capacity_feature_info();
        let has_vmx = features.as_ref().is_some_and(|f| f.has_vmx());
        let has_svm = ext.as_ref().is_some_and(|e| e.has_svm());
        let virt = if has_vmx {
            Virtualization::Vmx(VmxCaps::decode(read_msr))
        } else if has_svm {
            let svm = cpuid.get_svm_info();
            const VM_CR_SVMDIS: u64 = 1 << 4;
            Virtualization::Svm(SvmCaps {
                disabled_by_firmware: read_msr(msr::AMD_VM_CR).is_some_and(|v| v & VM_CR_SVMDIS != 0),
                revision: svm.as_ref().map_or(0, |s| s.revision()),
                asids: svm.as_ref().map_or(0, |s| s.supported_asids()),
                npt: svm.as_ref().is_some_and(|s| s.has_nested_paging()),
                nrip: svm.as_ref().is_some_and(|s| s.has_nrip()),
                vmcb_clean: svm.as_ref().is_some_and(|s| s.has_vmcb_clean_bits()),
                flush_by_asid: svm.as_ref().is_some_and(|s| s.has_flush_by_asid()),
                decode_assists: svm.as_ref().is_some_and(|s| s.has_decode_assists()),
                pause_filter: svm.as_ref().is_some_and(|s| s.has_pause_filter()),
                avic: svm.as_ref().is_some_and(|s| s.has_avic()),
                lbr_virt: svm.as_ref().is_some_and(|s| s.has_lbr_virtualization()),
            })
        } else {
            Virtualization::None
        };
        Self {
            vendor,
            vendor_id,
            brand,
            family: features.as_ref().map_or(0, |f| f.family_id()),
            model: features.as_ref().map_or(0, |f| f.model_id()),
            stepping: features.as_ref().map_or(0, |f| f.stepping_id()),
            nx: ext.as_ref().is_some_and(|e| e.has_execute_disable()),
            pages_1g: ext.as_ref().is_some_and(|e| e.has_1gib_pages()),
            phys_addr_bits: capacity.map_or(36, |c| c.physical_address_bits()),
            virt,
        }
    }
}

fn flag(b: bool) -> u8 {
    b as u8
}

/// The banner's virtualization line: `vmx ept=1 vpid=1 ...`, `svm npt=1 ...` or `none`.
impl fmt::Display for Virtualization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Virtualization::Vmx(v) => write!(
                f,
                "vmx ept={} vpid={} unrestricted={} ept_2m={} ept_1g={} ept_ad={} true_ctls={} preemption_timer={} disabled_by_firmware={}",
                flag(v.ept), flag(v.vpid), flag(v.unrestricted_guest), flag(v.ept_2m), flag(v.ept_1g),
                flag(v.ept_ad), flag(v.true_ctls), flag(v.preemption_timer), flag(v.disabled_by_firmware)
            ),
            Virtualization::Svm(s) => write!(
                f,
                "svm npt={} nrip={} asids={} vmcb_clean={} flush_by_asid={} decode_assists={} pause_filter={} avic={} disabled_by_firmware={}",
                flag(s.npt), flag(s.nrip), s.asids, flag(s.vmcb_clean), flag(s.flush_by_asid),
                flag(s.decode_assists), flag(s.pause_filter), flag(s.avic), flag(s.disabled_by_firmware)
            ),
            Virtualization::None => f.write_str("none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raw_cpuid::CpuIdResult;
    use std::collections::HashMap;

    /// A fake CPU: CPUID leaves from a table, everything else zero.
    fn fake(leaves: &[((u32, u32), [u32; 4])]) -> CpuId<impl CpuIdReader> {
        let map: HashMap<(u32, u32), [u32; 4]> = leaves.iter().copied().collect();
        CpuId::with_cpuid_fn(move |eax: u32, ecx: u32| {
            let r = map.get(&(eax, ecx)).or_else(|| map.get(&(eax, 0))).copied().unwrap_or([0; 4]);
            CpuIdResult { eax: r[0], ebx: r[1], ecx: r[2], edx: r[3] }
        })
    }

    /// "AuthenticAMD" / "GenuineIntel" as CPUID leaf 0 registers (EBX, EDX, ECX order).
    fn vendor_leaf(max: u32, s: &[u8; 12]) -> [u32; 4] {
        let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        [max, w(0), w(8), w(4)]
    }

    #[test]
    fn amd_qemu_tcg_like() {
        // Fn8000_0001 ECX bit 2 = SVM; EDX bit 20 NX, bit 29 LM. Fn8000_000A: rev 1,
        // 16 ASIDs, EDX bit 0 NP only (QEMU TCG has no nRIP-save).
        let cpu = fake(&[
            ((0, 0), vendor_leaf(0xd, b"AuthenticAMD")),
            ((1, 0), [0x0000_0663, 0, 0, 0]),
            ((0x8000_0000, 0), [0x8000_000A, 0, 0, 0]),
            ((0x8000_0001, 0), [0, 0, 1 << 2, (1 << 20) | (1 << 29)]),
            ((0x8000_0008, 0), [0x3028, 0, 0, 0]),
            ((0x8000_000A, 0), [1, 16, 0, 1]),
        ]);
        let info = CpuInfo::decode(cpu, |m| (m == msr::AMD_VM_CR).then_some(0));
        assert_eq!(info.vendor, Vendor::Amd);
        assert_eq!(info.vendor_id.as_str(), "AuthenticAMD");
        assert!(info.nx);
        assert!(!info.pages_1g);
        assert_eq!(info.phys_addr_bits, 40);
        let Virtualization::Svm(svm) = info.virt else { panic!("{:?}", info.virt) };
        assert!(svm.npt && !svm.nrip && !svm.disabled_by_firmware);
        assert_eq!(svm.asids, 16);
        assert_eq!(
            info.virt.to_string(),
            "svm npt=1 nrip=0 asids=16 vmcb_clean=0 flush_by_asid=0 decode_assists=0 pause_filter=0 avic=0 disabled_by_firmware=0"
        );
    }

    #[test]
    fn svm_disabled_by_firmware() {
        let cpu = fake(&[
            ((0, 0), vendor_leaf(1, b"AuthenticAMD")),
            ((0x8000_0000, 0), [0x8000_000A, 0, 0, 0]),
            ((0x8000_0001, 0), [0, 0, 1 << 2, 0]),
            ((0x8000_000A, 0), [1, 8, 0, 0b1001]),
        ]);
        let info = CpuInfo::decode(cpu, |_| Some(1 << 4));
        let Virtualization::Svm(svm) = info.virt else { panic!() };
        assert!(svm.disabled_by_firmware && svm.npt && svm.nrip);
    }

    #[test]
    fn intel_skylake_like_vmx() {
        let cpu = fake(&[((0, 0), vendor_leaf(0x16, b"GenuineIntel")), ((1, 0), [0x0005_0654, 0, 1 << 5, 0])]);
        let msrs = |m: u32| match m {
            msr::IA32_FEATURE_CONTROL => Some(0x5),
            msr::IA32_VMX_BASIC => Some((1 << 55) | 4),
            msr::IA32_VMX_PINBASED_CTLS => Some(0x7f_0000_0016),
            msr::IA32_VMX_PROCBASED_CTLS => Some(0xfff9_fffe_0401_e172),
            // EPT (1), VPID (5), unrestricted guest (7) allowed.
            msr::IA32_VMX_PROCBASED_CTLS2 => Some(0xA2 << 32),
            // 4-level walk, WB, 2M, 1G, A/D, INVVPID.
            msr::IA32_VMX_EPT_VPID_CAP => Some((1 << 6) | (1 << 14) | (1 << 16) | (1 << 17) | (1 << 21) | (1 << 32)),
            _ => None,
        };
        let info = CpuInfo::decode(cpu, msrs);
        assert_eq!(info.vendor, Vendor::Intel);
        assert_eq!((info.family, info.model), (6, 0x55));
        let Virtualization::Vmx(vmx) = info.virt else { panic!() };
        assert!(vmx.ept && vmx.vpid && vmx.unrestricted_guest && vmx.true_ctls && vmx.preemption_timer);
        assert!(vmx.ept_4level && vmx.ept_wb && vmx.ept_2m && vmx.ept_1g && vmx.ept_ad && vmx.invvpid);
        assert!(!vmx.disabled_by_firmware);
        assert_eq!(vmx.vmcs_revision, 4);
        assert!(info.virt.to_string().starts_with("vmx ept=1 vpid=1 unrestricted=1 "));
    }

    #[test]
    fn vmx_without_secondary_controls_or_locked_off() {
        let msrs = |m: u32| match m {
            msr::IA32_FEATURE_CONTROL => Some(0x1),
            msr::IA32_VMX_PROCBASED_CTLS => Some(0x7fff_ffff_0000_0000),
            msr::IA32_VMX_PROCBASED_CTLS2 => panic!("must not read CTLS2 when secondary controls are unavailable"),
            _ => None,
        };
        let caps = VmxCaps::decode(msrs);
        assert!(caps.disabled_by_firmware);
        assert!(!caps.ept && !caps.vpid && !caps.unrestricted_guest);
    }

    #[test]
    fn vmx_perf_global_ctrl_controls_need_both_allowed1_bits() {
        // Bochs corei7_skylake_x's values (TRUE MSRs present): exit bit 12 and entry bit
        // 13 allowed; then each missing in turn, and the plain MSRs without bit 55.
        let caps = |basic: u64, exit: u64, entry: u64| {
            VmxCaps::decode(move |m| match m {
                msr::IA32_VMX_BASIC => Some(basic),
                0x48F if basic & (1 << 55) != 0 => Some(exit),
                0x490 if basic & (1 << 55) != 0 => Some(entry),
                msr::IA32_VMX_EXIT_CTLS if basic & (1 << 55) == 0 => Some(exit),
                msr::IA32_VMX_ENTRY_CTLS if basic & (1 << 55) == 0 => Some(entry),
                _ => None,
            })
            .perf_global_ctrl
        };
        let (exit, entry) = (0x01ff_ffff_0003_6dfb, 0x0003_ffff_0000_11fb);
        assert!(caps(1 << 55, exit, entry));
        assert!(!caps(1 << 55, exit & !(1 << (32 + 12)), entry));
        assert!(!caps(1 << 55, exit, entry & !(1 << (32 + 13))));
        assert!(caps(0, exit, entry));
        assert!(!caps(0, 0, 0));
    }

    #[test]
    fn no_virtualization() {
        let cpu = fake(&[((0, 0), vendor_leaf(1, b"GenuineIntel"))]);
        let info = CpuInfo::decode(cpu, |_| None);
        assert_eq!(info.virt, Virtualization::None);
        assert_eq!(info.virt.to_string(), "none");
    }
}
