//! Switching to Vireo's own page tables.

use x86_64::registers::control::{Cr0, Cr0Flags, Cr3, Cr3Flags};
use x86_64::{structures::paging::PhysFrame, PhysAddr};

use super::msr;

/// Enables EFER.NXE (when the CPU has NX), CR0.WP (so read-only pages bind Vireo too, SDM
/// Vol. 3A §4.6.1), and loads `root` into CR3, which flushes non-global TLB entries.
pub fn activate(root: u64, nx: bool) {
    // SAFETY: `root` is a complete PML4 that identity-maps Vireo's image, stacks, and all
    // RAM (mm::host), so execution continues at the same addresses. NXE is set before the
    // switch since the new tables use the NX bit, which is reserved while NXE = 0.
    unsafe {
        if nx {
            msr::write(msr::IA32_EFER, msr::read(msr::IA32_EFER) | msr::EFER_NXE);
        }
        Cr0::update(|f| f.insert(Cr0Flags::WRITE_PROTECT));
        Cr3::write(PhysFrame::containing_address(PhysAddr::new(root)), Cr3Flags::empty());
    }
    // Global entries survive a CR3 write: toggle CR4.PGE to drop those from the boot tables
    // (SDM Vol. 3A §4.10.4.1).
    use x86_64::registers::control::{Cr4, Cr4Flags};
    // SAFETY: clearing and setting PGE only flushes the TLB.
    unsafe {
        let cr4 = Cr4::read();
        Cr4::write(cr4 - Cr4Flags::PAGE_GLOBAL);
        Cr4::write(cr4 | Cr4Flags::PAGE_GLOBAL);
    }
}
