//! Everything a Vireo guest sees of Vireo: how to detect it through CPUID, and the
//! hypercall ABI (numbers, register convention, error codes).
//!
//! This crate has no dependencies and no `std`, so guest kernels, the self-test guests and
//! the hypervisor itself share one definition. ABI changes bump [`ABI_VERSION`].
#![no_std]

pub mod cpuid;
pub mod hypercall;
pub mod kvm;
pub mod pmu;
pub mod stats;

/// The hypercall ABI version: major in bits 31:16, minor in bits 15:0. A guest must check
/// the major version (CPUID leaf [`cpuid::LEAF_VERSION`] EAX) before using hypercalls; a
/// higher minor version only adds (calls, CPUID leaves, feature bits).
///
/// - Version 1 (0.1): PING, VERSION, CONSOLE_WRITE, VM_EXIT, EXIT_STATS.
/// - Version 2 (0.2): the hypercall page ([`hypercall::page`]), FEATURES, STATS,
///   STATS_MARK, STEAL_TIME, VCPU_INFO ([`stats`] has the layouts). Version 1's calls work
///   unchanged.
/// - Version 3 (0.3): VM_RESET.
/// - Version 4 (0.4): the `rdpmc` exit class (appended: [`stats::KINDS`] is 20) and the
///   virtual PMU's events ([`pmu`], VM line `pmu=on`).
pub const ABI_VERSION: u32 = (ABI_MAJOR << 16) | ABI_MINOR;
pub const ABI_MAJOR: u32 = 0;
pub const ABI_MINOR: u32 = 4;
