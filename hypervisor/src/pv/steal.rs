//! KVM steal time and the preempted flag (`struct kvm_steal_time`, 64 bytes).
//!
//! At every slice start Vireo publishes the vCPU's steal time (nanoseconds it was runnable
//! while another vCPU had its host CPU) with the version protocol, and swaps `preempted` to
//! 0; when a slice ends with the vCPU still runnable, `preempted` becomes PREEMPTED. A lock
//! waiter in the guest (Linux's `vcpu_is_preempted`) then stops spinning on a holder that is
//! not running: the preemption notification. A guest that skipped a TLB-shootdown IPI to a
//! preempted vCPU sets FLUSH_TLB in its byte; the swap at the next slice start sees it and
//! the vCPU's TLB is flushed before it runs.

use guest_abi::kvm::steal as layout;

use crate::vmm::guest_mem::{GuestMemError, GuestMemory};

/// Publishes `steal_ns` at `gpa` and marks the vCPU running; returns whether the guest asked
/// for a TLB flush meanwhile.
pub fn enter(mem: &GuestMemory, gpa: u64, steal_ns: u64) -> Result<bool, GuestMemError> {
    let was = mem.swap_u8(gpa + layout::PREEMPTED as u64, 0)?;
    let mut v = [0u8; 4];
    mem.read(gpa + layout::VERSION as u64, &mut v)?;
    let odd = u32::from_le_bytes(v).wrapping_add(1) | 1;
    mem.write(gpa + layout::VERSION as u64, &odd.to_le_bytes())?;
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    mem.write_u64(gpa + layout::STEAL as u64, steal_ns)?;
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    mem.write(gpa + layout::VERSION as u64, &odd.wrapping_add(1).to_le_bytes())?;
    Ok(was & layout::FLUSH_TLB != 0)
}

/// Marks the vCPU preempted (its slice ended while it could still run).
pub fn preempted(mem: &GuestMemory, gpa: u64) -> Result<(), GuestMemError> {
    mem.swap_u8(gpa + layout::PREEMPTED as u64, layout::PREEMPTED_YES).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::frame::FrameAllocator;

    #[test]
    fn steal_preempted_and_flush() {
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let gpa = 0x4000;
        assert!(!enter(&mem, gpa, 1234).unwrap());
        assert_eq!(mem.read_u64(gpa).unwrap(), 1234);
        assert_eq!(mem.read_u64(gpa + 8).unwrap() & 0xFFFF_FFFF, 2);
        preempted(&mem, gpa).unwrap();
        let mut b = [0u8; 1];
        mem.read(gpa + 16, &mut b).unwrap();
        assert_eq!(b[0], layout::PREEMPTED_YES);
        // The guest asks for a flush while the vCPU is out.
        mem.write(gpa + 16, &[layout::PREEMPTED_YES | layout::FLUSH_TLB]).unwrap();
        assert!(enter(&mem, gpa, 2000).unwrap());
        mem.read(gpa + 16, &mut b).unwrap();
        assert_eq!(b[0], 0, "running again");
        assert_eq!(mem.read_u64(gpa + 8).unwrap() & 0xFFFF_FFFF, 4);
    }
}
