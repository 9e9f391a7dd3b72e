//! Vireo: a bare-metal x86-64 hypervisor.
//!
//! The library holds all logic; the `vireo` binary (src/main.rs) is only the multiboot2
//! entry shim. Everything that does not touch hardware compiles for the host too and is
//! unit-tested there with `cargo test`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod arch;
pub mod bootinfo;
pub mod console;
pub mod devices;
pub mod guest;
pub mod mm;
pub mod platform;
pub mod pmu;
pub mod pv;
pub mod sched;
pub mod start;
pub mod svm;
pub mod vmm;
pub mod vmx;

/// Vireo's version, as printed in the banner.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Whether this build carries the test hooks (`--features test-hooks`).
pub const TEST_HOOKS: bool = cfg!(feature = "test-hooks");
