//! A VM's guest-physical RAM: host frames mapped at guest-physical 0.. by nested page tables
//! (AMD NPT or Intel EPT, built by `mm::paging` with 2 MiB pages), plus checked access and
//! guest page-table walks.
//!
//! RAM is populated lazily, per 2 MiB chunk: the nested tables are built complete, then every
//! chunk's leaf is made not-present. A chunk is zeroed and its leaf made present the first
//! time anyone touches it: the guest (its nested page fault comes to [`GuestMemory::populate_at`])
//! or Vireo (every helper here populates what it accesses first). So starting a VM costs no
//! zeroing of all its RAM up front, and no chunk is ever visible before it was zeroed: no
//! host data and nothing of an earlier VM reaches a guest. A not-present leaf is never cached
//! by the TLB (APM Vol. 2 §15.25.5; SDM Vol. 3C §29.4.3.1: only present translations are
//! cached), so making it present needs no flush.
//!
//! A guest reaches only what these tables map: every other guest-physical address exits
//! (NPF / EPT violation) and the core decides (`vmm::mmio`). Vireo reaches guest memory only
//! through the checked helpers here, which refuse anything outside `[0, size)`.

use alloc::vec::Vec;
use core::{
    fmt,
    sync::atomic::{AtomicU64, AtomicU8, Ordering},
};

use crate::mm::{
    pool::TablePool, Ept, FrameAllocator, FrameError, MapError, MapFlags, Npt, PageSize, PageTables, LARGE_PAGE_SIZE,
    PAGE_SIZE,
};

/// Which nested paging format the backend needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedFormat {
    Npt,
    Ept,
}

enum Tables {
    Npt(PageTables<Npt>),
    Ept(PageTables<Ept>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMemError {
    /// `[gpa, gpa + len)` is not inside guest RAM.
    OutOfRange {
        gpa: u64,
        len: u64,
    },
    Frames(FrameError),
    Map(MapError),
}

impl fmt::Display for GuestMemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestMemError::OutOfRange { gpa, len } => {
                write!(f, "guest-physical {gpa:#x}+{len:#x} is outside guest RAM")
            }
            GuestMemError::Frames(e) => write!(f, "host memory: {e}"),
            GuestMemError::Map(e) => write!(f, "nested page tables: {e}"),
        }
    }
}

impl From<FrameError> for GuestMemError {
    fn from(e: FrameError) -> Self {
        GuestMemError::Frames(e)
    }
}

impl From<MapError> for GuestMemError {
    fn from(e: MapError) -> Self {
        GuestMemError::Map(e)
    }
}

