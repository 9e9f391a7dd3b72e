//! The machine around Vireo: how to stop it, and the firmware's ACPI tables.

pub mod acpi;
pub mod exit;
