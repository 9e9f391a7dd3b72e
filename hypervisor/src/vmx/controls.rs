//! VM-execution, VM-exit and VM-entry controls: the bits Vireo wants, adjusted to what the
//! CPU allows (SDM Vol. 3D App. A.3-A.5; Vol. 3C §25.6-25.8).
//!
//! Each capability MSR reports allowed-0 settings in bits 31:0 (a 1 there forces the
//! control on) and allowed-1 settings in bits 63:32 (a 0 there forces it off). When
//! IA32_VMX_BASIC bit 55 is set, the TRUE_* MSRs (0x48D-0x490) replace the plain ones for
//! pin-based, primary, exit and entry controls: they may allow the "default1" controls
//! (e.g. CR3-load exiting) to be 0 (SDM Vol. 3D App. A.2).
//!
//! This module is pure: it takes recorded MSR values, so it is unit-tested on the host.

use crate::vmm::BackendError;

/// MSR numbers of the VMX capability MSRs not named in `arch::msr`.
pub mod msr {
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    pub const IA32_VMX_VMCS_ENUM: u32 = 0x48A;
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_STAR: u32 = 0xC000_0081;
    pub const IA32_LSTAR: u32 = 0xC000_0082;
    pub const IA32_CSTAR: u32 = 0xC000_0083;
    pub const IA32_FMASK: u32 = 0xC000_0084;
    pub const IA32_FS_BASE: u32 = 0xC000_0100;
    pub const IA32_GS_BASE: u32 = 0xC000_0101;
    pub const IA32_KERNEL_GS_BASE: u32 = 0xC000_0102;
}

/// Pin-based VM-execution controls (SDM Vol. 3C §25.6.1, Table 25-5).
pub mod pin {
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
    pub const VIRTUAL_NMIS: u32 = 1 << 5;
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
    pub const POSTED_INTERRUPTS: u32 = 1 << 7;
}

/// Primary processor-based VM-execution controls (Table 25-6).
pub mod primary {
    pub const INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
    pub const USE_TSC_OFFSETTING: u32 = 1 << 3;
    pub const HLT_EXITING: u32 = 1 << 7;
    pub const INVLPG_EXITING: u32 = 1 << 9;
    pub const MWAIT_EXITING: u32 = 1 << 10;
    pub const RDPMC_EXITING: u32 = 1 << 11;
    pub const RDTSC_EXITING: u32 = 1 << 12;
    pub const CR3_LOAD_EXITING: u32 = 1 << 15;
    pub const CR3_STORE_EXITING: u32 = 1 << 16;
    pub const ACTIVATE_TERTIARY_CONTROLS: u32 = 1 << 17;
    pub const CR8_LOAD_EXITING: u32 = 1 << 19;
    pub const CR8_STORE_EXITING: u32 = 1 << 20;
    pub const USE_TPR_SHADOW: u32 = 1 << 21;
    pub const NMI_WINDOW_EXITING: u32 = 1 << 22;
    pub const MOV_DR_EXITING: u32 = 1 << 23;
    pub const UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    pub const MONITOR_TRAP_FLAG: u32 = 1 << 27;
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const MONITOR_EXITING: u32 = 1 << 29;
    pub const PAUSE_EXITING: u32 = 1 << 30;
    pub const ACTIVATE_SECONDARY_CONTROLS: u32 = 1 << 31;
}

/// Secondary processor-based VM-execution controls (Table 25-7).
pub mod secondary {
    pub const VIRTUALIZE_APIC_ACCESSES: u32 = 1 << 0;
    pub const ENABLE_EPT: u32 = 1 << 1;
    pub const DESCRIPTOR_TABLE_EXITING: u32 = 1 << 2;
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    pub const VIRTUALIZE_X2APIC: u32 = 1 << 4;
    pub const ENABLE_VPID: u32 = 1 << 5;
    pub const WBINVD_EXITING: u32 = 1 << 6;
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
    pub const APIC_REGISTER_VIRTUALIZATION: u32 = 1 << 8;
    pub const VIRTUAL_INTERRUPT_DELIVERY: u32 = 1 << 9;
    pub const PAUSE_LOOP_EXITING: u32 = 1 << 10;
    pub const RDRAND_EXITING: u32 = 1 << 11;
    pub const ENABLE_INVPCID: u32 = 1 << 12;
    pub const ENABLE_VM_FUNCTIONS: u32 = 1 << 13;
    pub const VMCS_SHADOWING: u32 = 1 << 14;
    pub const ENABLE_ENCLS_EXITING: u32 = 1 << 15;
    pub const RDSEED_EXITING: u32 = 1 << 16;
    pub const ENABLE_PML: u32 = 1 << 17;
    pub const EPT_VIOLATION_VE: u32 = 1 << 18;
    pub const CONCEAL_VMX_FROM_PT: u32 = 1 << 19;
    pub const ENABLE_XSAVES_XRSTORS: u32 = 1 << 20;
    pub const MODE_BASED_EXECUTE_CONTROL: u32 = 1 << 22;
    pub const USE_TSC_SCALING: u32 = 1 << 25;
}