/// Zeroes one 2 MiB chunk of host memory with non-temporal 8-byte stores (MOVNTI), 64 bytes
/// per loop iteration, then SFENCE.
///
/// Why this and not `write_bytes` (a `rep stosq`): measured on 2026-11-30 (README, "lazy"
/// RAM), per MiB, `rep stosq` against this loop: QEMU 7.2 TCG ~1.0M against ~0.5-0.7M TSC
/// cycles (TCG runs each `rep` iteration as its own translation block, a plain store loop
/// runs eight stores per block); Bochs 2.7 0.87 s against 0.89 s of host time per 128 MiB
/// (the same); a real Xeon (user space) ~230 against ~118 us per 2 MiB (streaming stores
/// write whole lines without reading them first). MOVNTI uses general registers only, so
/// Vireo stays off the SSE registers, which hold the running guest's state (`arch::fpu`).
///
/// Ordering: non-temporal stores are weakly ordered, not ordered with later ordinary stores
/// (SDM Vol. 3A §9.2.2, "Memory Ordering in P6 and More Recent Processor Families"; APM Vol.
/// 2 §7.4.2); SFENCE makes every earlier store globally visible before any later store (SDM
/// Vol. 2B, SFENCE), so the caller may publish the chunk (its leaf, its state) right after.
/// The same CPU's later loads see its own stores either way.
///
/// # Safety
/// `chunk` must be 2 MiB of writable memory, 8-byte aligned (here: a 2 MiB-aligned chunk of
/// the identity map), that nothing else reads or writes during the call.
unsafe fn zero_chunk(chunk: *mut u8) {
    debug_assert_eq!(chunk as u64 % 64, 0);
    // SAFETY: the caller gives 2 MiB of writable, unshared memory at `chunk`; the loop writes
    // exactly `[chunk, chunk + 2 MiB)` (a multiple of 64 bytes) and touches no other memory
    // and no register beyond the operands named; MOVNTI needs only SSE2 (every x86-64 CPU)
    // and no SSE register or control state; SFENCE orders the stores (see above).
    unsafe {
        core::arch::asm!(
            "2:",
            "movnti qword ptr [{p}], {zero}",
            "movnti qword ptr [{p} + 8], {zero}",
            "movnti qword ptr [{p} + 16], {zero}",
            "movnti qword ptr [{p} + 24], {zero}",
            "movnti qword ptr [{p} + 32], {zero}",
            "movnti qword ptr [{p} + 40], {zero}",
            "movnti qword ptr [{p} + 48], {zero}",
            "movnti qword ptr [{p} + 56], {zero}",
            "add {p}, 64",
            "cmp {p}, {end}",
            "jb 2b",
            "sfence",
            p = inout(reg) chunk => _,
            end = in(reg) chunk.add(LARGE_PAGE_SIZE as usize),
            zero = in(reg) 0u64,
            options(nostack),
        );
    }
}

/// A chunk's life: not yet touched (leaf not present), being zeroed by one CPU, usable.
const CHUNK_UNTOUCHED: u8 = 0;
const CHUNK_ZEROING: u8 = 1;
const CHUNK_READY: u8 = 2;

pub struct GuestMemory {
    host_base: u64,
    size: u64,
    pool_base: u64,
    pool_count: usize,
    pool: TablePool,
    tables: Tables,
    /// Per 2 MiB chunk: its state, the host-physical address of its leaf entry in the nested
    /// tables (identity-mapped, in `pool`), and the present leaf value to store there.
    chunk_state: Vec<AtomicU8>,
    chunk_slot: Vec<u64>,
    chunk_leaf: Vec<u64>,
    /// TSC cycles spent zeroing chunks at their first touch, all CPUs together (for the
    /// end report: the part of the nested page fault exits' time that is zeroing).
    zero_cycles: AtomicU64,
}

