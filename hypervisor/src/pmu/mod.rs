//! The virtual PMU of one vCPU, vendor-neutral: counters, what they count, overflow and
//! the PMI; [`intel`] and [`amd`] only hold their vendor's MSR numbers and layouts.
//!
//! No emulator here has a host PMU (QEMU TCG and Bochs), so the counters are "software"
//! counters that count only what Vireo can count exactly (`guest_abi::pmu`):
//! - core and reference cycles: TSC ticks the vCPU spent in guest mode, added by the run
//!   loop from entry to exit ([`Pmu::guest_ran`]): time in Vireo, in other vCPUs and VMs,
//!   and halted (HLT exits) is never counted;
//! - VM exits, all or by class ([`Pmu::count_exit`]), as raw events of Vireo's own;
//! - everything else counts nothing; on Intel the unavailable architectural events are
//!   marked in CPUID 0AH EBX (instructions retired among them): never faked.
//!
//! A counter's privilege filter (USR/OS) is applied to the guest's CPL at the exit that
//! ends the interval (the host timer's exits sample the guest at random points). Edge,
//! invert and counter-mask filters make a counter count nothing (not modelled).
//!
//! All state is per vCPU and lives in the vCPU: nothing to save or restore on a world
//! switch, a time slice or a move to another host CPU.
//!
//! Where the host CPU has a working PMU ([`hw`]), a VM with `pmu=on` gets the hardware path
//! instead: its counters (every event but Vireo's own exit events, which stay software
//! counters) are the host's counters, counting in guest mode only, loaded while a slice
//! of a vCPU whose guest enabled one runs and saved into this register model at its end.
//!
//! With the PMU off (`pmu=off`), [`Pmu::read`]/[`Pmu::write`] claim no MSR (they fault as
//! unknown MSRs) and RDPMC is #GP, as before the vPMU existed.

pub mod amd;
pub mod hw;
pub mod intel;

use guest_abi::pmu as abi;

/// Counter width of every counter, both vendors (CPUID.0AH:EAX[23:16] and EDX[12:5] on
/// Intel; 48 bits on AMD, APM Vol. 2 §13.2.1).
pub const COUNTER_WIDTH: u32 = 48;
pub const COUNTER_MASK: u64 = (1 << COUNTER_WIDTH) - 1;
/// Intel fixed-function counters (instructions retired, core cycles, reference cycles).
pub const FIXED_COUNTERS: usize = 3;
/// The most GP counters either vendor offers.
pub const MAX_GP: usize = amd::GP_COUNTERS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
}

/// The answer to a guest RDMSR/WRMSR of an MSR number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Not a PMU MSR (or the PMU is off): the caller goes on with its other MSRs.
    NotPmu,
    /// The value read / the write was accepted.
    Ok(u64),
    /// #GP(0): a reserved bit, a read-only MSR, an absent counter.
    Gp,
}

/// What a counter counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Source {
    #[default]
    Nothing,
    /// TSC ticks in guest mode (core and reference cycles).
    GuestTicks,
    /// VM exits: `None` all, `Some(k)` those of statistics class `k`.
    Exits(Option<u8>),
    /// The host CPU's counter (hardware path, [`hw`]): counted by the hardware while the
    /// vCPU's counters are loaded, never by Vireo.
    Hardware,
}

/// A live counter's decoded programming.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Program {
    pub source: Source,
    /// Count at CPL > 0.
    pub usr: bool,
    /// Count at CPL 0.
    pub os: bool,
    /// Raise a PMI on overflow.
    pub pmi: bool,
}

impl Program {
    fn counts_at(&self, cpl: u8) -> bool {
        if cpl == 0 {
            self.os
        } else {
            self.usr
        }
    }
}

/// One counter: its value and, while it counts, what it counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counter {
    value: u64,
    /// `None`: not counting (disabled, globally disabled, or no privilege level selected).
    live: Option<Program>,
}

/// Which counter: GP `i` or fixed `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Gp(usize),
    Fixed(usize),
}

/// The virtual PMU of one vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pmu {
    vendor: Vendor,
    on: bool,
    /// The hardware path ([`hw`]): events other than Vireo's own count on the host's counters.
    hardware: bool,
    evtsel: [u64; MAX_GP],
    gp: [Counter; MAX_GP],
    fixed: [Counter; FIXED_COUNTERS],
    /// Intel IA32_FIXED_CTR_CTRL.
    fixed_ctrl: u64,
    /// Intel IA32_PERF_GLOBAL_CTRL.
    global_ctrl: u64,
    /// Intel IA32_PERF_GLOBAL_STATUS.
    global_status: u64,
    /// A counter with its interrupt bit overflowed: a PMI is due through the LVTPC.
    pmi: bool,
    /// Caches over the live counters (recomputed on every control write).
    time_live: bool,
    exits_live: bool,
    cpl_needed: bool,
    /// A live counter counts in hardware: its vCPU's counters must be loaded to run.
    hw_live: bool,
    /// PMIs requested so far (for reports).
    pub pmis: u64,
}

