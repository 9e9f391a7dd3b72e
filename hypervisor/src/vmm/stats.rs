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
