//! Vireo's virtual PMU as a guest sees it (VM line `pmu=on`): the events Vireo counts.
//!
//! Both vendors' event selects put the event code in bits 7:0 and the unit mask in bits
//! 15:8 (SDM Vol. 3B §21.2.1.1 Figure 21-1; APM Vol. 2 §13.2.1 Figure 13-7), so one raw
//! code names an event on either: `perf stat -e r0056` counts all VM exits, `r0156` CPUID
//! exits, and so on.
//!
//! - Core cycles (Intel architectural event 3CH/00H, fixed counter 1; AMD PMCx076) and
//!   reference cycles (Intel 3CH/01H, fixed counter 2) count TSC ticks the vCPU spent in
//!   guest mode: time in Vireo, in other vCPUs and halted is not counted.
//! - [`EVENT_VM_EXITS`] counts this vCPU's VM exits: unit mask 0 all of them, unit mask
//!   `k + 1` those of exit class `k` (the class order of [`crate::stats::KIND_NAMES`]).
//! - Every other event counts nothing. Instructions retired (and the other architectural
//!   events) are marked unavailable in CPUID leaf 0AH EBX on Intel; AMD has no such vector.

/// The event code of Vireo's VM-exit events.
pub const EVENT_VM_EXITS: u8 = 0x56;
/// Unit mask of [`EVENT_VM_EXITS`] that counts every exit.
pub const UMASK_ALL_EXITS: u8 = 0;

/// The unit mask that counts exits of statistics class `kind` (index into
/// [`crate::stats::KIND_NAMES`]).
pub const fn umask_exit_class(kind: usize) -> u8 {
    (kind + 1) as u8
}

/// Intel architectural event "UnHalted Core Cycles" (event 3CH, unit mask 00H).
pub const INTEL_CORE_CYCLES: u16 = 0x003C;
/// Intel architectural event "UnHalted Reference Cycles" (event 3CH, unit mask 01H).
pub const INTEL_REF_CYCLES: u16 = 0x013C;
/// AMD "CPU Clocks not Halted" (PMCx076).
pub const AMD_CPU_CLOCKS: u16 = 0x0076;
