//! Memory management: physical ranges, the physical frame allocator and the
//! page-table builder shared by Vireo's own tables, AMD NPT and Intel EPT.
//!
//! The ranges, the frame allocator and the page-table builder are `core`-only
//! (no heap) and touch no hardware, so they are unit-tested on the host. Address arithmetic is checked: helpers return
//! `Option`/`Result` instead of overflowing.

pub mod frame;
pub mod heap;
pub mod host;
pub mod paging;
pub mod pool;

pub use frame::{FrameAllocator, FrameError, LOW_MEMORY_END, MAX_FREE_RANGES};
pub use paging::{
    EntryFormat, Ept, EptMemType, LongMode, MapError, MapFlags, Npt, PageSize, PageTableMemory, PageTables, Translation,
};

/// The frame allocator every CPU shares, behind a spin lock (installed once at boot).
static FRAMES: spin::Mutex<Option<FrameAllocator>> = spin::Mutex::new(None);

/// Hands the boot-time frame allocator to [`frames`]. Call once, before any AP starts.
pub fn set_frames(frames: FrameAllocator) {
    *FRAMES.lock() = Some(frames);
}

/// The locked global frame allocator. Keep the guard short: other CPUs wait on it (and
/// never take it in an interrupt handler, which could deadlock against its own CPU).
pub struct FramesGuard(spin::MutexGuard<'static, Option<FrameAllocator>>);

impl core::ops::Deref for FramesGuard {
    type Target = FrameAllocator;
    fn deref(&self) -> &FrameAllocator {
        self.0.as_ref().expect("mm::frames() before mm::set_frames()")
    }
}

impl core::ops::DerefMut for FramesGuard {
    fn deref_mut(&mut self) -> &mut FrameAllocator {
        self.0.as_mut().expect("mm::frames() before mm::set_frames()")
    }
}

/// Locks the global frame allocator.
///
/// # Panics
/// Before [`set_frames`].
pub fn frames() -> FramesGuard {
    FramesGuard(FRAMES.lock())
}

/// Runs `f` with the global frame allocator locked.
pub fn with_frames<R>(f: impl FnOnce(&mut FrameAllocator) -> R) -> R {
    f(&mut frames())
}

/// Size of the smallest x86-64 page and of one physical frame (SDM Vol. 3A §4.5).
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;
/// Size of a large page mapped by a PDE with PS=1 (SDM Vol. 3A §4.5.4).
pub const LARGE_PAGE_SIZE: u64 = 2 * 1024 * 1024;
/// Size of a huge page mapped by a PDPTE with PS=1 (SDM Vol. 3A §4.5.4).
pub const HUGE_PAGE_SIZE: u64 = 1024 * 1024 * 1024;

const _: () = assert!(PAGE_SIZE == 1 << PAGE_SHIFT);
const _: () = assert!(LARGE_PAGE_SIZE == PAGE_SIZE * 512);
const _: () = assert!(HUGE_PAGE_SIZE == LARGE_PAGE_SIZE * 512);

/// Rounds `x` up to a multiple of `align`.
///
/// Returns `None` if `align` is not a power of two or the result does not fit
/// in a `u64`.
pub const fn align_up(x: u64, align: u64) -> Option<u64> {
    if !align.is_power_of_two() {
        return None;
    }
    let mask = align - 1;
    match x.checked_add(mask) {
        Some(v) => Some(v & !mask),
        None => None,
    }
}

/// Rounds `x` down to a multiple of `align`.
///
/// Returns `None` if `align` is not a power of two.
pub const fn align_down(x: u64, align: u64) -> Option<u64> {
    if !align.is_power_of_two() {
        return None;
    }
    Some(x & !(align - 1))
}

/// Whether `x` is a multiple of `align` (`false` if `align` is not a power of two).
pub const fn is_aligned(x: u64, align: u64) -> bool {
    align.is_power_of_two() && x & (align - 1) == 0
}

/// A half-open range of physical addresses `[start, end)`.
///
/// A range with `end <= start` is empty; all methods treat such ranges
/// consistently (zero length, overlapping nothing, containing nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PhysRange {
    /// First address in the range.
    pub start: u64,
    /// First address past the range.
    pub end: u64,
}

impl PhysRange {
    /// The canonical empty range `[0, 0)`.
    pub const EMPTY: Self = Self { start: 0, end: 0 };

    /// Creates `[start, end)`. If `end < start` the range is empty.
    pub const fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    /// Creates `[start, start + len)`, or `None` if that overflows.
    pub const fn from_start_len(start: u64, len: u64) -> Option<Self> {
        match start.checked_add(len) {
            Some(end) => Some(Self { start, end }),
            None => None,
        }
    }

