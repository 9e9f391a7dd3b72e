//! What a guest sees through CPUID: the host's answers, filtered per VM.
//!
//! Policy: pass through what the guest can use safely on this CPU, set the hypervisor bit
//! (CPUID.1:ECX[31]), add Vireo's signature leaves (`guest_abi::cpuid`), and hide every
//! feature Vireo does not virtualize: VMX/SVM (no nested virtualization), the local APIC,
//! x2APIC and TSC-deadline (no APIC model yet), MONITOR/MWAIT, thermal/power management,
//! SGX, Intel PT, 5-level paging. Performance monitoring is the host's hidden and, with
//! `pmu=on`, Vireo's virtual PMU ([`crate::pmu`]) offered instead: Intel architectural
//! PMU version 2 in leaf 0AH with PDCM (IA32_PERF_CAPABILITIES), AMD PerfCtrExtCore.

use guest_abi::cpuid as abi;

/// The four output registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidRegs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Per-VM facts the answers depend on.
#[derive(Clone, Copy, Debug)]
pub struct CpuidContext {
    /// Guest CR4.OSXSAVE (reflected in CPUID.1:ECX[27]).
    pub osxsave: bool,
    /// The vCPU's APIC ID (CPUID.1:EBX[31:24]).
    pub apic_id: u8,
    /// The CPU's native hypercall instruction (for Vireo's version leaf).
    pub native_vmmcall: bool,
    /// The TSC frequency Vireo measured, in kHz (0 if unknown).
    pub tsc_khz: u64,
    /// The VM has a local APIC (x2APIC-capable, with TSC-deadline timer).
    pub apic: bool,
    /// The VM offers the KVM PV interface (`pv=kvm`): kvmclock is its clock, so the
    /// invariant-TSC bit is hidden (with it, Linux would prefer the raw TSC).
    pub kvm_pv: bool,
    /// The VM offers Vireo's virtual PMU (`pmu=on`), of the CPU's vendor
    /// (`native_vmmcall`: AMD).
    pub pmu: bool,
    /// The virtual PMU is on the hardware path (`crate::pmu::hw`) over this host PMU: the
    /// architectural events the host counts are offered (Intel leaf 0AH EBX).
    pub pmu_hw: Option<crate::pmu::hw::HwCaps>,
}

/// The feature bits of Vireo's version leaf (and of the FEATURES hypercall).
pub fn vireo_features(kvm_pv: bool) -> u32 {
    let mut f =
        abi::features::HYPERCALLS | abi::features::TEST_DEVICE | abi::features::HYPERCALL_PAGE | abi::features::STATS;
    if kvm_pv {
        f |= abi::features::KVM_PV;
    }
    f
}

mod bit {
    // CPUID.1:ECX
    pub const MONITOR: u32 = 1 << 3;
    pub const DS_CPL: u32 = 1 << 4;
    pub const VMX: u32 = 1 << 5;
    pub const SMX: u32 = 1 << 6;
    pub const EST: u32 = 1 << 7;
    pub const TM2: u32 = 1 << 8;
    pub const SDBG: u32 = 1 << 11;
    pub const PDCM: u32 = 1 << 15;
    pub const DCA: u32 = 1 << 18;
    pub const X2APIC: u32 = 1 << 21;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const HYPERVISOR: u32 = 1 << 31;
    // CPUID.1:EDX
    pub const MCE: u32 = 1 << 7;
    pub const MTRR: u32 = 1 << 12;
    pub const MCA: u32 = 1 << 14;
    pub const DS: u32 = 1 << 21;
    pub const APIC: u32 = 1 << 9;
    pub const ACPI: u32 = 1 << 22;
    pub const TM: u32 = 1 << 29;
    pub const PBE: u32 = 1 << 31;
    // CPUID.7.0:EBX
    pub const TSC_ADJUST: u32 = 1 << 1;
    pub const SGX: u32 = 1 << 2;
    pub const PQM: u32 = 1 << 12;
    pub const PQE: u32 = 1 << 15;
    pub const INTEL_PT: u32 = 1 << 25;
    // CPUID.7.0:EDX: speculation-control MSRs and ARCH_CAPABILITIES.
    pub const MD_CLEAR: u32 = 1 << 10;
    pub const IBRS_IBPB: u32 = 1 << 26;
    pub const STIBP: u32 = 1 << 27;
    pub const L1D_FLUSH: u32 = 1 << 28;
    pub const ARCH_CAPABILITIES: u32 = 1 << 29;
    pub const CORE_CAPABILITIES: u32 = 1 << 30;
    pub const SSBD: u32 = 1 << 31;
    // CPUID.7.0:ECX
    pub const WAITPKG: u32 = 1 << 5;
    pub const LA57: u32 = 1 << 16;
    pub const SGX_LC: u32 = 1 << 30;
    // CPUID.80000001H:EDX
    pub const RDTSCP: u32 = 1 << 27;
    // CPUID.80000001H:ECX
    pub const SVM: u32 = 1 << 2;
    pub const SKINIT: u32 = 1 << 12;
    pub const WDT: u32 = 1 << 13;
    pub const PERFCTR_CORE: u32 = 1 << 23;
    pub const PERFCTR_NB: u32 = 1 << 24;
    pub const PERFCTR_LLC: u32 = 1 << 28;
    pub const TOPOEXT: u32 = 1 << 22;
    pub const MONITORX: u32 = 1 << 29;
    // CPUID.80000007H:EDX
    pub const INVARIANT_TSC: u32 = 1 << 8;
}