/// VM-exit controls (SDM Vol. 3C §25.7.1, Table 25-13).
pub mod exit {
    pub const SAVE_DEBUG_CONTROLS: u32 = 1 << 2;
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    pub const LOAD_PERF_GLOBAL_CTRL: u32 = 1 << 12;
    pub const ACKNOWLEDGE_INTERRUPT_ON_EXIT: u32 = 1 << 15;
    pub const SAVE_PAT: u32 = 1 << 18;
    pub const LOAD_PAT: u32 = 1 << 19;
    pub const SAVE_EFER: u32 = 1 << 20;
    pub const LOAD_EFER: u32 = 1 << 21;
    pub const SAVE_PREEMPTION_TIMER: u32 = 1 << 22;
}

/// VM-entry controls (SDM Vol. 3C §25.8.1, Table 25-15).
pub mod entry {
    pub const LOAD_DEBUG_CONTROLS: u32 = 1 << 2;
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    pub const ENTRY_TO_SMM: u32 = 1 << 10;
    pub const DEACTIVATE_DUAL_MONITOR: u32 = 1 << 11;
    pub const LOAD_PERF_GLOBAL_CTRL: u32 = 1 << 13;
    pub const LOAD_PAT: u32 = 1 << 14;
    pub const LOAD_EFER: u32 = 1 << 15;
}

/// IA32_VMX_BASIC bits (SDM Vol. 3D App. A.1).
pub mod basic {
    /// Bits 30:0: VMCS revision identifier.
    pub const REVISION_MASK: u64 = 0x7FFF_FFFF;
    /// Bit 48: VMXON/VMCS/bitmap addresses limited to 32 bits.
    pub const ADDRESSES_32BIT: u64 = 1 << 48;
    /// Bit 55: the TRUE_* control MSRs exist.
    pub const TRUE_CTLS: u64 = 1 << 55;

    /// Bits 44:32: bytes to allocate for the VMXON and VMCS regions (at most 4096).
    pub const fn region_size(basic: u64) -> u64 {
        (basic >> 32) & 0x1FFF
    }
}

/// IA32_VMX_EPT_VPID_CAP bits for the invalidation instructions (SDM Vol. 3D App. A.10).
pub mod ept_vpid_cap {
    pub const INVEPT: u64 = 1 << 20;
    pub const INVEPT_SINGLE_CONTEXT: u64 = 1 << 25;
    pub const INVEPT_ALL_CONTEXT: u64 = 1 << 26;
    pub const INVVPID: u64 = 1 << 32;
    pub const INVVPID_SINGLE_CONTEXT: u64 = 1 << 41;
    pub const INVVPID_ALL_CONTEXT: u64 = 1 << 42;
}

/// The raw capability MSRs the backend needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapMsrs {
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub procbased2: u64,
    pub exit: u64,
    pub entry: u64,
    /// TRUE_* MSRs; read only when `basic` bit 55 is set (else zero).
    pub true_pinbased: u64,
    pub true_procbased: u64,
    pub true_exit: u64,
    pub true_entry: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub ept_vpid_cap: u64,
}