    /// Number of bytes in the range (0 when empty).
    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range contains no address.
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether `addr` lies inside the range.
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Whether `other` lies entirely inside this range (an empty `other` is
    /// contained in everything).
    pub const fn contains_range(&self, other: &PhysRange) -> bool {
        other.is_empty() || (self.start <= other.start && other.end <= self.end)
    }

    /// Whether the two ranges share at least one address.
    pub const fn overlaps(&self, other: &PhysRange) -> bool {
        !self.is_empty() && !other.is_empty() && self.start < other.end && other.start < self.end
    }

    /// The common part of both ranges, or `None` if they do not overlap.
    pub const fn intersect(&self, other: &PhysRange) -> Option<PhysRange> {
        if !self.overlaps(other) {
            return None;
        }
        let start = if self.start > other.start { self.start } else { other.start };
        let end = if self.end < other.end { self.end } else { other.end };
        Some(PhysRange { start, end })
    }

    /// The largest `align`-aligned range inside this one (start rounded up,
    /// end rounded down), or `None` if that is empty or `align` is not a power
    /// of two.
    pub const fn align_inward(&self, align: u64) -> Option<PhysRange> {
        let (Some(start), Some(end)) = (align_up(self.start, align), align_down(self.end, align)) else {
            return None;
        };
        if start < end {
            Some(PhysRange { start, end })
        } else {
            None
        }
    }

    /// The smallest `align`-aligned range covering this one (start rounded
    /// down, end rounded up), or `None` if the range is empty, `align` is not
    /// a power of two, or the end does not fit in a `u64`.
    pub const fn align_outward(&self, align: u64) -> Option<PhysRange> {
        if self.is_empty() {
            return None;
        }
        let (Some(start), Some(end)) = (align_down(self.start, align), align_up(self.end, align)) else {
            return None;
        };
        Some(PhysRange { start, end })
    }
}

impl core::fmt::Display for PhysRange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_helpers() {
        assert_eq!(align_up(0, PAGE_SIZE), Some(0));
        assert_eq!(align_up(1, PAGE_SIZE), Some(PAGE_SIZE));
        assert_eq!(align_up(PAGE_SIZE, PAGE_SIZE), Some(PAGE_SIZE));
        assert_eq!(align_up(u64::MAX, PAGE_SIZE), None);
        assert_eq!(align_up(5, 3), None);
        assert_eq!(align_up(5, 0), None);
        assert_eq!(align_down(PAGE_SIZE + 1, PAGE_SIZE), Some(PAGE_SIZE));
        assert_eq!(align_down(u64::MAX, PAGE_SIZE), Some(u64::MAX - 0xfff));
        assert_eq!(align_down(7, 6), None);
        assert!(is_aligned(0x20_0000, LARGE_PAGE_SIZE));
        assert!(!is_aligned(0x20_1000, LARGE_PAGE_SIZE));
        assert!(!is_aligned(8, 0));
    }

    #[test]
    fn range_basics() {
        let a = PhysRange::new(0x1000, 0x3000);
        let b = PhysRange::new(0x2000, 0x5000);
        let c = PhysRange::new(0x3000, 0x4000);
        let inverted = PhysRange::new(0x5000, 0x1000);
        assert_eq!(a.len(), 0x2000);
        assert!(!a.is_empty());
        assert!(inverted.is_empty());
        assert_eq!(inverted.len(), 0);
        assert!(a.contains(0x1000) && a.contains(0x2fff) && !a.contains(0x3000));
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c), "adjacent ranges do not overlap");
        assert!(!a.overlaps(&inverted));
        assert_eq!(a.intersect(&b), Some(PhysRange::new(0x2000, 0x3000)));
        assert_eq!(a.intersect(&c), None);
        assert!(b.contains_range(&c) && !a.contains_range(&b));
        assert_eq!(PhysRange::from_start_len(u64::MAX, 1), None);
        assert_eq!(PhysRange::from_start_len(0x1000, 0x1000), Some(PhysRange::new(0x1000, 0x2000)));
    }

    #[test]
    fn range_alignment() {
        let r = PhysRange::new(0x1001, 0x3fff);
        assert_eq!(r.align_inward(PAGE_SIZE), Some(PhysRange::new(0x2000, 0x3000)));
        assert_eq!(r.align_outward(PAGE_SIZE), Some(PhysRange::new(0x1000, 0x4000)));
        assert_eq!(PhysRange::new(0x1001, 0x1fff).align_inward(PAGE_SIZE), None);
        assert_eq!(PhysRange::new(0x1000, u64::MAX).align_outward(PAGE_SIZE), None);
        assert_eq!(PhysRange::EMPTY.align_outward(PAGE_SIZE), None);
    }
}
