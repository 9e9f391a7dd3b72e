//! Physical frame allocator.
//!
//! Hands out contiguous, aligned runs of 4 KiB host frames (SDM Vol. 3A §4.5:
//! the paging structures and every page they map are 4 KiB-granular) for
//! Vireo's page tables, heap, stacks, guest RAM and VMCB/VMCS pages.
//!
//! The free memory is kept as a fixed-capacity array of free ranges that is
//! always sorted, disjoint, non-adjacent (neighbours are merged), 4 KiB-aligned
//! and non-empty. No heap is needed, so the allocator can run before any
//! other memory management exists.
//!
//! # Policies
//!
//! * **Capacity.** At most [`MAX_FREE_RANGES`] free ranges are tracked. While
//!   the allocator is being built ([`FrameAllocator::new`]) an excess range is
//!   resolved by dropping the *smallest* range; the dropped bytes are counted
//!   in [`FrameAllocator::lost_bytes`] so boot code can log them. After
//!   construction, an operation that would need one range too many
//!   ([`FrameAllocator::free`] of an isolated block, or an allocation from the
//!   middle of a range) fails with [`FrameError::TooManyRanges`] and leaves
//!   the state unchanged.
//! * **Placement.** [`FrameAllocator::alloc`] is first fit at the lowest
//!   address at or above [`LOW_MEMORY_END`] (1 MiB), so the scarce real-mode
//!   memory (the SIPI start-up vector of application processors must point
//!   below 1 MiB, SDM Vol. 3A "MP Initialization Protocol") is never taken by
//!   accident. [`FrameAllocator::alloc_below`]
//!   serves callers with an address limit (e.g. < 4 GiB or < 1 MiB) and only
//!   falls back to memory below 1 MiB when nothing above it fits.
//! * **Frame 0** is never handed out, so a physical address of 0 can never be
//!   mistaken for a valid allocation.
//! * Allocated memory is **not zeroed**; the allocator never touches the
//!   memory it manages.

use super::{align_down, align_up, is_aligned, PhysRange, PAGE_SIZE};
use core::fmt;

/// Maximum number of disjoint free ranges the allocator tracks.
pub const MAX_FREE_RANGES: usize = 256;

/// End of the real-mode-addressable memory (1 MiB). [`FrameAllocator::alloc`]
/// never returns memory below it.
pub const LOW_MEMORY_END: u64 = 0x10_0000;

/// Frame 0 is always excluded from the free memory.
const NULL_FRAME: PhysRange = PhysRange::new(0, PAGE_SIZE);

/// Why a frame allocator operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// No usable memory remained after removing the reserved ranges.
    NoUsableMemory,
    /// The requested size is zero or overflows when rounded up to 4 KiB.
    InvalidSize {
        /// The size the caller asked for.
        size: u64,
    },
    /// The alignment is not a power of two or is smaller than 4 KiB.
    InvalidAlignment {
        /// The alignment the caller asked for.
        align: u64,
    },
    /// An address passed to [`FrameAllocator::free`] is not 4 KiB-aligned or
    /// the block would extend past the end of the address space.
    InvalidAddress {
        /// The offending start address.
        addr: u64,
    },
    /// No free block of the requested size and alignment exists (below the
    /// limit, where one was given).
    OutOfMemory {
        /// Size in bytes (rounded up to 4 KiB).
        size: u64,
        /// Requested alignment.
        align: u64,
    },
    /// The operation needs more than [`MAX_FREE_RANGES`] free ranges.
    TooManyRanges,
    /// A block passed to [`FrameAllocator::free`] overlaps memory that is
    /// already free (a double free or a corrupted size).
    DoubleFree {
        /// The block the caller tried to free.
        range: PhysRange,
        /// The free range it overlaps.
        free: PhysRange,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoUsableMemory => f.write_str("no usable memory left after removing reserved ranges"),
            Self::InvalidSize { size } => {
                write!(f, "invalid allocation size {size:#x} (zero or overflowing)")
            }
            Self::InvalidAlignment { align } => {
                write!(f, "invalid alignment {align:#x} (must be a power of two >= {PAGE_SIZE:#x})")
            }
            Self::InvalidAddress { addr } => {
                write!(f, "invalid block address {addr:#x} (unaligned or block past the address space)")
            }
            Self::OutOfMemory { size, align } => {
                write!(f, "out of memory: no free block of {size:#x} bytes aligned to {align:#x}")
            }
            Self::TooManyRanges => {
                write!(f, "free memory too fragmented (more than {MAX_FREE_RANGES} ranges)")
            }
            Self::DoubleFree { range, free } => {
                write!(f, "double free: block {range} overlaps free memory {free}")
            }
        }
    }
}

