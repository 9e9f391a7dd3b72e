//! Exit statistics: count and TSC cycles for every exit class, per vCPU.
//!
//! Cycles are measured from the exit (TSC read by the backend right after the hardware
//! exit) to the next entry, i.e. the time Vireo spends handling that exit. Recording is two
//! additions into a fixed array, cheap enough to stay on.
//!
//! A vCPU's live figures are [`VcpuCounters`]: atomics written only by the host CPU running
//! that vCPU (plain loads and stores, no locked instructions on the exit path) and read by
//! anyone without a lock (the end-of-VM report, a guest's statistics hypercall asking for
//! another vCPU or the whole VM). [`ExitStats`] is a plain copy of them.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::exit::{ExitKind, EXIT_KINDS};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitClassStats {
    pub count: u64,
    pub cycles: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExitStats {
    classes: [ExitClassStats; EXIT_KINDS],
}

impl ExitStats {
    pub const fn new() -> Self {
        Self { classes: [ExitClassStats { count: 0, cycles: 0 }; EXIT_KINDS] }
    }

    /// Records one exit of `kind` that took `cycles` to handle.
    #[inline]
    pub fn record(&mut self, kind: &ExitKind, cycles: u64) {
        let c = &mut self.classes[kind.index()];
        c.count += 1;
        c.cycles = c.cycles.wrapping_add(cycles);
    }

    /// Adds `other`'s counts (VM-wide totals from per-vCPU statistics).
    pub fn add(&mut self, other: &ExitStats) {
        for (a, b) in self.classes.iter_mut().zip(other.classes.iter()) {
            a.count += b.count;
            a.cycles = a.cycles.wrapping_add(b.cycles);
        }
    }

    pub fn total(&self) -> ExitClassStats {
        self.classes.iter().fold(ExitClassStats::default(), |a, c| ExitClassStats {
            count: a.count + c.count,
            cycles: a.cycles.wrapping_add(c.cycles),
        })
    }

    /// Classes with at least one exit: (name, stats).
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, ExitClassStats)> + '_ {
        self.classes.iter().enumerate().filter(|(_, c)| c.count > 0).map(|(i, c)| (ExitKind::class_name(i), *c))
    }

    /// Raw per-class array (index = `ExitKind::index`), e.g. for the guest-visible copy.
    pub fn classes(&self) -> &[ExitClassStats; EXIT_KINDS] {
        &self.classes
    }

    /// `self - earlier`, class by class (figures since a mark).
    pub fn since(&self, earlier: &ExitStats) -> ExitStats {
        let mut d = self.clone();
        for (a, b) in d.classes.iter_mut().zip(earlier.classes.iter()) {
            a.count = a.count.saturating_sub(b.count);
            a.cycles = a.cycles.wrapping_sub(b.cycles);
        }
        d
    }
}

/// One vCPU's live exit figures (single writer: the host CPU running the vCPU).
pub struct ExitCounters {
    classes: [[AtomicU64; 2]; EXIT_KINDS],
}

impl Default for ExitCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl ExitCounters {
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const ZERO: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
        Self { classes: [ZERO; EXIT_KINDS] }
    }

    /// Records one exit of `kind` that took `cycles` to handle. Only the vCPU's own host CPU
    /// calls this, so a load and a store suffice (readers see each counter whole).
    #[inline]
    pub fn record(&self, kind: &ExitKind, cycles: u64) {
        let [count, sum] = &self.classes[kind.index()];
        count.store(count.load(Relaxed) + 1, Relaxed);
        sum.store(sum.load(Relaxed).wrapping_add(cycles), Relaxed);
    }

    /// Counts one exit of `kind` without its handling time (the exit fast path,
    /// `vmm::fast`: a few dozen instructions).
    #[inline]
    pub fn count(&self, kind: &ExitKind) {
        let [count, _] = &self.classes[kind.index()];
        count.store(count.load(Relaxed) + 1, Relaxed);
    }

    /// A copy of the figures now.
    pub fn snapshot(&self) -> ExitStats {
        let mut s = ExitStats::new();
        for (d, [count, cycles]) in s.classes.iter_mut().zip(self.classes.iter()) {
            *d = ExitClassStats { count: count.load(Relaxed), cycles: cycles.load(Relaxed) };
        }
        s
    }

    /// Overwrites the figures with `from` (a mark is a snapshot kept in counters of its own).
    pub fn set(&self, from: &ExitStats) {
        for (d, c) in self.classes.iter().zip(from.classes.iter()) {
            d[0].store(c.count, Relaxed);
            d[1].store(c.cycles, Relaxed);
        }
    }
}

/// What an I/O or MSR exit was for: the port or MSR number tells which device or register
/// the exits to cut are (10,000 reads of port 0x64 were a Linux i8042 probe timing out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitSource {
    /// IN/OUT (string I/O too) to this port.
    Port(u16),
    /// RDMSR of this MSR.
    Rdmsr(u32),
    /// WRMSR of this MSR.
    Wrmsr(u32),
}