impl CapMsrs {
    /// Reads them through `read` (an MSR read on the hardware, a table in tests).
    pub fn read(read: impl Fn(u32) -> u64) -> Self {
        use crate::arch::msr as a;
        let basic = read(a::IA32_VMX_BASIC);
        let has_true = basic & basic::TRUE_CTLS != 0;
        let procbased = read(a::IA32_VMX_PROCBASED_CTLS);
        let tru = |m: u32| if has_true { read(m) } else { 0 };
        // CTLS2 exists only if "activate secondary controls" may be 1 (App. A.3.3).
        let procbased2 = if procbased & ((primary::ACTIVATE_SECONDARY_CONTROLS as u64) << 32) != 0 {
            read(a::IA32_VMX_PROCBASED_CTLS2)
        } else {
            0
        };
        let procbased2_hi = procbased2 >> 32;
        let ept_vpid_cap = if procbased2_hi & (secondary::ENABLE_EPT | secondary::ENABLE_VPID) as u64 != 0 {
            read(a::IA32_VMX_EPT_VPID_CAP)
        } else {
            0
        };
        Self {
            basic,
            pinbased: read(a::IA32_VMX_PINBASED_CTLS),
            procbased,
            procbased2,
            exit: read(a::IA32_VMX_EXIT_CTLS),
            entry: read(a::IA32_VMX_ENTRY_CTLS),
            true_pinbased: tru(msr::IA32_VMX_TRUE_PINBASED_CTLS),
            true_procbased: tru(msr::IA32_VMX_TRUE_PROCBASED_CTLS),
            true_exit: tru(msr::IA32_VMX_TRUE_EXIT_CTLS),
            true_entry: tru(msr::IA32_VMX_TRUE_ENTRY_CTLS),
            cr0_fixed0: read(msr::IA32_VMX_CR0_FIXED0),
            cr0_fixed1: read(msr::IA32_VMX_CR0_FIXED1),
            cr4_fixed0: read(msr::IA32_VMX_CR4_FIXED0),
            cr4_fixed1: read(msr::IA32_VMX_CR4_FIXED1),
            ept_vpid_cap,
        }
    }

    fn has_true(&self) -> bool {
        self.basic & basic::TRUE_CTLS != 0
    }

    /// The MSR that governs pin-based controls (TRUE when available).
    pub fn pin_cap(&self) -> u64 {
        if self.has_true() {
            self.true_pinbased
        } else {
            self.pinbased
        }
    }
    pub fn primary_cap(&self) -> u64 {
        if self.has_true() {
            self.true_procbased
        } else {
            self.procbased
        }
    }
    pub fn exit_cap(&self) -> u64 {
        if self.has_true() {
            self.true_exit
        } else {
            self.exit
        }
    }
    pub fn entry_cap(&self) -> u64 {
        if self.has_true() {
            self.true_entry
        } else {
            self.entry
        }
    }
}

/// Forces the allowed-0 bits (low half of `cap`) on and clears what allowed-1 (high half)
/// forbids.
pub const fn adjust(want: u32, cap: u64) -> u32 {
    (want | cap as u32) & (cap >> 32) as u32
}

/// Whether `cap` allows every bit of `bits` to be 1.
pub const fn allowed1(cap: u64, bits: u32) -> bool {
    (cap >> 32) as u32 & bits == bits
}

/// The controls a vCPU starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Controls {
    pub pin: u32,
    /// Without interrupt-window exiting (toggled at run time, see [`Controls::window_allowed`]).
    pub primary: u32,
    pub secondary: u32,
    pub exit: u32,
    /// Without "IA-32e mode guest" (set from guest EFER.LMA at run time).
    pub entry: u32,
    /// The primary controls chose I/O bitmaps (all ones) instead of unconditional I/O
    /// exiting: the vCPU needs the two bitmap pages.
    pub io_bitmaps: bool,
    /// MOV to/from CR3 exits because the CPU forces CR3-load/store exiting (no TRUE MSRs):
    /// the backend emulates them.
    pub cr3_exiting: bool,
    /// Interrupt-window exiting may be set.
    pub window_allowed: bool,
}

