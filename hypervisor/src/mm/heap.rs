//! Vireo's heap: a region of frames handed to `linked_list_allocator`.
//!
//! `linked_list_allocator` (rust-osdev, the maintainers of the `x86_64` and `multiboot2`
//! crates) is a small, audited first-fit allocator with a spin-locked global wrapper; Vireo's
//! heap holds few, long-lived objects (VM descriptors, device models), so first fit is enough.

#[cfg(target_os = "none")]
#[global_allocator]
static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// Hands `[start, start + size)` to the global allocator.
///
/// # Safety
/// The range must be mapped, writable, unused by anything else forever, and this must be
/// called once.
#[cfg(target_os = "none")]
pub unsafe fn init(start: u64, size: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { HEAP.lock().init(start as *mut u8, size as usize) };
}

/// Bytes in use and free, for reports.
#[cfg(target_os = "none")]
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}
