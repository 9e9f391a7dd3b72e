//! Everything a Vireo guest sees of Vireo: how to detect it through CPUID, and the
//! hypercall ABI (numbers, register convention, error codes).
//!
//! This crate has no dependencies and no `std`, so guest kernels, the self-test guests and
//! the hypervisor itself share one definition. ABI changes bump [`ABI_VERSION`].
#![no_std]

pub mod cpuid;
pub mod hypercall;

/// The hypercall ABI version: major in bits 31:16, minor in bits 15:0. A guest must check
/// the major version (CPUID leaf [`cpuid::LEAF_VERSION`] EAX) before using hypercalls.
pub const ABI_VERSION: u32 = (ABI_MAJOR << 16) | ABI_MINOR;
pub const ABI_MAJOR: u32 = 0;
pub const ABI_MINOR: u32 = 1;