/// A required control the CPU does not allow.
fn require(got: u32, bits: &[(u32, &'static str)]) -> Result<(), BackendError> {
    for &(bit, what) in bits {
        if got & bit != bit {
            return Err(BackendError(what));
        }
    }
    Ok(())
}

/// Computes the controls from the capability MSRs. `vpid`: enable VPID (the caller checked
/// the capability and has a non-zero VPID).
pub fn compute(caps: &CapMsrs, vpid: bool) -> Result<Controls, BackendError> {
    let pin_cap = caps.pin_cap();
    // The VMX-preemption timer where the CPU has it: slices end without a host interrupt.
    let pin = adjust(pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING | pin::PREEMPTION_TIMER, pin_cap);
    require(
        pin,
        &[
            (pin::EXTERNAL_INTERRUPT_EXITING, "VMX: the CPU does not allow external-interrupt exiting"),
            (pin::NMI_EXITING, "VMX: the CPU does not allow NMI exiting"),
        ],
    )?;

    let primary_cap = caps.primary_cap();
    let io = if allowed1(primary_cap, primary::UNCONDITIONAL_IO_EXITING) {
        primary::UNCONDITIONAL_IO_EXITING
    } else {
        primary::USE_IO_BITMAPS
    };
    // RDPMC exiting: the guest's counters are the virtual PMU's, never the host's.
    let want = primary::HLT_EXITING
        | primary::RDPMC_EXITING
        | io
        | primary::USE_MSR_BITMAPS
        | primary::ACTIVATE_SECONDARY_CONTROLS;
    // Interrupt-window exiting is off until requested: never forced on by a sane CPU, but
    // an allowed-0 bit would be honoured by `adjust` anyway.
    let primary = adjust(want, primary_cap);
    require(
        primary,
        &[
            (primary::HLT_EXITING, "VMX: the CPU does not allow HLT exiting"),
            (primary::RDPMC_EXITING, "VMX: the CPU does not allow RDPMC exiting"),
            (primary::USE_MSR_BITMAPS, "VMX: the CPU does not allow MSR bitmaps"),
            (primary::ACTIVATE_SECONDARY_CONTROLS, "VMX: the CPU has no secondary processor-based controls"),
        ],
    )?;
    if primary & (primary::UNCONDITIONAL_IO_EXITING | primary::USE_IO_BITMAPS) == 0 {
        return Err(BackendError("VMX: the CPU allows neither unconditional I/O exiting nor I/O bitmaps"));
    }
    if primary & primary::USE_TPR_SHADOW != 0 {
        return Err(BackendError("VMX: the CPU forces the TPR shadow on (unsupported)"));
    }

    let sec_cap = caps.procbased2;
    let mut want2 = secondary::ENABLE_EPT | secondary::UNRESTRICTED_GUEST;
    for optional in [
        secondary::ENABLE_RDTSCP,
        secondary::ENABLE_INVPCID,
        secondary::ENABLE_XSAVES_XRSTORS,
        // A vCPU spinning on a lock exits (SDM Vol. 3C §26.1.3): lock-holder preemption.
        secondary::PAUSE_LOOP_EXITING,
    ] {
        if allowed1(sec_cap, optional) {
            want2 |= optional;
        }
    }
    if vpid && allowed1(sec_cap, secondary::ENABLE_VPID) {
        want2 |= secondary::ENABLE_VPID;
    }
    let secondary = adjust(want2, sec_cap);
    require(
        secondary,
        &[
            (secondary::ENABLE_EPT, "VMX: the CPU does not allow EPT"),
            (secondary::UNRESTRICTED_GUEST, "VMX: the CPU does not allow unrestricted guest"),
        ],
    )?;

    let exit_cap = caps.exit_cap();
    let mut want_exit = exit::HOST_ADDRESS_SPACE_SIZE
        | exit::SAVE_EFER
        | exit::LOAD_EFER
        | exit::SAVE_PAT
        | exit::LOAD_PAT
        | exit::ACKNOWLEDGE_INTERRUPT_ON_EXIT;
    // With the preemption timer, its value is saved at every VM exit (SDM Vol. 3C §28.3.4)
    // where the CPU allows it: the count goes on at the next entry, so the timer needs a
    // VMWRITE only when its deadline changes, not at every entry.
    if pin & pin::PREEMPTION_TIMER != 0 && allowed1(exit_cap, exit::SAVE_PREEMPTION_TIMER) {
        want_exit |= exit::SAVE_PREEMPTION_TIMER;
    }
    let exit = adjust(want_exit, exit_cap);
    require(
        exit,
        &[
            (exit::HOST_ADDRESS_SPACE_SIZE, "VMX: the CPU does not allow a 64-bit host (host address-space size)"),
            (exit::SAVE_EFER, "VMX: the CPU does not allow saving IA32_EFER on VM exit"),
            (exit::LOAD_EFER, "VMX: the CPU does not allow loading IA32_EFER on VM exit"),
            (exit::SAVE_PAT, "VMX: the CPU does not allow saving IA32_PAT on VM exit"),
            (exit::LOAD_PAT, "VMX: the CPU does not allow loading IA32_PAT on VM exit"),
            (exit::ACKNOWLEDGE_INTERRUPT_ON_EXIT, "VMX: the CPU does not allow acknowledge interrupt on exit"),
        ],
    )?;

    let entry_cap = caps.entry_cap();
    let entry = adjust(entry::LOAD_EFER | entry::LOAD_PAT, entry_cap) & !entry::IA32E_MODE_GUEST;
    require(
        entry,
        &[
            (entry::LOAD_EFER, "VMX: the CPU does not allow loading IA32_EFER on VM entry"),
            (entry::LOAD_PAT, "VMX: the CPU does not allow loading IA32_PAT on VM entry"),
        ],
    )?;
    if !allowed1(entry_cap, entry::IA32E_MODE_GUEST) {
        return Err(BackendError("VMX: the CPU does not allow 64-bit guests (IA-32e mode guest)"));
    }
    if entry & (entry::ENTRY_TO_SMM | entry::DEACTIVATE_DUAL_MONITOR) != 0 {
        return Err(BackendError("VMX: the CPU forces SMM-related entry controls on"));
    }

    Ok(Controls {
        pin,
        primary,
        secondary,
        exit,
        entry,
        io_bitmaps: primary & primary::USE_IO_BITMAPS != 0,
        cr3_exiting: primary & (primary::CR3_LOAD_EXITING | primary::CR3_STORE_EXITING) != 0,
        window_allowed: allowed1(primary_cap, primary::INTERRUPT_WINDOW_EXITING),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::msr as a;

    /// Bochs corei7_skylake_x-like values (allowed-0 low, allowed-1 high).
    pub(crate) fn skylake() -> CapMsrs {
        CapMsrs::read(|m| match m {
            a::IA32_VMX_BASIC => (1 << 55) | (6 << 50) | (0x1000 << 32) | 1,
            a::IA32_VMX_PINBASED_CTLS => 0x0000_007f_0000_0016,
            a::IA32_VMX_PROCBASED_CTLS => 0xfff9_fffe_0401_e172,
            a::IA32_VMX_PROCBASED_CTLS2 => 0x0053_7fff_0000_0000,
            a::IA32_VMX_EXIT_CTLS => 0x01ff_ffff_0003_6dff,
            a::IA32_VMX_ENTRY_CTLS => 0x0003_ffff_0000_11ff,
            a::IA32_VMX_EPT_VPID_CAP => 0x0f01_0633_4141,
            msr::IA32_VMX_TRUE_PINBASED_CTLS => 0x0000_007f_0000_0016,
            msr::IA32_VMX_TRUE_PROCBASED_CTLS => 0xfff9_fffe_0400_6172,
            msr::IA32_VMX_TRUE_EXIT_CTLS => 0x01ff_ffff_0003_6dfb,
            msr::IA32_VMX_TRUE_ENTRY_CTLS => 0x0003_ffff_0000_11fb,
            msr::IA32_VMX_CR0_FIXED0 => 0x8000_0021,
            msr::IA32_VMX_CR0_FIXED1 => 0xffff_ffff,
            msr::IA32_VMX_CR4_FIXED0 => 0x2000,
            msr::IA32_VMX_CR4_FIXED1 => 0x3767ff,
            _ => 0,
        })
    }

    #[test]
    fn adjust_forces_allowed0_and_clears_forbidden() {
        // allowed-0 = 0b0110, allowed-1 = 0b1110.
        let cap = (0b1110u64 << 32) | 0b0110;
        assert_eq!(adjust(0b0001, cap), 0b0110);
        assert_eq!(adjust(0b1000, cap), 0b1110);
        assert!(allowed1(cap, 0b1000));
        assert!(!allowed1(cap, 0b1001));
    }

    #[test]
    fn skylake_with_true_ctls() {
        let caps = skylake();
        let c = compute(&caps, true).unwrap();
        assert_eq!(c.pin & (pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING), 0x9);
        // Default1 bits of the TRUE MSR only (CR3 exiting is not forced).
        assert_eq!(c.primary & 0x0400_6172, 0x0400_6172);
        assert!(!c.cr3_exiting);
        assert_eq!(c.primary & primary::INTERRUPT_WINDOW_EXITING, 0);
        assert!(c.primary & primary::UNCONDITIONAL_IO_EXITING != 0 && !c.io_bitmaps);
        assert!(c.primary & primary::HLT_EXITING != 0);
        assert!(c.primary & primary::USE_MSR_BITMAPS != 0);
        for bit in [
            secondary::ENABLE_EPT,
            secondary::UNRESTRICTED_GUEST,
            secondary::ENABLE_VPID,
            secondary::ENABLE_RDTSCP,
            secondary::ENABLE_INVPCID,
        ] {
            assert!(c.secondary & bit != 0, "{bit:#x}");
        }
        // XSAVES/XRSTORS follows the capability.
        assert_eq!(c.secondary & secondary::ENABLE_XSAVES_XRSTORS != 0, allowed1(caps.procbased2, 1 << 20));
        assert!(c.exit & exit::HOST_ADDRESS_SPACE_SIZE != 0);
        assert!(c.exit & exit::ACKNOWLEDGE_INTERRUPT_ON_EXIT != 0);
        assert_eq!(c.entry & entry::IA32E_MODE_GUEST, 0);
        assert!(c.entry & entry::LOAD_EFER != 0 && c.entry & entry::LOAD_PAT != 0);
        // TRUE exit/entry MSRs free "save/load debug controls" (bit 2).
        assert_eq!(c.exit & exit::SAVE_DEBUG_CONTROLS, 0);
        assert_eq!(c.entry & entry::LOAD_DEBUG_CONTROLS, 0);
        assert!(c.window_allowed);
        let no_vpid = compute(&caps, false).unwrap();
        assert_eq!(no_vpid.secondary & secondary::ENABLE_VPID, 0);
    }

    #[test]
    fn plain_ctls_force_default1_and_cr3_exiting() {
        let mut caps = skylake();
        caps.basic &= !basic::TRUE_CTLS;
        let c = compute(&caps, true).unwrap();
        assert!(c.cr3_exiting);
        assert_eq!(c.primary & 0x0401_e172, 0x0401_e172);
        assert!(c.exit & exit::SAVE_DEBUG_CONTROLS != 0);
        assert!(c.entry & entry::LOAD_DEBUG_CONTROLS != 0);
    }

    #[test]
    fn io_bitmaps_when_unconditional_io_is_not_allowed() {
        let mut caps = skylake();
        caps.true_procbased &= !((primary::UNCONDITIONAL_IO_EXITING as u64) << 32);
        let c = compute(&caps, false).unwrap();
        assert!(c.io_bitmaps);
        assert_eq!(c.primary & primary::UNCONDITIONAL_IO_EXITING, 0);
        assert!(c.primary & primary::USE_IO_BITMAPS != 0);
    }

    #[test]
    fn missing_required_controls_are_named() {
        let mut caps = skylake();
        caps.procbased2 &= !((secondary::UNRESTRICTED_GUEST as u64) << 32);
        assert_eq!(compute(&caps, true), Err(BackendError("VMX: the CPU does not allow unrestricted guest")));
        let mut caps = skylake();
        caps.procbased2 &= !((secondary::ENABLE_EPT as u64) << 32);
        assert_eq!(compute(&caps, true), Err(BackendError("VMX: the CPU does not allow EPT")));
        let mut caps = skylake();
        caps.true_exit &= !((exit::LOAD_EFER as u64) << 32);
        assert_eq!(compute(&caps, true), Err(BackendError("VMX: the CPU does not allow loading IA32_EFER on VM exit")));
        let mut caps = skylake();
        caps.true_entry &= !((entry::IA32E_MODE_GUEST as u64) << 32);
        assert!(compute(&caps, true).is_err());
    }

    #[test]
    fn optional_secondary_controls_only_if_allowed() {
        let mut caps = skylake();
        caps.procbased2 &=
            !(((secondary::ENABLE_RDTSCP | secondary::ENABLE_INVPCID | secondary::ENABLE_VPID) as u64) << 32);
        let c = compute(&caps, true).unwrap();
        assert_eq!(c.secondary & (secondary::ENABLE_RDTSCP | secondary::ENABLE_INVPCID | secondary::ENABLE_VPID), 0);
    }

    #[test]
    fn ctls2_and_ept_cap_read_only_when_present() {
        let caps = CapMsrs::read(|m| match m {
            a::IA32_VMX_PROCBASED_CTLS => 0x7fff_ffff_0000_0000,
            a::IA32_VMX_PROCBASED_CTLS2 | a::IA32_VMX_EPT_VPID_CAP => panic!("must not read {m:#x}"),
            msr::IA32_VMX_TRUE_PROCBASED_CTLS => panic!("no TRUE MSRs without basic bit 55"),
            _ => 0,
        });
        assert_eq!(caps.procbased2, 0);
        assert!(compute(&caps, false).is_err());
    }
}