impl GuestMemory {
    /// Takes `size` bytes (rounded up to 2 MiB) of host RAM and maps it at guest-physical 0
    /// with write-back, read/write/execute 2 MiB pages, every one of them not present until
    /// first touched (then zeroed; module documentation).
    pub fn new(frames: &mut FrameAllocator, size: u64, format: NestedFormat) -> Result<Self, GuestMemError> {
        let size = size.div_ceil(LARGE_PAGE_SIZE).max(1) * LARGE_PAGE_SIZE;
        let chunks = (size / LARGE_PAGE_SIZE) as usize;
        let host_base = frames.alloc(size, LARGE_PAGE_SIZE)?;
        // PML4 + PDPT + one directory per GiB, with slack.
        let pool_count = 4 + size.div_ceil(1 << 30) as usize;
        let pool_base = match frames.alloc(pool_count as u64 * PAGE_SIZE, PAGE_SIZE) {
            Ok(b) => b,
            Err(e) => {
                let _ = frames.free(host_base, size);
                return Err(e.into());
            }
        };
        // SAFETY: the table range was just taken from the frame allocator (owned by this VM
        // until `release`) and Vireo identity-maps all RAM. The RAM range is not touched
        // here: each chunk is zeroed before its leaf becomes present.
        let mut pool = unsafe { TablePool::identity(pool_base, pool_count) };
        let flags = MapFlags::READ | MapFlags::WRITE | MapFlags::EXECUTE;
        let mut chunk_slot = Vec::with_capacity(chunks);
        let built = (|| -> Result<Tables, GuestMemError> {
            match format {
                NestedFormat::Npt => {
                    let mut t = PageTables::<Npt>::new(&mut pool)?;
                    t.map(&mut pool, 0, host_base, size, flags, PageSize::Size2M)?;
                    for c in 0..chunks as u64 {
                        chunk_slot.push(t.leaf_slot(&mut pool, c * LARGE_PAGE_SIZE).ok_or(MapError::OutOfMemory)?);
                    }
                    Ok(Tables::Npt(t))
                }
                NestedFormat::Ept => {
                    let mut t = PageTables::<Ept>::new(&mut pool)?;
                    t.map(&mut pool, 0, host_base, size, flags, PageSize::Size2M)?;
                    for c in 0..chunks as u64 {
                        chunk_slot.push(t.leaf_slot(&mut pool, c * LARGE_PAGE_SIZE).ok_or(MapError::OutOfMemory)?);
                    }
                    Ok(Tables::Ept(t))
                }
            }
        })();
        let tables = match built {
            Ok(t) => t,
            Err(e) => {
                let _ = frames.free(host_base, size);
                let _ = frames.free(pool_base, pool_count as u64 * PAGE_SIZE);
                return Err(e);
            }
        };
        // Keep each present leaf aside and clear the slot: NPT and EPT leaves are not
        // present when zero (bit 0 P; bits 2:0 R/W/X).
        let mut chunk_leaf = Vec::with_capacity(chunks);
        for &slot in &chunk_slot {
            // SAFETY: `slot` is an entry of a table in this VM's pool (from `leaf_slot`),
            // identity-mapped; no guest runs on these tables yet.
            unsafe {
                chunk_leaf.push(core::ptr::read(slot as *const u64));
                core::ptr::write(slot as *mut u64, 0);
            }
        }
        let chunk_state = (0..chunks).map(|_| AtomicU8::new(CHUNK_UNTOUCHED)).collect();
        Ok(Self {
            host_base,
            size,
            pool_base,
            pool_count,
            pool,
            tables,
            chunk_state,
            chunk_slot,
            chunk_leaf,
            zero_cycles: AtomicU64::new(0),
        })
    }

    /// Makes the chunk holding RAM address `gpa` usable (zeroed and mapped) if it is not yet.
    /// Returns false if `gpa` is not RAM. Any number of CPUs may call it at once: one zeroes,
    /// the others wait for it.
    pub fn populate_at(&self, gpa: u64) -> bool {
        if !self.contains(gpa, 1) {
            return false;
        }
        self.populate_chunk((gpa / LARGE_PAGE_SIZE) as usize);
        true
    }

    /// Whether the chunk of `gpa` is populated (a nested page fault on a populated chunk is a
    /// real fault: the tables were not supposed to refuse it).
    pub fn host_addr_populated(&self, gpa: u64) -> bool {
        self.contains(gpa, 1)
            && self.chunk_state[(gpa / LARGE_PAGE_SIZE) as usize].load(Ordering::Acquire) == CHUNK_READY
    }

    /// How many chunks have been populated so far (for reports and tests).
    pub fn populated_chunks(&self) -> usize {
        self.chunk_state.iter().filter(|s| s.load(Ordering::Relaxed) == CHUNK_READY).count()
    }

    /// TSC cycles spent zeroing chunks so far (for reports).
    pub fn zero_cycles(&self) -> u64 {
        self.zero_cycles.load(Ordering::Relaxed)
    }