impl ExitSource {
    /// The source of an exit, if it has one (`rcx`: the guest's RCX, the MSR number).
    #[inline]
    pub fn of(kind: &ExitKind, rcx: u64) -> Option<Self> {
        match kind {
            ExitKind::Io(io) => Some(Self::Port(io.port)),
            ExitKind::Rdmsr => Some(Self::Rdmsr(rcx as u32)),
            ExitKind::Wrmsr => Some(Self::Wrmsr(rcx as u32)),
            _ => None,
        }
    }

    /// Packed, never 0: bits 32-33 the kind (1-3), bits 0-31 the number.
    fn key(self) -> u64 {
        match self {
            Self::Port(p) => 1 << 32 | p as u64,
            Self::Rdmsr(m) => 2 << 32 | m as u64,
            Self::Wrmsr(m) => 3 << 32 | m as u64,
        }
    }

    fn from_key(key: u64) -> Option<Self> {
        let n = key as u32;
        match key >> 32 {
            1 => Some(Self::Port(n as u16)),
            2 => Some(Self::Rdmsr(n)),
            3 => Some(Self::Wrmsr(n)),
            _ => None,
        }
    }
}

impl core::fmt::Display for ExitSource {
    /// As the end-of-VM report prints it: `kind=io port=0x3fd`, `kind=wrmsr msr=0x6e0`.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Port(p) => write!(f, "kind=io port={p:#x}"),
            Self::Rdmsr(m) => write!(f, "kind=rdmsr msr={m:#x}"),
            Self::Wrmsr(m) => write!(f, "kind=wrmsr msr={m:#x}"),
        }
    }
}

/// Slots of [`ExitSources`] (4 KiB a vCPU): a Linux boot touches about a hundred ports and MSRs.
pub const SOURCE_SLOTS: usize = 256;
/// Slots tried per source (open addressing) before it counts as `other`.
const SOURCE_PROBES: usize = 8;

/// Exits per [`ExitSource`] of one vCPU: a fixed open-addressed table, written only by the
/// vCPU's host CPU (plain loads and stores, as [`ExitCounters`]); a source that finds no
/// slot counts in `other`. Recording is a multiplication and one to eight loads.
pub struct ExitSources {
    /// `[key, count]`, key 0 = free.
    slots: [[AtomicU64; 2]; SOURCE_SLOTS],
    other: AtomicU64,
}

impl Default for ExitSources {
    fn default() -> Self {
        Self::new()
    }
}

impl ExitSources {
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const FREE: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
        Self { slots: [FREE; SOURCE_SLOTS], other: AtomicU64::new(0) }
    }

    /// Counts one exit for `source`.
    #[inline]
    pub fn record(&self, source: ExitSource) {
        let key = source.key();
        // Fibonacci hashing: the top bits of key * 2^64/phi.
        let h = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize;
        for i in 0..SOURCE_PROBES {
            let [k, count] = &self.slots[(h + i) % SOURCE_SLOTS];
            let have = k.load(Relaxed);
            if have == key {
                count.store(count.load(Relaxed) + 1, Relaxed);
                return;
            }
            if have == 0 {
                // The count first: a reader that sees the key sees a count of at least 1.
                count.store(1, Relaxed);
                k.store(key, Relaxed);
                return;
            }
        }
        self.other.store(self.other.load(Relaxed) + 1, Relaxed);
    }

    /// Adds this vCPU's figures to `into` (one entry per source, summed over vCPUs) and
    /// returns the exits that found no slot.
    pub fn add_to(&self, into: &mut alloc::vec::Vec<(ExitSource, u64)>) -> u64 {
        for [k, count] in &self.slots {
            let Some(source) = ExitSource::from_key(k.load(Relaxed)) else { continue };
            let n = count.load(Relaxed);
            match into.iter_mut().find(|(s, _)| *s == source) {
                Some((_, total)) => *total += n,
                None => into.push((source, n)),
            }
        }
        self.other.load(Relaxed)
    }
}

