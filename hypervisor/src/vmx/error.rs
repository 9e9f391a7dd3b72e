//! VMX instruction failures as readable text: the VM-instruction error numbers (SDM
//! Vol. 3C §31.4 "VM Instruction Error Numbers", Table 31-1) and the basic exit reasons
//! (SDM Vol. 3D App. C), for reports.

use core::fmt;

use crate::vmm::BackendError;

/// How a VMX instruction failed (SDM Vol. 3C §31.2 "Conventions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxFail {
    /// VMfailInvalid (CF = 1): no current VMCS, or a bad VMXON pointer/region.
    Invalid,
    /// VMfailValid (ZF = 1) with the VM-instruction error number from the current VMCS.
    Valid(u32),
}

impl VmxFail {
    /// The error as text.
    pub fn text(self) -> &'static str {
        match self {
            VmxFail::Invalid => "VMfailInvalid (no current VMCS, or invalid VMXON/VMCS pointer)",
            VmxFail::Valid(n) => instruction_error_text(n),
        }
    }

    /// The VM-instruction error number (0 for VMfailInvalid, which has none).
    pub fn code(self) -> u64 {
        match self {
            VmxFail::Invalid => 0,
            VmxFail::Valid(n) => n as u64,
        }
    }
}

impl fmt::Display for VmxFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmxFail::Invalid => f.write_str(self.text()),
            VmxFail::Valid(n) => write!(f, "VM-instruction error {n}: {}", self.text()),
        }
    }
}

impl From<VmxFail> for BackendError {
    fn from(e: VmxFail) -> Self {
        BackendError(e.text())
    }
}

/// Table 31-1 "VM-Instruction Error Numbers" (SDM Vol. 3C §31.4).
pub fn instruction_error_text(number: u32) -> &'static str {
    match number {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF (VMXOFF and VMXON between VMLAUNCH and VMRESUME)",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        10 => "VMPTRLD with VMXON pointer",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        16 => "VM entry with invalid executive-VMCS pointer",
        17 => "VM entry with non-launched executive VMCS",
        18 => "VM entry with executive-VMCS pointer not VMXON pointer (when attempting to deactivate the dual-monitor treatment of SMIs and SMM)",
        19 => "VMCALL with non-clear VMCS (when attempting to activate the dual-monitor treatment of SMIs and SMM)",
        20 => "VMCALL with invalid VM-exit control fields",
        22 => "VMCALL with incorrect MSEG revision identifier (when attempting to activate the dual-monitor treatment of SMIs and SMM)",
        23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
        24 => "VMCALL with invalid SMM-monitor features (when attempting to activate the dual-monitor treatment of SMIs and SMM)",
        25 => "VM entry with invalid VM-execution control fields in executive VMCS (when attempting to return from SMM)",
        26 => "VM entry with events blocked by MOV SS",
        28 => "Invalid operand to INVEPT/INVVPID",
        _ => "unknown VM-instruction error number",
    }
}

/// Basic exit reasons (SDM Vol. 3D App. C, Table C-1), for reports.
pub fn exit_reason_name(basic: u16) -> &'static str {
    match basic {
        0 => "exception or NMI",
        1 => "external interrupt",
        2 => "triple fault",
        3 => "INIT signal",
        4 => "start-up IPI",
        5 => "I/O SMI",
        6 => "other SMI",
        7 => "interrupt window",
        8 => "NMI window",
        9 => "task switch",
        10 => "CPUID",
        11 => "GETSEC",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        17 => "RSM",
        18 => "VMCALL",
        19 => "VMCLEAR",
        20 => "VMLAUNCH",
        21 => "VMPTRLD",
        22 => "VMPTRST",
        23 => "VMREAD",
        24 => "VMRESUME",
        25 => "VMWRITE",
        26 => "VMXOFF",
        27 => "VMXON",
        28 => "control-register access",
        29 => "MOV DR",
        30 => "I/O instruction",
        31 => "RDMSR",
        32 => "WRMSR",
        33 => "VM-entry failure due to invalid guest state",
        34 => "VM-entry failure due to MSR loading",
        36 => "MWAIT",
        37 => "monitor trap flag",
        39 => "MONITOR",
        40 => "PAUSE",
        41 => "VM-entry failure due to machine-check event",
        43 => "TPR below threshold",
        44 => "APIC access",
        45 => "virtualized EOI",
        46 => "access to GDTR or IDTR",
        47 => "access to LDTR or TR",
        48 => "EPT violation",
        49 => "EPT misconfiguration",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "VMX-preemption timer expired",
        53 => "INVVPID",
        54 => "WBINVD or WBNOINVD",
        55 => "XSETBV",
        56 => "APIC write",
        57 => "RDRAND",
        58 => "INVPCID",
        59 => "VMFUNC",
        60 => "ENCLS",
        61 => "RDSEED",
        62 => "page-modification log full",
        63 => "XSAVES",
        64 => "XRSTORS",
        65 => "PCONFIG",
        66 => "SPP-related event",
        67 => "UMWAIT",
        68 => "TPAUSE",
        69 => "LOADIWKEY",
        70 => "ENCLV",
        72 => "ENQCMD PASID translation failure",
        73 => "ENQCMDS PASID translation failure",
        74 => "bus lock",
        75 => "instruction timeout",
        76 => "SEAMCALL",
        77 => "TDCALL",
        _ => "unknown exit reason",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_defined_number_has_text() {
        for n in (1..=28).filter(|n| ![14, 21, 27].contains(n)) {
            assert_ne!(instruction_error_text(n), "unknown VM-instruction error number", "{n}");
        }
        for n in [0, 14, 21, 27, 29, 1000] {
            assert_eq!(instruction_error_text(n), "unknown VM-instruction error number", "{n}");
        }
    }

    #[test]
    fn common_entry_errors_read_well() {
        assert_eq!(instruction_error_text(7), "VM entry with invalid control field(s)");
        assert_eq!(instruction_error_text(8), "VM entry with invalid host-state field(s)");
        assert_eq!(VmxFail::Valid(5).text(), "VMRESUME with non-launched VMCS");
        assert_eq!(VmxFail::Valid(12).code(), 12);
        assert_eq!(VmxFail::Invalid.code(), 0);
        assert_eq!(std::format!("{}", VmxFail::Valid(4)), "VM-instruction error 4: VMLAUNCH with non-clear VMCS");
        assert_eq!(BackendError::from(VmxFail::Valid(11)).0, "VMPTRLD with incorrect VMCS revision identifier");
    }

    #[test]
    fn exit_reason_names() {
        assert_eq!(exit_reason_name(48), "EPT violation");
        assert_eq!(exit_reason_name(10), "CPUID");
        assert_eq!(exit_reason_name(35), "unknown exit reason");
    }
}
