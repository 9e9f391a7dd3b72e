//! Device models a VM reaches through port I/O (and, later, MMIO).

pub mod console;
pub mod ports;
pub mod testdev;
