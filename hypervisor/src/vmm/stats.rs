//! Per-VM exit statistics: count and TSC cycles for every exit class.
//!
//! Cycles are measured from the exit (TSC read by the backend right after the hardware
//! exit) to the next entry, i.e. the time Vireo spends handling that exit. Recording is two
//! additions into a fixed array, cheap enough to stay on.

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
}

#[cfg(test)]
mod tests {
    use super::*;

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
