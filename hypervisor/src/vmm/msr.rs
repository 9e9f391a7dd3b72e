//! Guest MSR accesses that exit to Vireo, answered architecturally: the MSRs Vireo models
//! behave as the SDM/APM say, every other MSR raises #GP(0) (what real hardware does for an
//! MSR that does not exist, and KVM's default).
//!
//! MSRs the hardware switches per guest (FS/GS bases, SYSCALL/SYSENTER MSRs) are passed
//! through by the backends and never reach this module.

pub const IA32_TIME_STAMP_COUNTER: u32 = 0x10;
pub const IA32_PLATFORM_ID: u32 = 0x17;
pub const IA32_BIOS_SIGN_ID: u32 = 0x8B;
pub const IA32_MISC_ENABLE: u32 = 0x1A0;
/// AMD K8 "interrupt pending message" (C1E), read by Linux's E400 idle routine on family
/// 0xF/0x10 models; 0 = no C1E (as KVM answers).
pub const AMD_INT_PENDING_MSG: u32 = 0xC001_0055;
/// MISC_ENABLE bits Vireo reports (SDM Vol. 4 Table 2-2): fast strings on, performance
/// monitoring available with the virtual PMU (`pmu=on`), BTS and PEBS unavailable.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
pub const MISC_ENABLE_PERFMON: u64 = 1 << 7;
pub const MISC_ENABLE_BTS_UNAVAIL: u64 = 1 << 11;
pub const MISC_ENABLE_PEBS_UNAVAIL: u64 = 1 << 12;
pub const IA32_PAT: u32 = 0x277;
pub const IA32_EFER: u32 = 0xC000_0080;

/// EFER bits a guest may set (SDM Vol. 3A §2.2.1, APM Vol. 2 §3.1.7): SCE, LME, LMA
/// (status, kept by the CPU), NXE. SVME is refused: Vireo offers no nested virtualization.
pub const EFER_WRITABLE: u64 = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11);
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const CR0_PG: u64 = 1 << 31;

/// The outcome of a guest RDMSR/WRMSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrOutcome {
    /// RDMSR result / WRMSR accepted.
    Ok(u64),
    /// Raise #GP(0) in the guest.
    Fault,
}

/// Per-vCPU MSR values Vireo keeps itself (EFER and PAT live in the VMCB/VMCS and go
/// through the backend).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsrState {
    /// The CPU model is Intel: the Intel-only architectural MSRs below exist.
    pub intel: bool,
    pub misc_enable: u64,
}

impl MsrState {
    pub fn new(intel: bool) -> Self {
        Self { intel, misc_enable: MISC_ENABLE_FAST_STRING | MISC_ENABLE_BTS_UNAVAIL | MISC_ENABLE_PEBS_UNAVAIL }
    }

    /// MISC_ENABLE.PERFMON (read-only) says whether the virtual PMU is offered.
    pub fn set_perfmon(&mut self, on: bool) {
        self.misc_enable = (self.misc_enable & !MISC_ENABLE_PERFMON) | if on { MISC_ENABLE_PERFMON } else { 0 };
    }
}

/// Validates a guest write of `value` to EFER given the current EFER and CR0; returns the
/// new EFER to load or `Fault`.
pub fn write_efer(current: u64, value: u64, cr0: u64) -> MsrOutcome {
    if value & !EFER_WRITABLE != 0 {
        return MsrOutcome::Fault;
    }
    // Changing LME while paging is on is a #GP (SDM Vol. 3A §10.8.5).
    if cr0 & CR0_PG != 0 && (value ^ current) & EFER_LME != 0 {
        return MsrOutcome::Fault;
    }
    // LMA is a status bit: writes do not change it.
    MsrOutcome::Ok((value & !EFER_LMA) | (current & EFER_LMA))
}

/// PAT entries must be valid memory types: UC 0, WC 1, WT 4, WP 5, WB 6, UC- 7 (SDM Vol. 3A
/// §13.12.2); anything else is #GP.
pub fn valid_pat(value: u64) -> bool {
    value.to_le_bytes().iter().all(|b| matches!(b, 0 | 1 | 4 | 5 | 6 | 7))
}

