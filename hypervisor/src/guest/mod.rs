//! Loading guests into a VM's memory.

pub mod acpi;
pub mod boot64;
pub mod elf;
pub mod le;
pub mod linux;
pub mod multiboot1;