/// The `n` most frequent sources of `all`, most frequent first (ties: by source).
pub fn top_sources(mut all: alloc::vec::Vec<(ExitSource, u64)>, n: usize) -> alloc::vec::Vec<(ExitSource, u64)> {
    all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

/// What other vCPUs and Vireo read of a vCPU without taking its lock: its exit figures and
/// scheduling figures, and the guest's statistics mark.
#[derive(Default)]
pub struct VcpuCounters {
    pub exits: ExitCounters,
    /// Steal time so far, in TSC ticks (runnable, waiting for its host CPU).
    pub steal: AtomicU64,
    /// The exit figures and steal time at the guest's last mark, and when it was set
    /// (0: never; figures then count from the VM's start).
    pub mark: ExitCounters,
    pub mark_steal: AtomicU64,
    pub mark_tsc: AtomicU64,
    /// Paravirtual events (KVM interface).
    pub pv: PvCounters,
    /// Exits per port and MSR.
    pub sources: ExitSources,
}

/// How often a vCPU used each KVM paravirtual mechanism (single writer, like the exits).
#[derive(Default)]
pub struct PvCounters {
    /// EOIs the guest skipped (PV EOI) and Vireo did for it.
    pub pv_eois: AtomicU64,
    /// KICK_CPU hypercalls sent (PV spinlock wake-ups).
    pub kicks: AtomicU64,
    /// PV SEND_IPI hypercalls, and the vCPUs they reached.
    pub pv_ipis: AtomicU64,
    pub pv_ipi_targets: AtomicU64,
    /// SCHED_YIELD hypercalls.
    pub yields: AtomicU64,
    /// Slices started with a TLB flush another vCPU asked for (PV TLB flush).
    pub tlb_flushes: AtomicU64,
    /// Slices that ended with the vCPU marked preempted.
    pub preempted: AtomicU64,
}

impl PvCounters {
    /// Adds one to `c` (only the vCPU's own host CPU writes these).
    #[inline]
    pub fn bump(c: &AtomicU64, n: u64) {
        c.store(c.load(Relaxed) + n, Relaxed);
    }
}

impl VcpuCounters {
    /// Sets the mark to now.
    pub fn set_mark(&self, now_tsc: u64) {
        self.mark.set(&self.exits.snapshot());
        self.mark_steal.store(self.steal.load(Relaxed), Relaxed);
        self.mark_tsc.store(now_tsc, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_snapshot_and_mark() {
        let c = VcpuCounters::default();
        c.exits.record(&ExitKind::Cpuid, 10);
        c.exits.record(&ExitKind::Hlt, 5);
        c.steal.store(100, Relaxed);
        c.set_mark(1234);
        c.exits.record(&ExitKind::Cpuid, 7);
        let now = c.exits.snapshot();
        assert_eq!(now.total(), ExitClassStats { count: 3, cycles: 22 });
        let since = now.since(&c.mark.snapshot());
        assert_eq!(since.total(), ExitClassStats { count: 1, cycles: 7 });
        assert_eq!(since.classes()[ExitKind::Cpuid.index()], ExitClassStats { count: 1, cycles: 7 });
        assert_eq!(c.mark_tsc.load(Relaxed), 1234);
        assert_eq!(c.mark_steal.load(Relaxed), 100);
    }

    #[test]
    fn sources_count_per_port_and_msr() {
        let s = ExitSources::new();
        for _ in 0..5 {
            s.record(ExitSource::Port(0x3FD));
        }
        s.record(ExitSource::Port(0x3F8));
        s.record(ExitSource::Wrmsr(0x6E0));
        s.record(ExitSource::Wrmsr(0x6E0));
        s.record(ExitSource::Rdmsr(0x6E0));
        let mut all = Vec::new();
        assert_eq!(s.add_to(&mut all), 0);
        // A second vCPU's figures add up per source.
        let t = ExitSources::new();
        t.record(ExitSource::Port(0x3F8));
        t.record(ExitSource::Port(0x64));
        t.add_to(&mut all);
        let top = top_sources(all, 3);
        assert_eq!(
            top,
            vec![(ExitSource::Port(0x3FD), 5), (ExitSource::Port(0x3F8), 2), (ExitSource::Wrmsr(0x6E0), 2)]
        );
        assert_eq!(format!("{}", top[0].0), "kind=io port=0x3fd");
        assert_eq!(format!("{}", ExitSource::Wrmsr(0x6E0)), "kind=wrmsr msr=0x6e0");
        assert_eq!(format!("{}", ExitSource::Rdmsr(0xC000_0080)), "kind=rdmsr msr=0xc0000080");
    }

    #[test]
    fn sources_beyond_the_table_count_as_other() {
        let s = ExitSources::new();
        let n = 1000u32;
        for m in 0..n {
            s.record(ExitSource::Rdmsr(m));
        }
        let mut all = Vec::new();
        let other = s.add_to(&mut all);
        assert!(all.len() <= SOURCE_SLOTS);
        assert_eq!(all.iter().map(|(_, c)| c).sum::<u64>() + other, n as u64, "every exit counted once");
        assert!(all.iter().all(|&(_, c)| c == 1));
        // Keys round-trip, the kinds stay apart.
        for src in [ExitSource::Port(0), ExitSource::Port(0xFFFF), ExitSource::Rdmsr(u32::MAX), ExitSource::Wrmsr(0)] {
            assert_eq!(ExitSource::from_key(src.key()), Some(src));
        }
        assert_eq!(ExitSource::from_key(0), None);
    }

    #[test]
    fn records_and_totals() {
        let mut s = ExitStats::new();
        s.record(&ExitKind::Cpuid, 100);
        s.record(&ExitKind::Cpuid, 50);
        s.record(&ExitKind::Hlt, 7);
        let v: Vec<_> = s.nonzero().collect();
        assert_eq!(
            v,
            vec![("cpuid", ExitClassStats { count: 2, cycles: 150 }), ("hlt", ExitClassStats { count: 1, cycles: 7 })]
        );
        assert_eq!(s.total(), ExitClassStats { count: 3, cycles: 157 });
    }
}