/// Inserting a range would need a new slot but all are in use.
struct Full;

/// A first-fit physical frame allocator over a fixed-size free list.
pub struct FrameAllocator {
    ranges: [PhysRange; MAX_FREE_RANGES],
    len: usize,
    lost: u64,
}

impl fmt::Debug for FrameAllocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameAllocator").field("free", &self.ranges()).field("lost_bytes", &self.lost).finish()
    }
}

impl FrameAllocator {
    /// Builds an allocator from the firmware's usable RAM regions minus the
    /// reserved ranges.
    ///
    /// `usable` may be unsorted, overlapping and unaligned; each region is
    /// shrunk inward to 4 KiB boundaries. `reserved` may be unaligned,
    /// overlapping and lie partly or wholly outside RAM; each range is grown
    /// outward to 4 KiB boundaries and never handed out. Frame 0 is always
    /// reserved. Excess ranges beyond [`MAX_FREE_RANGES`] are dropped smallest
    /// first (see [`FrameAllocator::lost_bytes`]).
    ///
    /// Fails with [`FrameError::NoUsableMemory`] if nothing is left.
    pub fn new(usable: impl IntoIterator<Item = PhysRange>, reserved: &[PhysRange]) -> Result<Self, FrameError> {
        let mut this = Self { ranges: [PhysRange::EMPTY; MAX_FREE_RANGES], len: 0, lost: 0 };
        for region in usable {
            let Some(region) = region.align_inward(PAGE_SIZE) else {
                continue;
            };
            // Walk the region left to right, emitting the gaps between the
            // reserved ranges that overlap it.
            let mut cursor = region.start;
            while cursor < region.end {
                let rest = PhysRange::new(cursor, region.end);
                match first_reserved_overlap(rest, reserved) {
                    None => {
                        this.insert_lossy(rest);
                        break;
                    }
                    Some(hole) => {
                        if hole.start > cursor {
                            this.insert_lossy(PhysRange::new(cursor, hole.start));
                        }
                        // `hole` overlaps `rest`, so `hole.end > cursor`: progress.
                        cursor = hole.end;
                    }
                }
            }
        }
        if this.len == 0 {
            return Err(FrameError::NoUsableMemory);
        }
        Ok(this)
    }

    /// The free ranges: sorted, disjoint, non-adjacent, 4 KiB-aligned.
    pub fn ranges(&self) -> &[PhysRange] {
        &self.ranges[..self.len]
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.ranges().iter().map(PhysRange::len).sum()
    }

    /// The largest free range (the lowest one on a tie), if any memory is free.
    pub fn largest_free(&self) -> Option<PhysRange> {
        self.ranges().iter().copied().fold(None, |best, r| match best {
            Some(b) if b.len() >= r.len() => Some(b),
            _ => Some(r),
        })
    }

    /// Bytes of usable memory dropped during construction because there were
    /// more than [`MAX_FREE_RANGES`] free ranges.
    pub fn lost_bytes(&self) -> u64 {
        self.lost
    }

    /// Allocates one 4 KiB frame (not zeroed) at or above [`LOW_MEMORY_END`].
    pub fn alloc_frame(&mut self) -> Result<u64, FrameError> {
        self.alloc(PAGE_SIZE, PAGE_SIZE)
    }

    /// Allocates `size` bytes (rounded up to 4 KiB) of contiguous memory
    /// aligned to `align` (a power of two, at least 4 KiB), first fit at the
    /// lowest address at or above [`LOW_MEMORY_END`]. The memory is not zeroed.
    pub fn alloc(&mut self, size: u64, align: u64) -> Result<u64, FrameError> {
        self.alloc_within(size, align, PhysRange::new(LOW_MEMORY_END, u64::MAX))
    }