/// Computes the guest's answer for (`leaf`, `subleaf`) from the host's answer `host`.
pub fn filter(leaf: u32, subleaf: u32, host: CpuidRegs, ctx: &CpuidContext) -> CpuidRegs {
    let mut r = host;
    match leaf {
        1 => {
            r.ecx &= !(bit::MONITOR
                | bit::DS_CPL
                | bit::VMX
                | bit::SMX
                | bit::EST
                | bit::TM2
                | bit::SDBG
                | bit::PDCM
                | bit::DCA
                | bit::X2APIC
                | bit::TSC_DEADLINE
                | bit::OSXSAVE);
            r.ecx |= bit::HYPERVISOR;
            if ctx.pmu && !ctx.native_vmmcall {
                r.ecx |= bit::PDCM;
            }
            if ctx.osxsave {
                r.ecx |= bit::OSXSAVE;
            }
            // Features whose MSRs Vireo does not model yet: MCE/MCA banks, MTRRs.
            r.edx &= !(bit::DS | bit::APIC | bit::ACPI | bit::TM | bit::PBE | bit::MCE | bit::MCA | bit::MTRR);
            if ctx.apic {
                r.edx |= bit::APIC;
                r.ecx |= bit::X2APIC | bit::TSC_DEADLINE;
            }
            // EBX: [31:24] initial APIC ID, [23:16] logical processors = 1.
            r.ebx = (r.ebx & 0x0000_FFFF) | (1 << 16) | ((ctx.apic_id as u32) << 24);
        }
        // Architectural performance monitoring: Vireo's virtual PMU (Intel), else hidden.
        0xA if ctx.pmu && !ctx.native_vmmcall => {
            let [eax, ebx, ecx, edx] = match &ctx.pmu_hw {
                Some(caps) => crate::pmu::hw::cpuid_0a(caps),
                None => crate::pmu::intel::cpuid_0a(),
            };
            r = CpuidRegs { eax, ebx, ecx, edx };
        }
        // MONITOR/MWAIT, thermal/power, DCA, the host's PMU, Intel PT, SGX: hidden.
        5 | 6 | 9 | 0xA | 0x12 | 0x14 => r = CpuidRegs::default(),
        // Extended topology (SDM Vol. 2A CPUID 0BH/1FH; APM CPUID Fn8000_001E): the host's
        // would name the host CPU's x2APIC ID on every vCPU. Hidden: the guest counts its
        // CPUs from the MADT and sees each vCPU as a package of one (CPUID.1:EBX[23:16] = 1).
        0xB | 0x1F | 0x8000_001E => r = CpuidRegs::default(),
        7 if subleaf == 0 => {
            // TSC_ADJUST: the MSR is not modelled yet.
            r.ebx &= !(bit::TSC_ADJUST | bit::SGX | bit::PQM | bit::PQE | bit::INTEL_PT);
            r.ecx &= !(bit::WAITPKG | bit::LA57 | bit::SGX_LC);
            r.edx &= !(bit::MD_CLEAR
                | bit::IBRS_IBPB
                | bit::STIBP
                | bit::L1D_FLUSH
                | bit::ARCH_CAPABILITIES
                | bit::CORE_CAPABILITIES
                | bit::SSBD);
        }
        // Vireo's own leaves.
        abi::LEAF_SIGNATURE => {
            let [b, c, d] = abi::signature_registers();
            r = CpuidRegs { eax: abi::LEAF_MAX, ebx: b, ecx: c, edx: d };
        }
        abi::LEAF_VERSION => {
            r = CpuidRegs {
                eax: guest_abi::ABI_VERSION,
                ebx: vireo_features(ctx.kvm_pv),
                ecx: if ctx.native_vmmcall { abi::HYPERCALL_INSN_VMMCALL } else { abi::HYPERCALL_INSN_VMCALL },
                edx: 0,
            }
        }
        abi::LEAF_HYPERCALL_PAGE => {
            r = CpuidRegs {
                eax: guest_abi::hypercall::page::MSR,
                ebx: guest_abi::hypercall::page::STUB_SIZE as u32,
                ecx: guest_abi::hypercall::page::STUBS as u32,
                edx: 0,
            }
        }
        // The rest of the hypervisor range is empty (the KVM leaves are answered before
        // this filter, by `pv::kvm`, for VMs that offer them).
        0x4000_0000..=0x4FFF_FFFF => r = CpuidRegs::default(),
        0x8000_0001 => {
            r.ecx &= !(bit::SVM
                | bit::SKINIT
                | bit::WDT
                | bit::PERFCTR_CORE
                | bit::PERFCTR_NB
                | bit::PERFCTR_LLC
                | bit::MONITORX);
            // RDTSCP needs IA32_TSC_AUX per vCPU, not modelled yet.
            r.edx &= !bit::RDTSCP;
            // Topology extensions (leaf 0x8000_001E) are hidden, see above.
            r.ecx &= !bit::TOPOEXT;
            // Vireo's virtual PMU: six core counters (APM Vol. 2 §13.2).
            if ctx.pmu && ctx.native_vmmcall {
                r.ecx |= bit::PERFCTR_CORE;
            }
        }
        // TSC/crystal ratio: unknown here; leaf 0x16 says the TSC frequency instead.
        0x15 => r = CpuidRegs::default(),
        // Base/maximum/bus frequency in MHz. The host's figures are the CPU's nominal ones,
        // not the TSC rate a guest measures against (in an emulator they differ by orders of
        // magnitude): report the TSC frequency Vireo calibrated. Linux derives its TSC
        // frequency from this leaf on Intel CPUs.
        0x16 => {
            let mhz = ((ctx.tsc_khz + 500) / 1000) as u32;
            r = if mhz == 0 { CpuidRegs::default() } else { CpuidRegs { eax: mhz, ebx: mhz, ecx: 100, edx: 0 } };
        }
        // Advanced power management: EDX[8] is the invariant TSC. Hidden under kvmclock.
        0x8000_0007 if ctx.kvm_pv => r.edx &= !bit::INVARIANT_TSC,
        // SVM features, AMD memory encryption (SME/SEV: Linux's decompressor reads the
        // SEV status MSR without a fault handler when this leaf advertises it), PerfMonV2.
        0x8000_000A | 0x8000_001F | 0x8000_0022 => r = CpuidRegs::default(),
        _ => {}
    }
    r
}

