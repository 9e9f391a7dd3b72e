//! The 64-bit starting environment Vireo builds in guest memory for ELF test guests (and,
//! with a different layout, for Linux's 64-bit boot protocol): identity page tables over
//! the first 4 GiB of guest-physical space with 2 MiB pages, and a flat GDT.
//!
//! The tables cover more than RAM on purpose: the guest can then touch guest-physical
//! addresses with no RAM behind them, which exit as nested-page faults (vmm::mmio).

use crate::vmm::{
    guest_mem::{GuestMemError, GuestMemory},
    state::{CpuState, DescriptorTable},
};

/// Guest-physical layout of the boot structures (below the load address of any guest).
pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
/// Four page directories, 0x3000-0x6FFF.
pub const PD: u64 = 0x3000;
pub const GDT: u64 = 0x7000;
/// Guests must not load below this.
pub const RESERVED_END: u64 = 0x10000;

const P_RW: u64 = 0x3;
const PS: u64 = 0x80;

/// Writes page tables and GDT; returns the state to start the vCPU in at `entry`, with
/// RSP at the top of RAM and RDI = RAM size (the test guests' one argument).
pub fn setup(mem: &GuestMemory, entry: u64) -> Result<CpuState, GuestMemError> {
    mem.zero(0, RESERVED_END)?;
    mem.write_u64(PML4, PDPT | P_RW)?;
    for i in 0..4 {
        mem.write_u64(PDPT + i * 8, (PD + i * 0x1000) | P_RW)?;
    }
    for i in 0..2048u64 {
        mem.write_u64(PD + i * 8, (i << 21) | P_RW | PS)?;
    }
    // null, unused, 0x10 code64, 0x18 data, 0x20 TSS (16 bytes, base 0, limit 0x67).
    let gdt: [u64; 6] = [0, 0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF, 0x0000_8B00_0000_0067, 0];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_u64(GDT + i as u64 * 8, *d)?;
    }
    let rsp = mem.size() - 16;
    Ok(CpuState::long_mode_flat(entry, rsp, PML4, DescriptorTable { base: GDT, limit: (gdt.len() * 8 - 1) as u16 }))
}