impl Pmu {
    /// The PMU at RESET (all counters 0 and disabled; Intel GLOBAL_CTRL enables the GP
    /// counters). `on`: the VM offers it (`pmu=on`).
    pub fn new(vendor: Vendor, on: bool) -> Self {
        let mut p = Self {
            vendor,
            on,
            hardware: false,
            evtsel: [0; MAX_GP],
            gp: [Counter::default(); MAX_GP],
            fixed: [Counter::default(); FIXED_COUNTERS],
            fixed_ctrl: 0,
            global_ctrl: if vendor == Vendor::Intel { intel::GLOBAL_CTRL_RESET } else { 0 },
            global_status: 0,
            pmi: false,
            time_live: false,
            exits_live: false,
            cpl_needed: false,
            hw_live: false,
            pmis: 0,
        };
        p.refresh();
        p
    }

    pub fn on(&self) -> bool {
        self.on
    }

    /// The same PMU on the hardware path ([`hw`]): the host CPU counts the guest's events.
    pub fn with_hardware(mut self) -> Self {
        self.hardware = self.on;
        self.refresh();
        self
    }

    /// Whether this PMU is on the hardware path.
    pub fn hardware(&self) -> bool {
        self.hardware
    }

    /// A live counter counts in hardware: the vCPU's counters must be loaded while it runs
    /// (false: nothing to load, the lazy case).
    pub fn counts_in_hardware(&self) -> bool {
        self.hw_live
    }

    pub fn vendor(&self) -> Vendor {
        self.vendor
    }

    /// GP counters this vendor offers.
    pub fn gp_counters(&self) -> usize {
        match self.vendor {
            Vendor::Intel => intel::GP_COUNTERS,
            Vendor::Amd => amd::GP_COUNTERS,
        }
    }

    /// Whether a PMI masks the LVT performance counter entry as it is delivered: Intel
    /// processors do (SDM Vol. 3A §12.5.1 Figure 12-8 note; the handler unmasks it), AMD's
    /// do not.
    pub fn pmi_masks_lvtpc(&self) -> bool {
        self.vendor == Vendor::Intel
    }

    /// A live counter counts guest time: the run loop must time its entries.
    pub fn counts_guest_time(&self) -> bool {
        self.time_live
    }

    /// A live counter counts exits.
    pub fn counts_exits(&self) -> bool {
        self.exits_live
    }

    /// A live counter counts at one privilege level only: the caller must pass the CPL.
    pub fn needs_cpl(&self) -> bool {
        self.cpl_needed
    }

    /// A PMI is due (taken: the caller raises it through the LVTPC).
    pub fn take_pmi(&mut self) -> bool {
        core::mem::take(&mut self.pmi)
    }

    fn counter(&mut self, w: Which) -> &mut Counter {
        match w {
            Which::Gp(i) => &mut self.gp[i],
            Which::Fixed(i) => &mut self.fixed[i],
        }
    }

