//! Loading guests into a VM's memory.

pub mod boot64;
pub mod elf;
pub mod linux;