/// RDMSR of an MSR that is neither EFER, PAT nor passed through.
pub fn read(state: &MsrState, msr: u32, tsc: u64) -> MsrOutcome {
    match msr {
        IA32_TIME_STAMP_COUNTER => MsrOutcome::Ok(tsc),
        // Linux's verify_cpu reads MISC_ENABLE on Intel before it has an IDT.
        IA32_MISC_ENABLE if state.intel => MsrOutcome::Ok(state.misc_enable),
        // No microcode update facility: revision 0, platform ID 0.
        IA32_BIOS_SIGN_ID | IA32_PLATFORM_ID if state.intel => MsrOutcome::Ok(0),
        AMD_INT_PENDING_MSG if !state.intel => MsrOutcome::Ok(0),
        _ => MsrOutcome::Fault,
    }
}

/// WRMSR of an MSR that is neither EFER, PAT nor passed through.
pub fn write(state: &mut MsrState, msr: u32, value: u64) -> MsrOutcome {
    match msr {
        // Guests toggle a few MISC_ENABLE bits (fast strings, XD disable); the ones Vireo
        // reports as fixed (performance monitoring, BTS/PEBS unavailable) stay as they are.
        IA32_MISC_ENABLE if state.intel => {
            let fixed = MISC_ENABLE_PERFMON | MISC_ENABLE_BTS_UNAVAIL | MISC_ENABLE_PEBS_UNAVAIL;
            state.misc_enable = (value & !fixed) | (state.misc_enable & fixed);
            MsrOutcome::Ok(value)
        }
        // Writing 0 before CPUID to read the microcode revision (SDM Vol. 3A §10.11.7).
        IA32_BIOS_SIGN_ID if state.intel => MsrOutcome::Ok(value),
        // Writing the TSC is allowed; Vireo keeps the guest on the host TSC for now
        // (TSC offsetting comes with the timekeeping work), so the write has no effect.
        IA32_TIME_STAMP_COUNTER => MsrOutcome::Ok(value),
        _ => MsrOutcome::Fault,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_msrs_fault() {
        let mut s = MsrState::default();
        for msr in [0, 0x1B, 0x3A, 0x4b56_4d00, 0xC001_0114, 0xFFFF_FFFF] {
            assert_eq!(read(&s, msr, 0), MsrOutcome::Fault, "{msr:#x}");
            assert_eq!(write(&mut s, msr, 1), MsrOutcome::Fault, "{msr:#x}");
        }
    }

    #[test]
    fn intel_only_msrs() {
        let mut intel = MsrState::new(true);
        let mut amd = MsrState::new(false);
        assert_eq!(read(&intel, IA32_MISC_ENABLE, 0), MsrOutcome::Ok(0x1801));
        assert_eq!(read(&amd, IA32_MISC_ENABLE, 0), MsrOutcome::Fault);
        assert_eq!(write(&mut intel, IA32_MISC_ENABLE, 0), MsrOutcome::Ok(0));
        assert_eq!(read(&intel, IA32_MISC_ENABLE, 0), MsrOutcome::Ok(0x1800), "fast strings off, BTS/PEBS stay");
        assert_eq!(write(&mut intel, IA32_BIOS_SIGN_ID, 0), MsrOutcome::Ok(0));
        assert_eq!(read(&intel, IA32_BIOS_SIGN_ID, 0), MsrOutcome::Ok(0));
        assert_eq!(write(&mut amd, IA32_BIOS_SIGN_ID, 0), MsrOutcome::Fault);
        intel.set_perfmon(true);
        assert_eq!(write(&mut intel, IA32_MISC_ENABLE, 0), MsrOutcome::Ok(0));
        assert_eq!(read(&intel, IA32_MISC_ENABLE, 0), MsrOutcome::Ok(0x1880), "PERFMON is read-only");
    }

    #[test]
    fn pat_validation() {
        assert!(valid_pat(0x0007_0406_0007_0406));
        assert!(valid_pat(0x0606_0606_0606_0606));
        assert!(!valid_pat(0x0007_0406_0007_0402), "type 2 is reserved");
        assert!(!valid_pat(0x0800_0000_0000_0000), "type 8 is reserved");
    }

    #[test]
    fn efer_rules() {
        let lm = EFER_LME | EFER_LMA | 1 << 11 | 1;
        assert_eq!(write_efer(lm, lm | (1 << 12), CR0_PG), MsrOutcome::Fault, "SVME refused");
        assert_eq!(write_efer(lm, lm & !EFER_LME, CR0_PG), MsrOutcome::Fault, "LME flip under paging");
        assert_eq!(write_efer(lm, lm & !1, CR0_PG), MsrOutcome::Ok(lm & !1));
        assert_eq!(write_efer(0, EFER_LME | EFER_LMA, 0), MsrOutcome::Ok(EFER_LME), "LMA is status only");
    }
}