    fn live_counters(&self) -> impl Iterator<Item = (Which, Program)> + '_ {
        let gp = self.gp.iter().enumerate().filter_map(|(i, c)| c.live.map(|p| (Which::Gp(i), p)));
        let fixed = self.fixed.iter().enumerate().filter_map(|(i, c)| c.live.map(|p| (Which::Fixed(i), p)));
        gp.chain(fixed)
    }

    /// Adds `n` events to counter `w`; on a wrap past the counter width, sets its overflow
    /// status (Intel) and, with its interrupt bit, asks for a PMI.
    fn add(&mut self, w: Which, n: u64, pmi: bool) {
        let c = self.counter(w);
        let sum = c.value.wrapping_add(n);
        c.value = sum & COUNTER_MASK;
        if sum > COUNTER_MASK || n > COUNTER_MASK {
            self.overflowed(w, pmi);
        }
    }

    /// Counter `w` wrapped past the counter width: its overflow status (Intel) and, with
    /// its interrupt bit, a PMI.
    fn overflowed(&mut self, w: Which, pmi: bool) {
        if self.vendor == Vendor::Intel {
            self.global_status |= match w {
                Which::Gp(i) => intel::gp_bit(i),
                Which::Fixed(i) => intel::fixed_bit(i),
            };
        }
        if pmi {
            self.pmi = true;
            self.pmis += 1;
        }
    }

    /// The vCPU ran `ticks` TSC ticks in guest mode and exited at CPL `cpl`.
    pub fn guest_ran(&mut self, ticks: u64, cpl: u8) {
        if !self.time_live {
            return;
        }
        let mut live = [(Which::Gp(0), Program::default()); MAX_GP + FIXED_COUNTERS];
        let mut n = 0;
        for (w, p) in self.live_counters() {
            if p.source == Source::GuestTicks && p.counts_at(cpl) {
                live[n] = (w, p);
                n += 1;
            }
        }
        for &(w, p) in &live[..n] {
            self.add(w, ticks, p.pmi);
        }
    }

    /// One VM exit of statistics class `kind` happened at guest CPL `cpl`.
    pub fn count_exit(&mut self, kind: usize, cpl: u8) {
        if !self.exits_live {
            return;
        }
        let mut live = [(Which::Gp(0), Program::default()); MAX_GP];
        let mut n = 0;
        for (w, p) in self.live_counters() {
            let matches = match p.source {
                Source::Exits(None) => true,
                Source::Exits(Some(k)) => k as usize == kind,
                _ => false,
            };
            if matches && p.counts_at(cpl) && n < live.len() {
                live[n] = (w, p);
                n += 1;
            }
        }
        for &(w, p) in &live[..n] {
            self.add(w, 1, p.pmi);
        }
    }

    /// Guest ticks until the first guest-time counter with a PMI overflows (the run loop
    /// makes sure the guest exits by then, so the PMI comes on time).
    ///
    /// On the hardware path ([`hw`]) a hardware counter with a PMI is found overflowed at
    /// an exit, so the guest is made to exit before it may have: after a quarter of the
    /// events it still has to count, in TSC ticks (no event counts more than
    /// [`hw::EVENTS_PER_TICK`] per tick; slower ones just get looked at again), and not
    /// sooner than [`hw::MIN_POLL_TICKS`].
    pub fn ticks_to_overflow(&self) -> Option<u64> {
        if !self.time_live && !self.hw_live {
            return None;
        }
        let gp = self.gp.iter();
        gp.chain(self.fixed.iter())
            .filter_map(|c| c.live.filter(|p| p.pmi).map(|p| (p.source, (COUNTER_MASK - c.value) + 1)))
            .filter_map(|(source, left)| match source {
                Source::GuestTicks => Some(left),
                Source::Hardware => Some((left / hw::EVENTS_PER_TICK).max(hw::MIN_POLL_TICKS)),
                _ => None,
            })
            .min()
    }

    /// Recomputes which counters count what after a control register changed.
    fn refresh(&mut self) {
        let n = self.gp_counters();
        for i in 0..MAX_GP {
            self.gp[i].live = if i < n && self.on { self.decode_gp(i) } else { None };
        }
        for i in 0..FIXED_COUNTERS {
            self.fixed[i].live = if self.vendor == Vendor::Intel && self.on { self.decode_fixed(i) } else { None };
        }
        let (mut time, mut exits, mut cpl, mut hw) = (false, false, false, false);
        for (_, p) in self.live_counters() {
            time |= p.source == Source::GuestTicks;
            exits |= matches!(p.source, Source::Exits(_));
            // The hardware applies a hardware counter's privilege filter itself.
            cpl |= p.usr != p.os && matches!(p.source, Source::GuestTicks | Source::Exits(_));
            hw |= p.source == Source::Hardware;
        }
        (self.time_live, self.exits_live, self.cpl_needed, self.hw_live) = (time, exits, cpl, hw);
    }

    /// Vireo's exit events for a unit mask (0: all; k + 1: class k).
    fn exit_source(umask: u8) -> Source {
        match umask {
            abi::UMASK_ALL_EXITS => Source::Exits(None),
            u if (u as usize) <= guest_abi::stats::KINDS => Source::Exits(Some(u - 1)),
            _ => Source::Nothing,
        }
    }

    fn decode_gp(&self, i: usize) -> Option<Program> {
        let v = self.evtsel[i];
        let (source, usr, os, pmi) = match self.vendor {
            Vendor::Intel => {
                let s = intel::EventSelect(v);
                if !s.has(intel::EventSelect::EN) || self.global_ctrl & intel::gp_bit(i) == 0 {
                    return None;
                }
                let filtered = s.has(intel::EventSelect::EDGE) || s.has(intel::EventSelect::INV) || s.cmask() != 0;
                let code = (s.umask() as u16) << 8 | s.event() as u16;
                let source = match (s.event(), code) {
                    // Vireo's own events stay software counters on the hardware path too.
                    (abi::EVENT_VM_EXITS, _) if filtered => Source::Nothing,
                    (abi::EVENT_VM_EXITS, _) => Self::exit_source(s.umask()),
                    _ if self.hardware => hw::source(self.vendor, v),
                    _ if filtered => Source::Nothing,
                    (_, abi::INTEL_CORE_CYCLES | abi::INTEL_REF_CYCLES) => Source::GuestTicks,
                    _ => Source::Nothing,
                };
                let has = |b| s.has(b);
                (source, has(intel::EventSelect::USR), has(intel::EventSelect::OS), has(intel::EventSelect::INT))
            }
            Vendor::Amd => {
                let s = amd::EventSelect(v);
                if !s.has(amd::EventSelect::EN) {
                    return None;
                }
                let filtered = s.has(amd::EventSelect::EDGE) || s.has(amd::EventSelect::INV) || s.cmask() != 0;
                let code = (s.umask() as u16) << 8 | s.event();
                let source = match code {
                    _ if s.event() == abi::EVENT_VM_EXITS as u16 && filtered => Source::Nothing,
                    _ if s.event() == abi::EVENT_VM_EXITS as u16 => Self::exit_source(s.umask()),
                    _ if self.hardware => hw::source(self.vendor, v),
                    _ if filtered => Source::Nothing,
                    abi::AMD_CPU_CLOCKS => Source::GuestTicks,
                    _ => Source::Nothing,
                };
                let has = |b| s.has(b);
                (source, has(amd::EventSelect::USR), has(amd::EventSelect::OS), has(amd::EventSelect::INT))
            }
        };
        (usr || os).then_some(Program { source, usr, os, pmi })
    }

    fn decode_fixed(&self, i: usize) -> Option<Program> {
        use intel::fixed_ctrl;
        let f = fixed_ctrl::field(self.fixed_ctrl, i);
        if self.global_ctrl & intel::fixed_bit(i) == 0 || f & (fixed_ctrl::OS | fixed_ctrl::USR) == 0 {
            return None;
        }
        // Fixed counter 0 counts instructions retired, which only the hardware can count.
        let source = match i {
            _ if self.hardware => Source::Hardware,
            0 => Source::Nothing,
            _ => Source::GuestTicks,
        };
        Some(Program {
            source,
            usr: f & fixed_ctrl::USR != 0,
            os: f & fixed_ctrl::OS != 0,
            pmi: f & fixed_ctrl::PMI != 0,
        })
    }

    /// Whether `msr` is one of the PMU's (with the PMU on): a write to it may move the
    /// next overflow, which the run loop's slow path re-arms the host timer for.
    pub fn claims(&self, msr: u32) -> bool {
        !matches!(self.read(msr), Access::NotPmu)
    }

    /// RDMSR.
    pub fn read(&self, msr: u32) -> Access {
        if !self.on {
            return Access::NotPmu;
        }
        match self.vendor {
            Vendor::Intel => self.read_intel(msr),
            Vendor::Amd => match amd::decode(msr) {
                Some(amd::Reg::Ctl(i)) => Access::Ok(self.evtsel[i]),
                Some(amd::Reg::Ctr(i)) => Access::Ok(self.gp[i].value),
                None => Access::NotPmu,
            },
        }
    }

    fn read_intel(&self, msr: u32) -> Access {
        use intel::*;
        let gp = GP_COUNTERS as u32;
        let fixed = FIXED_COUNTERS as u32;
        match msr {
            m if (IA32_PMC0..IA32_PMC0 + gp).contains(&m) => Access::Ok(self.gp[(m - IA32_PMC0) as usize].value),
            m if (IA32_A_PMC0..IA32_A_PMC0 + gp).contains(&m) => Access::Ok(self.gp[(m - IA32_A_PMC0) as usize].value),
            m if (IA32_PERFEVTSEL0..IA32_PERFEVTSEL0 + gp).contains(&m) => {
                Access::Ok(self.evtsel[(m - IA32_PERFEVTSEL0) as usize])
            }
            m if (IA32_FIXED_CTR0..IA32_FIXED_CTR0 + fixed).contains(&m) => {
                Access::Ok(self.fixed[(m - IA32_FIXED_CTR0) as usize].value)
            }
            IA32_PERF_CAPABILITIES => Access::Ok(PERF_CAP_FW_WRITE),
            IA32_FIXED_CTR_CTRL => Access::Ok(self.fixed_ctrl),
            IA32_PERF_GLOBAL_STATUS => Access::Ok(self.global_status),
            IA32_PERF_GLOBAL_CTRL => Access::Ok(self.global_ctrl),
            // Write-1-to-clear: reads 0.
            IA32_PERF_GLOBAL_OVF_CTRL => Access::Ok(0),
            _ => Access::NotPmu,
        }
    }

    /// WRMSR.
    pub fn write(&mut self, msr: u32, value: u64) -> Access {
        if !self.on {
            return Access::NotPmu;
        }
        let r = match self.vendor {
            Vendor::Intel => self.write_intel(msr, value),
            Vendor::Amd => match amd::decode(msr) {
                Some(amd::Reg::Ctl(_)) if value & amd::EventSelect::RESERVED != 0 => Access::Gp,
                Some(amd::Reg::Ctl(i)) => {
                    self.evtsel[i] = value;
                    Access::Ok(value)
                }
                // The count register holds 48 bits; the upper 16 are dropped (as KVM does).
                Some(amd::Reg::Ctr(i)) => {
                    self.gp[i].value = value & COUNTER_MASK;
                    Access::Ok(value)
                }
                None => Access::NotPmu,
            },
        };
        if matches!(r, Access::Ok(_)) {
            self.refresh();
        }
        r
    }

    fn write_intel(&mut self, msr: u32, value: u64) -> Access {
        use intel::*;
        let gp = GP_COUNTERS as u32;
        let fixed = FIXED_COUNTERS as u32;
        match msr {
            // Legacy aliases: the low 32 bits are written, sign-extended from bit 31 to the
            // counter width (SDM Vol. 3B §21.2.6); bits 63:32 of the value are ignored.
            m if (IA32_PMC0..IA32_PMC0 + gp).contains(&m) => {
                self.gp[(m - IA32_PMC0) as usize].value = (value as i32 as i64 as u64) & COUNTER_MASK;
                Access::Ok(value)
            }
            // Full-width aliases: every bit beyond the counter width is reserved.
            m if (IA32_A_PMC0..IA32_A_PMC0 + gp).contains(&m) => {
                if value & !COUNTER_MASK != 0 {
                    return Access::Gp;
                }
                self.gp[(m - IA32_A_PMC0) as usize].value = value;
                Access::Ok(value)
            }
            m if (IA32_PERFEVTSEL0..IA32_PERFEVTSEL0 + gp).contains(&m) => {
                if value & EventSelect::RESERVED != 0 {
                    return Access::Gp;
                }
                self.evtsel[(m - IA32_PERFEVTSEL0) as usize] = value;
                Access::Ok(value)
            }
            // Fixed counters: written in full width; higher bits dropped (as KVM does).
            m if (IA32_FIXED_CTR0..IA32_FIXED_CTR0 + fixed).contains(&m) => {
                self.fixed[(m - IA32_FIXED_CTR0) as usize].value = value & COUNTER_MASK;
                Access::Ok(value)
            }
            IA32_FIXED_CTR_CTRL if value & !fixed_ctrl::VALID != 0 => Access::Gp,
            IA32_FIXED_CTR_CTRL => {
                self.fixed_ctrl = value;
                Access::Ok(value)
            }
            IA32_PERF_GLOBAL_CTRL if value & !GLOBAL_CTRL_VALID != 0 => Access::Gp,
            IA32_PERF_GLOBAL_CTRL => {
                self.global_ctrl = value;
                Access::Ok(value)
            }
            IA32_PERF_GLOBAL_OVF_CTRL if value & !GLOBAL_OVF_CTRL_VALID != 0 => Access::Gp,
            IA32_PERF_GLOBAL_OVF_CTRL => {
                self.global_status &= !value;
                Access::Ok(value)
            }
            // Read-only registers (version 2 has no GLOBAL_STATUS_SET/RESET).
            IA32_PERF_GLOBAL_STATUS | IA32_PERF_CAPABILITIES => Access::Gp,
            _ => Access::NotPmu,
        }
    }

    /// RDPMC with `ecx`: the counter's value, or `None` for #GP(0) (an index that names no
    /// counter, or the PMU off). The caller checks CR4.PCE and CPL first.
    pub fn rdpmc(&self, ecx: u32) -> Option<u64> {
        if !self.on {
            return None;
        }
        match self.vendor {
            Vendor::Intel => {
                let i = (ecx & intel::rdpmc::INDEX) as usize;
                let v = if ecx & intel::rdpmc::FIXED != 0 {
                    self.fixed.get(i)?.value
                } else {
                    self.gp[..intel::GP_COUNTERS].get(i)?.value
                };
                Some(if ecx & intel::rdpmc::FAST != 0 { v & 0xFFFF_FFFF } else { v })
            }
            Vendor::Amd => Some(self.gp.get(ecx as usize)?.value),
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod hw_tests;