    /// Like [`FrameAllocator::alloc`], but the whole block lies below `limit`
    /// (e.g. 4 GiB for 32-bit-addressable structures, 1 MiB for real-mode
    /// trampolines). Memory at or above [`LOW_MEMORY_END`] is preferred; the
    /// memory below it is used only if nothing else fits.
    pub fn alloc_below(&mut self, size: u64, align: u64, limit: u64) -> Result<u64, FrameError> {
        let high = PhysRange::new(LOW_MEMORY_END, limit);
        match self.alloc_within(size, align, high) {
            Err(first @ (FrameError::OutOfMemory { .. } | FrameError::TooManyRanges)) => {
                let low = PhysRange::new(0, limit.min(LOW_MEMORY_END));
                match self.alloc_within(size, align, low) {
                    // Report fragmentation above 1 MiB rather than a plain
                    // "out of memory" from the tiny low pool.
                    Err(FrameError::OutOfMemory { .. }) => Err(first),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// Allocates `size` bytes (rounded up to 4 KiB) aligned to `align`, with
    /// the whole block inside `window`; first fit at the lowest address.
    pub fn alloc_within(&mut self, size: u64, align: u64, window: PhysRange) -> Result<u64, FrameError> {
        let size = match align_up(size, PAGE_SIZE) {
            Some(s) if s != 0 => s,
            _ => return Err(FrameError::InvalidSize { size }),
        };
        if !align.is_power_of_two() || align < PAGE_SIZE {
            return Err(FrameError::InvalidAlignment { align });
        }
        let mut blocked_by_capacity = false;
        for i in 0..self.len {
            let Some(candidate) = self.ranges[i].intersect(&window) else {
                continue;
            };
            let Some(block) = fit(candidate, size, align) else {
                continue;
            };
            let range = self.ranges[i];
            let splits = block.start > range.start && block.end < range.end;
            if !splits {
                self.carve(i, block);
                return Ok(block.start);
            }
            if self.len < MAX_FREE_RANGES {
                self.carve(i, block);
                return Ok(block.start);
            }
            // No slot for the upper remainder: try the highest aligned spot in
            // this range instead, which may end exactly at the range's end.
            if let Some(top) = fit_top(candidate, size, align) {
                if top.end == range.end {
                    self.carve(i, top);
                    return Ok(top.start);
                }
            }
            blocked_by_capacity = true;
        }
        if blocked_by_capacity {
            Err(FrameError::TooManyRanges)
        } else {
            Err(FrameError::OutOfMemory { size, align })
        }
    }

    /// Returns `[start, start + size)` (size rounded up to 4 KiB) to the free
    /// memory, merging with free neighbours.
    ///
    /// Fails without changing anything if `start` is unaligned, `size` is
    /// zero, the block overlaps memory that is already free
    /// ([`FrameError::DoubleFree`]), or it would need a range beyond
    /// [`MAX_FREE_RANGES`]. The caller must only free memory it obtained from
    /// this allocator (or otherwise owns and wants managed).
    pub fn free(&mut self, start: u64, size: u64) -> Result<(), FrameError> {
        let size = match align_up(size, PAGE_SIZE) {
            Some(s) if s != 0 => s,
            _ => return Err(FrameError::InvalidSize { size }),
        };
        if !is_aligned(start, PAGE_SIZE) {
            return Err(FrameError::InvalidAddress { addr: start });
        }
        let range = PhysRange::from_start_len(start, size).ok_or(FrameError::InvalidAddress { addr: start })?;
        // Ranges are sorted and disjoint: the first one ending after `start`
        // is the only one that can overlap the block (all later ones start
        // after it, so if it starts at or past the block's end, they do too).
        let i = self.ranges().partition_point(|r| r.end <= range.start);
        if let Some(free) = self.ranges().get(i) {
            if free.overlaps(&range) {
                return Err(FrameError::DoubleFree { range, free: *free });
            }
        }
        self.insert(range).map_err(|Full| FrameError::TooManyRanges)
    }

    /// Inserts `r`, merging it with every range it overlaps or touches.
    /// Fails (without changes) only if `r` touches nothing and no slot is free.
    fn insert(&mut self, r: PhysRange) -> Result<(), Full> {
        if r.is_empty() {
            return Ok(());
        }
        // Ranges [first, last) overlap or touch `r`.
        let first = self.ranges().partition_point(|x| x.end < r.start);
        let last = self.ranges().partition_point(|x| x.start <= r.end);
        if first == last {
            if self.len == MAX_FREE_RANGES {
                return Err(Full);
            }
            self.ranges.copy_within(first..self.len, first + 1);
            self.ranges[first] = r;
            self.len += 1;
            return Ok(());
        }
        let merged = PhysRange::new(r.start.min(self.ranges[first].start), r.end.max(self.ranges[last - 1].end));
        self.ranges[first] = merged;
        self.ranges.copy_within(last..self.len, first + 1);
        self.len -= last - first - 1;
        Ok(())
    }

    /// [`Self::insert`] for construction: on overflow, keep the larger of `r`
    /// and the smallest existing range and count the other as lost.
    fn insert_lossy(&mut self, r: PhysRange) {
        if self.insert(r).is_ok() {
            return;
        }
        let Some((smallest, victim)) = self.ranges().iter().copied().enumerate().min_by_key(|(_, x)| x.len()) else {
            return;
        };
        if r.len() <= victim.len() {
            self.lost = self.lost.saturating_add(r.len());
            return;
        }
        self.remove_at(smallest);
        self.lost = self.lost.saturating_add(victim.len());
        // A slot is free now and `r` touched no range, so this succeeds.
        let _ = self.insert(r);
    }

    fn remove_at(&mut self, i: usize) {
        self.ranges.copy_within(i + 1..self.len, i);
        self.len -= 1;
    }

    /// Removes `block` (which lies inside range `i`) from the free memory.
    /// The caller has checked that a split has a free slot.
    fn carve(&mut self, i: usize, block: PhysRange) {
        let range = self.ranges[i];
        let lower = PhysRange::new(range.start, block.start);
        let upper = PhysRange::new(block.end, range.end);
        match (lower.is_empty(), upper.is_empty()) {
            (true, true) => self.remove_at(i),
            (false, true) => self.ranges[i] = lower,
            (true, false) => self.ranges[i] = upper,
            (false, false) => {
                self.ranges.copy_within(i + 1..self.len, i + 2);
                self.ranges[i] = lower;
                self.ranges[i + 1] = upper;
                self.len += 1;
            }
        }
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        for r in self.ranges() {
            assert!(!r.is_empty(), "empty range {r}");
            assert!(is_aligned(r.start, PAGE_SIZE) && is_aligned(r.end, PAGE_SIZE), "{r}");
            assert!(!r.contains(0), "frame 0 is free: {r}");
        }
        for w in self.ranges().windows(2) {
            assert!(w[0].end < w[1].start, "unsorted, overlapping or adjacent: {} {}", w[0], w[1]);
        }
    }
}

/// The lowest `align`-aligned block of `size` bytes inside `within`.
fn fit(within: PhysRange, size: u64, align: u64) -> Option<PhysRange> {
    let start = align_up(within.start, align)?;
    let block = PhysRange::from_start_len(start, size)?;
    within.contains_range(&block).then_some(block)
}

/// The highest `align`-aligned block of `size` bytes inside `within`.
fn fit_top(within: PhysRange, size: u64, align: u64) -> Option<PhysRange> {
    let start = align_down(within.end.checked_sub(size)?, align)?;
    let block = PhysRange::from_start_len(start, size)?;
    within.contains_range(&block).then_some(block)
}

/// Among the reserved ranges (grown to 4 KiB, plus frame 0) that overlap
/// `rest`, the one starting lowest.
fn first_reserved_overlap(rest: PhysRange, reserved: &[PhysRange]) -> Option<PhysRange> {
    core::iter::once(NULL_FRAME)
        .chain(reserved.iter().filter_map(|r| {
            if r.is_empty() {
                return None;
            }
            // Growing outward can only overflow at the very top; then the
            // reservation simply extends to the end of the address space.
            let start = align_down(r.start, PAGE_SIZE)?;
            let end = align_up(r.end, PAGE_SIZE).unwrap_or(u64::MAX);
            Some(PhysRange::new(start, end))
        }))
        .filter(|r| r.overlaps(&rest))
        .min_by_key(|r| r.start)
}

/// Host unit tests: an allocator over `bytes` (rounded to 2 MiB) of leaked, 2 MiB-aligned
/// host memory, so code that dereferences frames (identity-mapped on bare metal) works.
#[cfg(test)]
impl FrameAllocator {
    pub fn for_tests_bytes(bytes: usize) -> FrameAllocator {
        let size = bytes.div_ceil(2 << 20).max(1) * (2 << 20);
        let layout = std::alloc::Layout::from_size_align(size, 2 << 20).unwrap();
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) } as u64;
        assert!(p != 0 && p >= 0x10_0000);
        FrameAllocator::new([PhysRange::new(p, p + size as u64)], &[]).unwrap()
    }

    /// 8 MiB: one small VM's RAM and tables.
    pub fn for_tests() -> FrameAllocator {
        Self::for_tests_bytes(8 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    const MIB: u64 = 1024 * 1024;
    const GIB: u64 = 1024 * MIB;

    fn r(start: u64, end: u64) -> PhysRange {
        PhysRange::new(start, end)
    }

    fn alloc_from(usable: &[PhysRange], reserved: &[PhysRange]) -> FrameAllocator {
        let a = FrameAllocator::new(usable.iter().copied(), reserved).expect("allocator");
        a.check_invariants();
        a
    }

    #[test]
    fn unaligned_usable_shrinks_inward() {
        let a = alloc_from(&[r(0x10_0001, 0x20_0fff)], &[]);
        assert_eq!(a.ranges(), &[r(0x10_1000, 0x20_0000)]);
        assert_eq!(a.free_bytes(), 0xff000);
    }

    #[test]
    fn tiny_regions_vanish() {
        let err = FrameAllocator::new([r(0x1001, 0x1fff), r(0x5000, 0x5000)], &[]).unwrap_err();
        assert_eq!(err, FrameError::NoUsableMemory);
    }

    #[test]
    fn frame_zero_never_free() {
        let a = alloc_from(&[r(0, 0x10_0000)], &[]);
        assert_eq!(a.ranges(), &[r(0x1000, 0x10_0000)]);
    }

    #[test]
    fn unsorted_overlapping_usable_merge() {
        let a = alloc_from(
            &[r(0x30_0000, 0x40_0000), r(0x10_0000, 0x20_0000), r(0x18_0000, 0x30_0000), r(0x50_0000, 0x60_0000)],
            &[],
        );
        assert_eq!(a.ranges(), &[r(0x10_0000, 0x40_0000), r(0x50_0000, 0x60_0000)]);
    }

    #[test]
    fn reserved_middle_edges_outside() {
        let a = alloc_from(
            &[r(0x10_0000, 0x80_0000)],
            &[
                r(0x20_0800, 0x20_1001),   // middle, unaligned: grows to [0x200000, 0x202000)
                r(0x0f_0000, 0x10_2000),   // overlaps the left edge
                r(0x7f_f000, 0x90_0000),   // overlaps the right edge
                r(0x100_0000, 0x200_0000), // outside RAM
                r(0x30_0000, 0x40_0000),   // two overlapping reservations
                r(0x38_0000, 0x48_0123),
                r(0x60_0000, 0x60_0000), // empty: ignored
            ],
        );
        assert_eq!(a.ranges(), &[r(0x10_2000, 0x20_0000), r(0x20_2000, 0x30_0000), r(0x48_1000, 0x7f_f000)]);
    }

    #[test]
    fn reserved_up_to_top_of_address_space() {
        let a = alloc_from(&[r(0x10_0000, u64::MAX)], &[r(0x20_0000, u64::MAX)]);
        assert_eq!(a.ranges(), &[r(0x10_0000, 0x20_0000)]);
    }

    #[test]
    fn everything_reserved_is_an_error() {
        let err = FrameAllocator::new([r(0x10_0000, 0x20_0000)], &[r(0, 0x30_0000)]).unwrap_err();
        assert_eq!(err, FrameError::NoUsableMemory);
    }

    #[test]
    fn alloc_first_fit_above_1mib_and_free_merges() {
        let mut a = alloc_from(&[r(0x1000, 0x9_f000), r(0x10_0000, 0x20_0000)], &[]);
        let f1 = a.alloc_frame().unwrap();
        let f2 = a.alloc_frame().unwrap();
        let f3 = a.alloc(0x2001, PAGE_SIZE).unwrap();
        assert_eq!((f1, f2, f3), (0x10_0000, 0x10_1000, 0x10_2000));
        assert_eq!(a.ranges(), &[r(0x1000, 0x9_f000), r(0x10_5000, 0x20_0000)]);
        a.free(f2, PAGE_SIZE).unwrap();
        a.check_invariants();
        assert_eq!(a.ranges().len(), 3);
        a.free(f1, PAGE_SIZE).unwrap();
        a.free(f3, 0x3000).unwrap();
        a.check_invariants();
        assert_eq!(a.ranges(), &[r(0x1000, 0x9_f000), r(0x10_0000, 0x20_0000)]);
    }

    #[test]
    fn free_merges_both_neighbours() {
        let mut a = alloc_from(&[r(0x10_0000, 0x10_3000)], &[]);
        let x = a.alloc_frame().unwrap();
        let y = a.alloc_frame().unwrap();
        let z = a.alloc_frame().unwrap();
        assert!(a.ranges().is_empty());
        assert_eq!(a.largest_free(), None);
        a.free(x, PAGE_SIZE).unwrap();
        a.free(z, PAGE_SIZE).unwrap();
        assert_eq!(a.ranges().len(), 2);
        a.free(y, PAGE_SIZE).unwrap();
        assert_eq!(a.ranges(), &[r(0x10_0000, 0x10_3000)]);
    }

    #[test]
    fn alloc_2mib_aligned_splits_range() {
        let mut a = alloc_from(&[r(0x10_0000, 0x100_0000)], &[r(0x10_0000, 0x10_1000)]);
        let big = a.alloc(3 * MIB, 2 * MIB).unwrap();
        assert_eq!(big, 0x20_0000);
        assert_eq!(a.ranges(), &[r(0x10_1000, 0x20_0000), r(0x50_0000, 0x100_0000)]);
        let next = a.alloc(2 * MIB, 2 * MIB).unwrap();
        assert_eq!(next, 0x60_0000);
        a.check_invariants();
    }

    #[test]
    fn invalid_arguments() {
        let mut a = alloc_from(&[r(0x10_0000, 0x20_0000)], &[]);
        let before = a.ranges().to_vec();
        assert_eq!(a.alloc(0, PAGE_SIZE), Err(FrameError::InvalidSize { size: 0 }));
        assert_eq!(a.alloc(u64::MAX, PAGE_SIZE), Err(FrameError::InvalidSize { size: u64::MAX }));
        assert_eq!(a.alloc(PAGE_SIZE, 0x800), Err(FrameError::InvalidAlignment { align: 0x800 }));
        assert_eq!(a.alloc(PAGE_SIZE, 0x3000), Err(FrameError::InvalidAlignment { align: 0x3000 }));
        assert_eq!(a.free(0x30_0800, PAGE_SIZE), Err(FrameError::InvalidAddress { addr: 0x30_0800 }));
        assert_eq!(a.free(0x30_0000, 0), Err(FrameError::InvalidSize { size: 0 }));
        assert_eq!(a.free(u64::MAX - 0xfff, PAGE_SIZE), Err(FrameError::InvalidAddress { addr: u64::MAX - 0xfff }));
        assert_eq!(a.ranges(), &before[..]);
    }

    #[test]
    fn exhaustion() {
        let mut a = alloc_from(&[r(0x10_0000, 0x10_4000)], &[]);
        assert_eq!(a.alloc(0x5000, PAGE_SIZE), Err(FrameError::OutOfMemory { size: 0x5000, align: PAGE_SIZE }));
        for _ in 0..4 {
            a.alloc_frame().unwrap();
        }
        assert_eq!(a.alloc_frame(), Err(FrameError::OutOfMemory { size: PAGE_SIZE, align: PAGE_SIZE }));
        assert_eq!(a.free_bytes(), 0);
    }

    #[test]
    fn double_free_detected_without_corruption() {
        let mut a = alloc_from(&[r(0x10_0000, 0x20_0000)], &[]);
        let x = a.alloc(0x4000, PAGE_SIZE).unwrap();
        a.free(x + 0x1000, PAGE_SIZE).unwrap();
        let before = a.ranges().to_vec();
        // Exact double free.
        assert!(matches!(a.free(x + 0x1000, PAGE_SIZE), Err(FrameError::DoubleFree { .. })));
        // Partial overlap with the freed page.
        assert!(matches!(a.free(x, 0x2000), Err(FrameError::DoubleFree { .. })));
        // Overlap with the big free range above.
        assert!(matches!(a.free(x + 0x3000, 0x2000), Err(FrameError::DoubleFree { .. })));
        // Block that swallows a whole free range.
        assert_eq!(
            a.free(x, 0x3000),
            Err(FrameError::DoubleFree { range: r(x, x + 0x3000), free: r(x + 0x1000, x + 0x2000) })
        );
        assert_eq!(a.ranges(), &before[..]);
        a.free(x, PAGE_SIZE).unwrap();
        a.free(x + 0x2000, 0x2000).unwrap();
        assert_eq!(a.ranges(), &[r(0x10_0000, 0x20_0000)]);
    }

    #[test]
    fn alloc_below_prefers_above_1mib_and_respects_limit() {
        let mut a = alloc_from(&[r(0x1000, 0xa_0000), r(0x10_0000, 0x40_0000), r(4 * GIB, 8 * GIB)], &[]);
        // Real-mode trampoline.
        assert_eq!(a.alloc_below(PAGE_SIZE, PAGE_SIZE, LOW_MEMORY_END), Ok(0x1000));
        // Below 4 GiB: taken above 1 MiB first.
        assert_eq!(a.alloc_below(MIB, MIB, 4 * GIB), Ok(0x10_0000));
        // Only 2 MiB left between 1 MiB and 4 GiB; a 4 MiB block doesn't fit below 4 GiB.
        assert_eq!(
            a.alloc_below(4 * MIB, PAGE_SIZE, 4 * GIB),
            Err(FrameError::OutOfMemory { size: 4 * MIB, align: PAGE_SIZE })
        );
        // ...but does fit anywhere.
        assert_eq!(a.alloc(4 * MIB, PAGE_SIZE), Ok(4 * GIB));
        a.check_invariants();
    }

    #[test]
    fn alloc_below_block_must_end_below_limit() {
        let mut a = alloc_from(&[r(0x10_0000, 0x40_0000)], &[]);
        assert!(matches!(a.alloc_below(0x2000, PAGE_SIZE, 0x10_1000), Err(FrameError::OutOfMemory { .. })));
        assert_eq!(a.alloc_below(0x1000, PAGE_SIZE, 0x10_1000), Ok(0x10_0000));
        assert!(matches!(a.alloc_below(PAGE_SIZE, 2 * MIB, 0x20_0000), Err(FrameError::OutOfMemory { .. })));
        assert_eq!(a.alloc_below(PAGE_SIZE, 2 * MIB, 0x20_1000), Ok(0x20_0000));
    }

    #[test]
    fn alloc_below_falls_back_to_low_memory() {
        let mut a = alloc_from(&[r(0x1000, 0x9_f000), r(0x10_0000, 0x10_1000)], &[]);
        assert_eq!(a.alloc_below(PAGE_SIZE, PAGE_SIZE, 4 * GIB), Ok(0x10_0000));
        assert_eq!(a.alloc_below(PAGE_SIZE, PAGE_SIZE, 4 * GIB), Ok(0x1000));
        // Plain alloc never touches low memory.
        assert!(matches!(a.alloc_frame(), Err(FrameError::OutOfMemory { .. })));
        // A limit inside low memory.
        assert_eq!(a.alloc_below(0x2000, PAGE_SIZE, 0x5000), Ok(0x2000));
        assert!(matches!(a.alloc_below(0x2000, PAGE_SIZE, 0x5000), Err(FrameError::OutOfMemory { .. })));
        a.check_invariants();
    }

    #[test]
    fn largest_free() {
        let a = alloc_from(&[r(0x10_0000, 0x20_0000), r(0x30_0000, 0x50_0000), r(0x60_0000, 0x80_0000)], &[]);
        assert_eq!(a.largest_free(), Some(r(0x30_0000, 0x50_0000)));
    }

    /// `n` one-..`n`-page ranges separated by one-page gaps, range `i` being
    /// `i + 1` pages long.
    fn fragmented(n: u64) -> Vec<PhysRange> {
        let mut v = Vec::new();
        let mut at = LOW_MEMORY_END;
        for i in 0..n {
            let len = (i + 1) * PAGE_SIZE;
            v.push(r(at, at + len));
            at += len + PAGE_SIZE;
        }
        v
    }

    #[test]
    fn capacity_overflow_drops_smallest() {
        let extra = 44;
        let mut usable = fragmented(MAX_FREE_RANGES as u64 + extra);
        usable.reverse(); // order must not matter
        let a = alloc_from(&usable, &[]);
        assert_eq!(a.ranges().len(), MAX_FREE_RANGES);
        let lost_pages: u64 = (1..=extra).sum();
        assert_eq!(a.lost_bytes(), lost_pages * PAGE_SIZE);
        assert_eq!(a.ranges()[0].len(), (extra + 1) * PAGE_SIZE);
        let total: u64 = usable.iter().map(PhysRange::len).sum();
        assert_eq!(a.free_bytes() + a.lost_bytes(), total);
    }

    #[test]
    fn full_allocator_refuses_isolating_free_and_middle_split() {
        let usable = fragmented(MAX_FREE_RANGES as u64);
        let mut a = alloc_from(&usable, &[]);
        assert_eq!(a.lost_bytes(), 0);
        // A page from the middle of the last (largest) range would split it;
        // with no slot free, the allocator takes the top of the range instead.
        let last = *a.ranges().last().unwrap();
        let window = r(last.start + PAGE_SIZE, last.end);
        assert_eq!(a.alloc_within(PAGE_SIZE, PAGE_SIZE, window), Ok(last.end - PAGE_SIZE));
        assert_eq!(a.ranges().len(), MAX_FREE_RANGES);
        // If the window rules out the top too, the allocation fails cleanly.
        let before = a.ranges().to_vec();
        let window = r(last.start + PAGE_SIZE, last.start + 2 * PAGE_SIZE);
        assert_eq!(a.alloc_within(PAGE_SIZE, PAGE_SIZE, window), Err(FrameError::TooManyRanges));
        assert_eq!(a.ranges(), &before[..]);
        a.check_invariants();
        // Free a page that touches no free range while all slots are in use.
        let r2 = a.ranges()[2];
        assert_eq!(r2.len(), 3 * PAGE_SIZE);
        assert_eq!(a.alloc_within(3 * PAGE_SIZE, PAGE_SIZE, r2), Ok(r2.start));
        a.free(r2.start, PAGE_SIZE).unwrap();
        assert_eq!(a.ranges().len(), MAX_FREE_RANGES);
        let before = a.ranges().to_vec();
        assert_eq!(a.free(r2.start + 2 * PAGE_SIZE, PAGE_SIZE), Err(FrameError::TooManyRanges));
        assert_eq!(a.ranges(), &before[..]);
        // Freeing the middle page first merges, after which the last one fits.
        a.free(r2.start + PAGE_SIZE, PAGE_SIZE).unwrap();
        a.free(r2.start + 2 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert!(a.ranges().contains(&r2));
        a.check_invariants();
    }

    /// xorshift64 (Marsaglia 2003).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn randomized_alloc_free_keeps_invariants() {
        let usable = [r(0x500, 0x9_fc00), r(0x10_0000, 0x800_0000), r(0x900_0000, 0x1000_0000)];
        let reserved = [r(0x20_0000, 0x28_0abc), r(0x40_0000, 0x40_1000), r(0x900_0000, 0x900_0001)];
        for seed in [1u64, 0xdead_beef, 0x1234_5678_9abc_def0] {
            let mut rng = Rng(seed);
            let mut a = alloc_from(&usable, &reserved);
            let total = a.free_bytes();
            let mut live: Vec<PhysRange> = Vec::new();
            let mut freed: Vec<PhysRange> = Vec::new();
            for _ in 0..4000 {
                match rng.below(10) {
                    0..=4 => {
                        let size = (1 + rng.below(64)) * PAGE_SIZE - rng.below(PAGE_SIZE);
                        let align = PAGE_SIZE << rng.below(10);
                        let res = if rng.below(4) == 0 {
                            a.alloc_below(size, align, 0x400_0000)
                        } else {
                            a.alloc(size, align)
                        };
                        if let Ok(start) = res {
                            let block = r(start, start + align_up(size, PAGE_SIZE).unwrap());
                            assert!(is_aligned(start, align));
                            assert!(live.iter().all(|l| !l.overlaps(&block)), "handed out twice");
                            assert!(a.ranges().iter().all(|f| !f.overlaps(&block)));
                            assert!(reserved.iter().all(|x| !x.overlaps(&block)));
                            live.push(block);
                        }
                    }
                    5..=8 if !live.is_empty() => {
                        let i = rng.below(live.len() as u64) as usize;
                        let block = live.swap_remove(i);
                        match a.free(block.start, block.len()) {
                            Ok(()) => freed.push(block),
                            Err(FrameError::TooManyRanges) => live.push(block),
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                    _ if !freed.is_empty() => {
                        // A block that is free again (and not reallocated) must be refused.
                        let i = rng.below(freed.len() as u64) as usize;
                        let block = freed[i];
                        if live.iter().all(|l| !l.overlaps(&block)) {
                            let before = a.ranges().to_vec();
                            assert!(matches!(a.free(block.start, block.len()), Err(FrameError::DoubleFree { .. })));
                            assert_eq!(a.ranges(), &before[..]);
                        } else {
                            freed.swap_remove(i);
                        }
                    }
                    _ => {}
                }
                a.check_invariants();
                let used: u64 = live.iter().map(PhysRange::len).sum();
                assert_eq!(a.free_bytes() + used, total, "bytes not conserved");
            }
            for block in live.drain(..) {
                a.free(block.start, block.len()).unwrap();
            }
            assert_eq!(a.free_bytes(), total);
            assert_eq!(a.ranges(), alloc_from(&usable, &reserved).ranges());
        }
    }

    #[test]
    fn display_messages() {
        let e = FrameError::DoubleFree { range: r(0x1000, 0x2000), free: r(0x1000, 0x3000) };
        assert_eq!(std::format!("{e}"), "double free: block [0x1000, 0x2000) overlaps free memory [0x1000, 0x3000)");
        assert!(std::format!("{}", FrameError::TooManyRanges).contains("256"));
    }
}
