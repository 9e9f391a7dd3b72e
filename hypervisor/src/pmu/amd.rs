//! AMD core performance counters as Vireo offers them: the six PerfCtrCore counters
//! (CPUID Fn8000_0001_ECX[23] PerfCtrExtCore) and the legacy four that alias the first four
//! (APM Vol. 2 §13.2 "Performance Monitoring Counters", rev. 3.42).

/// Legacy PerfEvtSel0; PerfEvtSeln = `PERF_EVT_SEL0 + n`, n = 0..3.
pub const PERF_EVT_SEL0: u32 = 0xC001_0000;
/// Legacy PerfCtr0; PerfCtrn = `PERF_CTR0 + n`, n = 0..3.
pub const PERF_CTR0: u32 = 0xC001_0004;
pub const LEGACY_COUNTERS: usize = 4;
/// Core extension: PERF_CTLn = `PERF_CTL_BASE + 2n`, PERF_CTRn = `PERF_CTL_BASE + 2n + 1`,
/// n = 0..5 (PERF_CTL0-3/PERF_CTR0-3 are the legacy registers under other numbers).
pub const PERF_CTL_BASE: u32 = 0xC001_0200;
pub const GP_COUNTERS: usize = 6;

/// PerfEvtSeln / PERF_CTLn (APM Vol. 2 §13.2.1 Figure 13-7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventSelect(pub u64);

impl EventSelect {
    pub const USR: u64 = 1 << 16;
    pub const OS: u64 = 1 << 17;
    pub const EDGE: u64 = 1 << 18;
    pub const INT: u64 = 1 << 20;
    pub const EN: u64 = 1 << 22;
    pub const INV: u64 = 1 << 23;
    /// GuestOnly (bit 40) and HostOnly (bit 41) count only in that mode when EFER.SVME = 1.
    /// The guest never has SVM (Vireo hides it), so they are accepted and change nothing.
    pub const GUEST_ONLY: u64 = 1 << 40;
    pub const HOST_ONLY: u64 = 1 << 41;
    /// Reserved: bits 19, 21, 39:36 and 63:42. A WRMSR with any of them set is #GP(0).
    pub const RESERVED: u64 = 0xFFFF_FCF0_0028_0000;

    /// The 12-bit event: EventSelect[7:0] in bits 7:0, EventSelect[11:8] in bits 35:32.
    pub fn event(self) -> u16 {
        (self.0 & 0xFF) as u16 | (((self.0 >> 32) & 0xF) as u16) << 8
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

/// Which counter an MSR names and whether it is the control or the count register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Ctl(usize),
    Ctr(usize),
}

/// Decodes a PMU MSR number (legacy or core-extension).
pub fn decode(msr: u32) -> Option<Reg> {
    match msr {
        PERF_EVT_SEL0..=0xC001_0003 => Some(Reg::Ctl((msr - PERF_EVT_SEL0) as usize)),
        PERF_CTR0..=0xC001_0007 => Some(Reg::Ctr((msr - PERF_CTR0) as usize)),
        PERF_CTL_BASE..=0xC001_020B => {
            let off = (msr - PERF_CTL_BASE) as usize;
            Some(if off.is_multiple_of(2) { Reg::Ctl(off / 2) } else { Reg::Ctr(off / 2) })
        }
        _ => None,
    }
}
