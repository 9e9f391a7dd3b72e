//! Intel architectural performance monitoring, version 2, as Vireo offers it: MSR numbers,
//! register layouts and the CPUID leaf 0AH answer (SDM Vol. 3B §21.2.1-21.2.2 "Architectural
//! Performance Monitoring Version 1/2", Vol. 4 Table 2-2; section numbers of the 2024 SDM).

use super::{COUNTER_WIDTH, FIXED_COUNTERS};

/// IA32_PMC0; IA32_PMCx = `IA32_PMC0 + x` (legacy 32-bit writable counter aliases).
pub const IA32_PMC0: u32 = 0xC1;
/// IA32_PERFEVTSEL0; IA32_PERFEVTSELx = `IA32_PERFEVTSEL0 + x`.
pub const IA32_PERFEVTSEL0: u32 = 0x186;
/// IA32_FIXED_CTR0 (instructions retired), 1 (core cycles), 2 (reference cycles).
pub const IA32_FIXED_CTR0: u32 = 0x309;
/// IA32_PERF_CAPABILITIES (present when CPUID.1:ECX.PDCM[15] = 1).
pub const IA32_PERF_CAPABILITIES: u32 = 0x345;
pub const IA32_FIXED_CTR_CTRL: u32 = 0x38D;
pub const IA32_PERF_GLOBAL_STATUS: u32 = 0x38E;
pub const IA32_PERF_GLOBAL_CTRL: u32 = 0x38F;
pub const IA32_PERF_GLOBAL_OVF_CTRL: u32 = 0x390;
/// IA32_A_PMC0: the full-width counter aliases (IA32_PERF_CAPABILITIES.FW_WRITE, SDM Vol. 3B
/// §21.2.6 "Full-Width Writes to Performance Counter Registers").
pub const IA32_A_PMC0: u32 = 0x4C1;

/// The architectural PMU version offered (CPUID.0AH:EAX[7:0]).
pub const VERSION: u32 = 2;
/// General-purpose counters per vCPU (CPUID.0AH:EAX[15:8]).
pub const GP_COUNTERS: usize = 4;
/// Length of the CPUID.0AH:EBX event vector (CPUID.0AH:EAX[31:24]): the seven events of
/// version 2 (SDM Vol. 3B Table 21-1).
pub const EVENT_VECTOR_LEN: u32 = 7;
/// CPUID.0AH:EBX, a set bit = that architectural event is NOT available: bit 0 core
/// cycles (available), 1 instructions retired, 2 reference cycles (available), 3 LLC
/// references, 4 LLC misses, 5 branch instructions retired, 6 branch mispredicts retired.
pub const UNAVAILABLE_EVENTS: u32 = 0b111_1010;

/// IA32_PERF_CAPABILITIES.FW_WRITE (bit 13): the IA32_A_PMCx aliases exist. Every other
/// capability (LBR format 0, no PEBS, no SMM freeze) reads 0.
pub const PERF_CAP_FW_WRITE: u64 = 1 << 13;

/// IA32_PERFEVTSELx (SDM Vol. 3B §21.2.1.1 Figure 21-1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventSelect(pub u64);

impl EventSelect {
    pub const USR: u64 = 1 << 16;
    pub const OS: u64 = 1 << 17;
    pub const EDGE: u64 = 1 << 18;
    /// Pin control: no pins here, accepted and ignored.
    pub const PC: u64 = 1 << 19;
    pub const INT: u64 = 1 << 20;
    pub const EN: u64 = 1 << 22;
    pub const INV: u64 = 1 << 23;
    /// Reserved in version 2: bits 63:32 and AnyThread (bit 21, version 3 and later).
    /// A WRMSR with any of them set is #GP(0).
    pub const RESERVED: u64 = 0xFFFF_FFFF_0020_0000;

    pub fn event(self) -> u8 {
        self.0 as u8
    }
    pub fn umask(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub fn cmask(self) -> u8 {
        (self.0 >> 24) as u8
    }
    pub fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }
}

/// IA32_FIXED_CTR_CTRL: four bits per fixed counter i at 4i (SDM Vol. 3B §21.2.2
/// Figure 21-2): bit 0 OS (count at CPL 0), bit 1 USR (CPL > 0), bit 2 AnyThread
/// (version 3+, reserved here), bit 3 PMI.
pub mod fixed_ctrl {
    pub const OS: u64 = 1 << 0;
    pub const USR: u64 = 1 << 1;
    pub const PMI: u64 = 1 << 3;
    /// The bits a version-2 PMU with [`super::FIXED_COUNTERS`] fixed counters defines.
    pub const VALID: u64 = 0xBBB;

    /// The 4-bit field of fixed counter `i`.
    pub fn field(ctrl: u64, i: usize) -> u64 {
        (ctrl >> (4 * i)) & 0xF
    }
}

/// IA32_PERF_GLOBAL_STATUS / OVF_CTRL bits beyond the counters' (SDM Vol. 4 Table 2-2):
/// OvfBuf (DS save area full, bit 62) and CondChgd (bit 63). Neither is ever set here (no
/// DS area), but OVF_CTRL accepts writes of 1 to them.
pub const STATUS_OVF_BUF: u64 = 1 << 62;
pub const STATUS_COND_CHGD: u64 = 1 << 63;

/// The bit of GP counter `i` in GLOBAL_CTRL/STATUS/OVF_CTRL.
pub const fn gp_bit(i: usize) -> u64 {
    1 << i
}
/// The bit of fixed counter `i` in GLOBAL_CTRL/STATUS/OVF_CTRL.
pub const fn fixed_bit(i: usize) -> u64 {
    1 << (32 + i)
}
/// The GLOBAL_CTRL bits that exist: one per GP and per fixed counter; setting any other
/// bit is #GP(0) (SDM Vol. 3B §21.2.2).
pub const GLOBAL_CTRL_VALID: u64 = ((1 << GP_COUNTERS) - 1) | (((1 << FIXED_COUNTERS) - 1) << 32);
/// GLOBAL_OVF_CTRL: the counters' bits plus OvfBuf and CondChgd.
pub const GLOBAL_OVF_CTRL_VALID: u64 = GLOBAL_CTRL_VALID | STATUS_OVF_BUF | STATUS_COND_CHGD;
/// GLOBAL_CTRL after RESET: bits n-1:0 set for the n GP counters (so a version-1 guest,
/// which does not know the register, can count), fixed counters off (SDM Vol. 4 Table 2-2).
pub const GLOBAL_CTRL_RESET: u64 = (1 << GP_COUNTERS) - 1;

/// RDPMC's ECX (SDM Vol. 2B RDPMC): bit 30 selects the fixed counters, bit 31 a "fast"
/// read of the low 32 bits, bits 29:0 the counter index.
pub mod rdpmc {
    pub const FIXED: u32 = 1 << 30;
    pub const FAST: u32 = 1 << 31;
    pub const INDEX: u32 = (1 << 30) - 1;
}

/// CPUID leaf 0AH (SDM Vol. 2A CPUID, "Architectural Performance Monitoring Leaf"): EAX
/// version, GP counters, their width, EBX vector length; EBX the unavailable events; EDX
/// fixed counters [4:0] and their width [12:5].
pub const fn cpuid_0a() -> [u32; 4] {
    let eax = VERSION | ((GP_COUNTERS as u32) << 8) | (COUNTER_WIDTH << 16) | (EVENT_VECTOR_LEN << 24);
    let edx = FIXED_COUNTERS as u32 | (COUNTER_WIDTH << 5);
    [eax, UNAVAILABLE_EVENTS, 0, edx]
}