    fn populate_chunk(&self, c: usize) {
        let state = &self.chunk_state[c];
        if state.load(Ordering::Acquire) == CHUNK_READY {
            return;
        }
        if state.compare_exchange(CHUNK_UNTOUCHED, CHUNK_ZEROING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let host = self.host_base + c as u64 * LARGE_PAGE_SIZE;
            let t0 = super::vm::rdtsc();
            // SAFETY: the chunk lies in this VM's RAM allocation (identity-mapped, owned by
            // the VM, 2 MiB aligned); while ZEROING no guest can reach it (its leaf is not
            // present) and every Vireo accessor waits for READY, so nothing else touches it.
            // `zero_chunk` ends with SFENCE, so the zeroes are globally visible before the
            // leaf and the state below are stored.
            unsafe { zero_chunk(host as *mut u8) };
            self.zero_cycles.fetch_add(super::vm::rdtsc().wrapping_sub(t0), Ordering::Relaxed);
            // SAFETY: the slot is this chunk's leaf entry in the VM's tables (`new`); the CPU
            // walking the tables reads the entry atomically, so an atomic store publishes
            // the mapping whole, after the zeroes (Release).
            let slot = unsafe { &*(self.chunk_slot[c] as *const AtomicU64) };
            slot.store(self.chunk_leaf[c], Ordering::Release);
            state.store(CHUNK_READY, Ordering::Release);
            return;
        }
        while state.load(Ordering::Acquire) != CHUNK_READY {
            core::hint::spin_loop();
        }
    }

    /// Populates every chunk `[gpa, gpa + len)` touches (the range is already checked).
    fn populate_range(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LARGE_PAGE_SIZE;
        let last = (gpa + len - 1) / LARGE_PAGE_SIZE;
        for c in first..=last {
            self.populate_chunk(c as usize);
        }
    }

    /// Returns the memory and tables to the frame allocator.
    pub fn release(self, frames: &mut FrameAllocator) {
        let _ = frames.free(self.host_base, self.size);
        let _ = frames.free(self.pool_base, self.pool_count as u64 * PAGE_SIZE);
    }

    /// Physical address of the NPT root (nCR3) or EPT PML4.
    /// The host-physical range holding guest RAM (guest-physical 0 is its start).
    pub fn host_range(&self) -> core::ops::Range<u64> {
        self.host_base..self.host_base + self.size
    }

