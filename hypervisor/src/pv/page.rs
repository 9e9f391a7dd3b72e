//! Vireo's hypercall page (ABI version 2, `guest_abi::hypercall::page`): the guest names a
//! page of its RAM in an MSR and Vireo fills it with one call stub per hypercall, written
//! with this CPU's native instruction, so guest code never needs to know the vendor.

use core::sync::atomic::Ordering;

use guest_abi::hypercall::{page, Instruction};

use super::{Gp, VmPv};
use crate::vmm::guest_mem::GuestMemory;

/// The MSR's value.
pub fn read(pv: &VmPv) -> u64 {
    pv.hypercall_page.load(Ordering::Relaxed)
}

/// A guest write of `value`. `Err(Gp)` is #GP(0): reserved bits, or an enabled page that is not
/// a page of the VM's RAM (it is then neither written nor recorded).
pub fn write(pv: &VmPv, mem: &GuestMemory, value: u64, native_vmmcall: bool) -> Result<(), Gp> {
    if value & page::RESERVED != 0 {
        return Err(Gp);
    }
    if value & page::ENABLE != 0 {
        let gpa = value & !0xFFF;
        if !mem.contains(gpa, 4096) {
            return Err(Gp);
        }
        let insn = if native_vmmcall { Instruction::Vmmcall } else { Instruction::Vmcall };
        for i in 0..page::STUBS {
            mem.write(gpa + (i * page::STUB_SIZE) as u64, &page::stub(i, insn)).map_err(|_| Gp)?;
        }
    }
    pv.hypercall_page.store(value, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::frame::FrameAllocator;

    #[test]
    fn fills_the_page_and_refuses_bad_values() {
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let pv = VmPv::default();
        write(&pv, &mem, 0x5000 | page::ENABLE, false).unwrap();
        assert_eq!(read(&pv), 0x5001);
        let mut stub = [0u8; 9];
        mem.read(0x5000 + 32, &mut stub).unwrap();
        assert_eq!(stub, [0xB8, 0x01, 0x00, 0x49, 0x56, 0x0F, 0x01, 0xC1, 0xC3]);
        assert_eq!(write(&pv, &mem, 0x5002, false), Err(Gp), "reserved bit");
        assert_eq!(write(&pv, &mem, mem.size() | page::ENABLE, false), Err(Gp), "beyond RAM");
        assert_eq!(write(&pv, &mem, 0xFEE0_0000 | page::ENABLE, true), Err(Gp), "MMIO");
        assert_eq!(read(&pv), 0x5001, "a refused write changes nothing");
        write(&pv, &mem, 0, false).unwrap();
        assert_eq!(read(&pv), 0);
    }
}