/// Reads the host's CPUID.
#[cfg(target_arch = "x86_64")]
pub fn host(leaf: u32, subleaf: u32) -> CpuidRegs {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    CpuidRegs { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: CpuidContext = CpuidContext {
        osxsave: false,
        apic_id: 0,
        native_vmmcall: true,
        tsc_khz: 2_500_000,
        apic: false,
        kvm_pv: false,
        pmu: false,
        pmu_hw: None,
    };

    #[test]
    fn frequency_leaves_follow_the_measured_tsc() {
        let host = CpuidRegs { eax: 3500, ebx: 3500, ecx: 100, edx: 0 };
        assert_eq!(filter(0x16, 0, host, &CTX), CpuidRegs { eax: 2500, ebx: 2500, ecx: 100, edx: 0 });
        assert_eq!(filter(0x15, 0, CpuidRegs { eax: 2, ebx: 200, ecx: 0, edx: 0 }, &CTX), CpuidRegs::default());
        assert_eq!(filter(0x8000_0001, 0, CpuidRegs { edx: !0, ..host }, &CTX).edx & bit::RDTSCP, 0);
    }

    #[test]
    fn leaf1_sets_hypervisor_and_hides_vmx_apic() {
        let host = CpuidRegs { eax: 0x906ea, ebx: 0x0810_0800, ecx: 0xffff_ffff, edx: 0xffff_ffff };
        let g = filter(1, 0, host, &CTX);
        assert_ne!(g.ecx & bit::HYPERVISOR, 0);
        assert_eq!(g.ecx & (bit::VMX | bit::X2APIC | bit::OSXSAVE | bit::MONITOR), 0);
        assert_eq!(g.edx & bit::APIC, 0);
        assert_eq!(g.eax, host.eax);
        assert_eq!(g.ebx >> 16, 1);
        let g = filter(1, 0, host, &CpuidContext { osxsave: true, apic_id: 3, ..CTX });
        assert_ne!(g.ecx & bit::OSXSAVE, 0);
        assert_eq!(g.ebx >> 24, 3);
    }

    #[test]
    fn vireo_signature_and_version() {
        let g = filter(abi::LEAF_SIGNATURE, 0, CpuidRegs::default(), &CTX);
        assert!(abi::is_vireo(g.ebx, g.ecx, g.edx));
        assert_eq!(g.eax, abi::LEAF_MAX);
        let v = filter(abi::LEAF_VERSION, 0, CpuidRegs::default(), &CTX);
        assert_eq!(v.eax, guest_abi::ABI_VERSION);
        assert_eq!(v.ecx, abi::HYPERCALL_INSN_VMMCALL);
        let other = filter(0x4000_0000, 0, CpuidRegs { eax: 1, ebx: 2, ecx: 3, edx: 4 }, &CTX);
        assert_eq!(other, CpuidRegs::default());
    }

    #[test]
    fn svm_and_pmu_hidden() {
        let all = CpuidRegs { eax: !0, ebx: !0, ecx: !0, edx: !0 };
        assert_eq!(filter(0x8000_0001, 0, all, &CTX).ecx & bit::SVM, 0);
        assert_eq!(filter(0x8000_000A, 0, all, &CTX), CpuidRegs::default());
        assert_eq!(filter(0xA, 0, all, &CTX), CpuidRegs::default());
        assert_eq!(filter(7, 0, all, &CTX).ecx & bit::LA57, 0);
        assert_eq!(filter(1, 0, all, &CTX).ecx & bit::PDCM, 0);
        assert_eq!(filter(0x8000_0001, 0, all, &CTX).ecx & bit::PERFCTR_CORE, 0);
        let intel = CpuidContext { native_vmmcall: false, ..CTX };
        assert_eq!(filter(0xA, 0, all, &intel), CpuidRegs::default());
        assert_eq!(filter(1, 0, all, &intel).ecx & bit::PDCM, 0);
    }

    #[test]
    fn virtual_pmu_offered() {
        let all = CpuidRegs { eax: !0, ebx: !0, ecx: !0, edx: !0 };
        let none = CpuidRegs::default();
        let intel = CpuidContext { native_vmmcall: false, pmu: true, ..CTX };
        let a = filter(0xA, 0, all, &intel);
        assert_eq!((a.eax, a.ebx, a.ecx, a.edx), (0x0730_0402, 0x7A, 0, 0x0603));
        assert_ne!(filter(1, 0, none, &intel).ecx & bit::PDCM, 0);
        assert_eq!(filter(0x8000_0001, 0, none, &intel).ecx & bit::PERFCTR_CORE, 0);
        let hw = crate::pmu::hw::HwCaps { vendor: crate::pmu::Vendor::Intel, version: 4, unavailable: 0b100_0000 };
        let on_hw = CpuidContext { pmu_hw: Some(hw), ..intel };
        let g = filter(0xA, 0, CpuidRegs::default(), &on_hw);
        assert_eq!((g.eax, g.ebx), (crate::pmu::intel::cpuid_0a()[0], 0b100_0000), "hardware: the host's events");
        let amd = CpuidContext { pmu: true, ..CTX };
        assert_eq!(filter(0xA, 0, all, &amd), CpuidRegs::default(), "AMD has no leaf 0AH");
        assert_eq!(filter(1, 0, none, &amd).ecx & bit::PDCM, 0);
        assert_ne!(filter(0x8000_0001, 0, none, &amd).ecx & bit::PERFCTR_CORE, 0);
        assert_eq!(filter(0x8000_0022, 0, all, &amd), CpuidRegs::default(), "no PerfMonV2");
    }
}