    pub fn nested_root(&self) -> u64 {
        match &self.tables {
            Tables::Npt(t) => t.root(),
            Tables::Ept(t) => t.root(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host-physical address backing guest-physical `gpa` (for reports; `None` for a chunk
    /// not populated yet).
    pub fn host_addr(&mut self, gpa: u64) -> Option<u64> {
        match &self.tables {
            Tables::Npt(t) => t.translate(&mut self.pool, gpa).map(|t| t.phys),
            Tables::Ept(t) => t.translate(&mut self.pool, gpa).map(|t| t.phys),
        }
    }

    /// Whether `[gpa, gpa + len)` lies in guest RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// The host address of `[gpa, gpa + len)`, populated, if it lies in RAM.
    fn check(&self, gpa: u64, len: usize) -> Result<*mut u8, GuestMemError> {
        if !self.contains(gpa, len as u64) {
            return Err(GuestMemError::OutOfRange { gpa, len: len as u64 });
        }
        self.populate_range(gpa, len as u64);
        Ok((self.host_base + gpa) as *mut u8)
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let src = self.check(gpa, buf.len())?;
        // SAFETY: `check` proved the range lies inside this VM's host allocation, which is
        // identity-mapped and owned by this VM for its whole life. Guest RAM is never
        // borrowed as a Rust reference, only copied through raw pointers: other vCPUs may
        // write it at the same time, as other CPUs or DMA do on real hardware (the guest
        // sees a torn copy at worst, never Vireo memory).
        unsafe { core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        let dst = self.check(gpa, data.len())?;
        // SAFETY: as in `read`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Copies `len` bytes of RAM at `gpa` straight to host memory at `dst` (a range another
    /// VM's [`GuestMemory::host_range_of`] gave out: one copy between two VMs).
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes.
    pub unsafe fn read_to(&self, gpa: u64, dst: *mut u8, len: usize) -> Result<(), GuestMemError> {
        let src = self.check(gpa, len)?;
        // SAFETY: `src` as in `read`; `dst` is the caller's promise. Raw copies only, as in `read`.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, len) };
        Ok(())
    }

    /// The host address of `[gpa, gpa + len)`, populated, if it lies in RAM. It stays valid
    /// until the RAM is released ([`GuestMemory::release`]): whoever keeps it must be gone
    /// by then (the VM drops its devices first, `Vm::into_memory`).
    pub fn host_range_of(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        self.check(gpa, usize::try_from(len).ok()?).ok()
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, GuestMemError> {
        let mut b = [0; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), GuestMemError> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Atomically replaces the byte at `gpa` (a flag byte the guest changes with locked
    /// instructions on other CPUs, such as KVM's `preempted`); returns the old value.
    pub fn swap_u8(&self, gpa: u64, value: u8) -> Result<u8, GuestMemError> {
        let p = self.check(gpa, 1)?;
        // SAFETY: `check` proved the byte lies inside this VM's RAM (see `read`). An atomic
        // reference to guest RAM is sound: every access Vireo makes to this byte is atomic
        // too, and the guest's own accesses are by another agent, as with hardware.
        let a = unsafe { &*(p as *const core::sync::atomic::AtomicU8) };
        Ok(a.swap(value, core::sync::atomic::Ordering::AcqRel))
    }

    /// Fills `[gpa, gpa + len)` with zeros.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), GuestMemError> {
        let dst = self.check(gpa, len as usize)?;
        // SAFETY: as in `write`.
        unsafe { core::ptr::write_bytes(dst, 0, len as usize) };
        Ok(())
    }
}

// SAFETY: the RAM and table frames belong to this VM for its whole life and are reached only
// through the checked copies above (raw pointers, no references into guest RAM); the
// tables are changed only through `&mut self`, except each chunk's leaf, which
// `populate_chunk` stores once, atomically, under the chunk's state machine.
unsafe impl Send for GuestMemory {}
// SAFETY: as for `Send`: shared access is the raw-pointer copies of `read`/`write`.
unsafe impl Sync for GuestMemory {}

#[cfg(test)]
impl GuestMemory {
    /// 2 MiB of NPT-mapped RAM from `frames` (see `FrameAllocator::for_tests`).
    pub fn for_tests(frames: &mut FrameAllocator) -> Self {
        Self::new(frames, 2 << 20, NestedFormat::Npt).unwrap()
    }
}

impl super::walk::PhysRead for GuestMemory {
    fn read_phys_u64(&self, gpa: u64) -> Option<u64> {
        self.read_u64(gpa).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = LARGE_PAGE_SIZE;

    #[test]
    fn chunks_are_populated_on_first_touch_and_read_as_zeros() {
        let mut frames = FrameAllocator::for_tests_bytes(16 << 20);
        let mut mem = GuestMemory::new(&mut frames, 3 * CHUNK, NestedFormat::Npt).unwrap();
        assert_eq!(mem.populated_chunks(), 0, "nothing is zeroed or mapped up front");
        assert_eq!(mem.host_addr(CHUNK + 5), None, "an untouched chunk is not present in the NPT");
        // A read populates and sees zeros.
        assert_eq!(mem.read_u64(CHUNK + 8).unwrap(), 0);
        assert_eq!(mem.populated_chunks(), 1);
        assert!(mem.host_addr_populated(CHUNK));
        assert!(!mem.host_addr_populated(0));
        assert_eq!(mem.host_addr(CHUNK + 5), Some(mem.host_base + CHUNK + 5));
        // A write across a chunk boundary populates both.
        mem.write(2 * CHUNK - 4, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(mem.populated_chunks(), 2);
        // The guest's first touch (a nested page fault) goes through populate_at.
        assert!(mem.populate_at(0x1234));
        assert_eq!(mem.populated_chunks(), 3);
        assert!(!mem.populate_at(3 * CHUNK), "beyond RAM");
    }

    #[test]
    fn zero_chunk_clears_exactly_the_chunk() {
        extern crate std;
        let len = CHUNK as usize + 128;
        let layout = std::alloc::Layout::from_size_align(len, 64).unwrap();
        // SAFETY (test): a fresh allocation of `len` bytes, filled before use, freed below.
        unsafe {
            let buf = std::alloc::alloc(layout);
            assert!(!buf.is_null());
            core::ptr::write_bytes(buf, 0xA5, len);
            zero_chunk(buf.add(64));
            let all = core::slice::from_raw_parts(buf, len);
            assert!(all[..64].iter().all(|&b| b == 0xA5), "nothing before the chunk");
            assert!(all[64..64 + CHUNK as usize].iter().all(|&b| b == 0), "the whole chunk");
            assert!(all[64 + CHUNK as usize..].iter().all(|&b| b == 0xA5), "nothing after it");
            std::alloc::dealloc(buf, layout);
        }
    }

    #[test]
    fn npt_and_ept_leaves_are_restored_whole() {
        for format in [NestedFormat::Npt, NestedFormat::Ept] {
            let mut frames = FrameAllocator::for_tests_bytes(8 << 20);
            let mut mem = GuestMemory::new(&mut frames, CHUNK, format).unwrap();
            let slot = mem.chunk_slot[0];
            // SAFETY (test): the slot is an entry of the VM's own table pool.
            assert_eq!(unsafe { core::ptr::read(slot as *const u64) }, 0, "{format:?}: not present");
            mem.populate_at(0);
            assert_eq!(unsafe { core::ptr::read(slot as *const u64) }, mem.chunk_leaf[0], "{format:?}");
            let t = match &mem.tables {
                Tables::Npt(t) => t.translate(&mut mem.pool, 0x10),
                Tables::Ept(t) => t.translate(&mut mem.pool, 0x10),
            };
            assert_eq!(t.map(|t| t.phys), Some(mem.host_base + 0x10), "{format:?}");
        }
    }

    #[test]
    fn a_new_vm_never_sees_an_earlier_vms_data() {
        let mut frames = FrameAllocator::for_tests_bytes(8 << 20);
        let first = GuestMemory::new(&mut frames, 2 * CHUNK, NestedFormat::Npt).unwrap();
        first.write(0x1000, &[0xAA; 64]).unwrap();
        first.write(CHUNK + 0x2000, &[0xBB; 64]).unwrap();
        let base = first.host_base;
        first.release(&mut frames);
        let second = GuestMemory::new(&mut frames, 2 * CHUNK, NestedFormat::Npt).unwrap();
        assert_eq!(second.host_base, base, "the test reuses the same host frames");
        let mut buf = [0xFFu8; 64];
        second.read(0x1000, &mut buf).unwrap();
        assert_eq!(buf, [0; 64]);
        second.read(CHUNK + 0x2000, &mut buf).unwrap();
        assert_eq!(buf, [0; 64]);
    }

    #[test]
    fn concurrent_first_touches_zero_once() {
        extern crate std;
        let mut frames = FrameAllocator::for_tests_bytes(8 << 20);
        let mem = GuestMemory::new(&mut frames, CHUNK, NestedFormat::Npt).unwrap();
        std::thread::scope(|s| {
            for i in 0..4u64 {
                let mem = &mem;
                s.spawn(move || {
                    mem.write(0x100 * (i + 1), &[i as u8 + 1; 8]).unwrap();
                });
            }
        });
        // Every writer's bytes survived: nobody's write was zeroed by a late populate.
        for i in 0..4u64 {
            let mut b = [0u8; 8];
            mem.read(0x100 * (i + 1), &mut b).unwrap();
            assert_eq!(b, [i as u8 + 1; 8]);
        }
        assert_eq!(mem.populated_chunks(), 1);
    }
}
