//! Vireo's own page tables: an identity map of every RAM range and of the low 4 GiB
//! (memory-mapped devices), with the image mapped by section (code RX, read-only data R,
//! data RW), no-execute everywhere else, page 0 and the boot stack's guard page unmapped.
//!
//! Non-RAM space below 4 GiB is mapped uncacheable (PCD|PWT: PAT entry 3 at reset, SDM
//! Vol. 3A §13.12.4) so device registers (local APIC, IOAPIC, PCI holes) are never cached,
//! whatever the firmware's MTRRs say. RAM is write-back.

use super::{
    align_down, align_up, LongMode, MapError, MapFlags, PageSize, PageTableMemory, PageTables, PhysRange,
    HUGE_PAGE_SIZE, LARGE_PAGE_SIZE, PAGE_SIZE,
};

/// Vireo's image, split by section (addresses from the linker script).
#[derive(Clone, Copy, Debug)]
pub struct ImageLayout {
    pub image: PhysRange,
    /// End of code (start of read-only data).
    pub text_end: u64,
    /// End of read-only data (start of writable data and .bss).
    pub rodata_end: u64,
    /// One page left unmapped below the boot stack.
    pub guard_page: u64,
}

/// What the CPU allows in page tables.
#[derive(Clone, Copy, Debug)]
pub struct PagingFeatures {
    /// EFER.NXE may be set: data mappings get NX.
    pub nx: bool,
    /// 1 GiB pages (CPUID.80000001H:EDX[26]).
    pub pages_1g: bool,
}

/// One planned mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub range: PhysRange,
    pub flags: MapFlags,
}

pub const MAX_SEGMENTS: usize = 512;
const LOW_4G: u64 = 1 << 32;

/// Plans the identity map: `ram` are the memory map's RAM ranges (any order, unaligned).
/// Returns the segments, sorted and disjoint, in `out`; and their count.
pub fn plan(
    ram: impl Iterator<Item = PhysRange>,
    layout: &ImageLayout,
    features: PagingFeatures,
    out: &mut [Segment; MAX_SEGMENTS],
) -> Result<usize, MapError> {
    let nx = |f: MapFlags| if features.nx { f } else { f | MapFlags::EXECUTE };
    let data = nx(MapFlags::READ | MapFlags::WRITE | MapFlags::GLOBAL);
    let device = data | MapFlags::UNCACHED;

    // RAM, page-aligned outward (a partial page of RAM is still RAM), sorted, merged.
    let mut merged = [PhysRange::EMPTY; MAX_SEGMENTS];
    let mut n = 0;
    for r in ram {
        let (Some(start), Some(end)) = (align_down(r.start, PAGE_SIZE), align_up(r.end, PAGE_SIZE)) else { continue };
        if start < end && n < MAX_SEGMENTS {
            merged[n] = PhysRange::new(start, end);
            n += 1;
        }
    }
    let merged = &mut merged[..n];
    merged.sort_unstable();
    let mut m = 0;
    for i in 0..merged.len() {
        if m > 0 && merged[i].start <= merged[m - 1].end {
            merged[m - 1].end = merged[m - 1].end.max(merged[i].end);
        } else {
            merged[m] = merged[i];
            m += 1;
        }
    }
    let ram = &merged[..m];

    // Walk [4 KiB, top): RAM as data, holes below 4 GiB as devices, the image by section.
    let image = PhysRange::new(
        align_down(layout.image.start, PAGE_SIZE).unwrap_or(0),
        align_up(layout.image.end, PAGE_SIZE).ok_or(MapError::EmptyRange)?,
    );
    let sections = [
        (PhysRange::new(image.start, layout.text_end), nx(MapFlags::READ | MapFlags::EXECUTE | MapFlags::GLOBAL)),
        (PhysRange::new(layout.text_end, layout.rodata_end), nx(MapFlags::READ | MapFlags::GLOBAL)),
        (PhysRange::new(layout.rodata_end, image.end), data),
    ];
    let mut count = 0;
    let mut push = |range: PhysRange, flags: MapFlags| -> Result<(), MapError> {
        if range.is_empty() {
            return Ok(());
        }
        let slot = out.get_mut(count).ok_or(MapError::OutOfMemory)?;
        *slot = Segment { range, flags };
        count += 1;
        Ok(())
    };
    let emit =
        |range: PhysRange, flags: MapFlags, push: &mut dyn FnMut(PhysRange, MapFlags) -> Result<(), MapError>| {
            // Cut the image out; it is mapped by section.
            if let Some(overlap) = range.intersect(&image) {
                push(PhysRange::new(range.start, overlap.start), flags)?;
                for (section, sflags) in sections {
                    if let Some(part) = section.intersect(&range) {
                        push(part, sflags)?;
                    }
                }
                push(PhysRange::new(overlap.end, range.end), flags)
            } else {
                push(range, flags)
            }
        };
    let mut cursor = PAGE_SIZE;
    for r in ram {
        let r = PhysRange::new(r.start.max(PAGE_SIZE), r.end);
        if r.is_empty() {
            continue;
        }
        if cursor < r.start && cursor < LOW_4G {
            emit(PhysRange::new(cursor, r.start.min(LOW_4G)), device, &mut push)?;
        }
        emit(r, data, &mut push)?;
        cursor = cursor.max(r.end);
    }
    if cursor < LOW_4G {
        emit(PhysRange::new(cursor, LOW_4G), device, &mut push)?;
    }
    Ok(count)
}

/// Tables needed for `segments` in the worst case (each end may need a 4 KiB table and a
/// 2 MiB directory; one directory per GiB; PDPTs per 512 GiB; the root).
pub fn tables_needed(segments: &[Segment]) -> usize {
    let top = segments.iter().map(|s| s.range.end).max().unwrap_or(0);
    let gib = top.div_ceil(HUGE_PAGE_SIZE) as usize;
    let small: usize = segments.iter().map(|s| 2 + (s.range.len() < LARGE_PAGE_SIZE) as usize).sum();
    1 + gib.div_ceil(512) + gib + 2 * small
}

/// Builds the tables for a plan. The boot stack's guard page is unmapped afterwards.
pub fn build<M: PageTableMemory + ?Sized>(
    mem: &mut M,
    segments: &[Segment],
    layout: &ImageLayout,
    features: PagingFeatures,
) -> Result<PageTables<LongMode>, MapError> {
    let largest = if features.pages_1g { PageSize::Size1G } else { PageSize::Size2M };
    let mut tables = PageTables::<LongMode>::new(mem)?;
    for s in segments {
        tables.map(mem, s.range.start, s.range.start, s.range.len(), s.flags, largest)?;
    }
    tables.unmap(mem, layout.guard_page, PAGE_SIZE)?;
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{paging::Table, pool::TablePool};

    const MIB: u64 = 1 << 20;
    const LAYOUT: ImageLayout = ImageLayout {
        image: PhysRange { start: 2 * MIB, end: 2 * MIB + 0x40000 },
        text_end: 2 * MIB + 0xE000,
        rodata_end: 2 * MIB + 0x12000,
        guard_page: 2 * MIB + 0x20000,
    };

    fn qemu_ram() -> Vec<PhysRange> {
        vec![
            PhysRange::new(0, 0x9fc00),
            PhysRange::new(MIB, 0x1ffe0000),
            PhysRange::new(1 << 32, (1 << 32) + 512 * MIB),
        ]
    }

    fn built(features: PagingFeatures) -> (Vec<Table>, TablePool, PageTables<LongMode>, Vec<Segment>) {
        let mut out = [Segment { range: PhysRange::EMPTY, flags: MapFlags::empty() }; MAX_SEGMENTS];
        let n = plan(qemu_ram().into_iter(), &LAYOUT, features, &mut out).unwrap();
        let segments = out[..n].to_vec();
        let count = tables_needed(&segments);
        let mut arena = vec![[0u64; 512]; count];
        // SAFETY: the arena holds `count` tables and outlives the pool in this test.
        let mut pool = unsafe { TablePool::new(0x1000_0000, arena.as_mut_ptr(), count) };
        let tables = build(&mut pool, &segments, &LAYOUT, features).unwrap();
        (arena, pool, tables, segments)
    }

    #[test]
    fn plan_is_sorted_disjoint_and_covers_low_4g() {
        let (_a, _p, _t, segments) = built(PagingFeatures { nx: true, pages_1g: true });
        for w in segments.windows(2) {
            assert!(w[0].range.end <= w[1].range.start, "{w:?}");
        }
        assert_eq!(segments[0].range.start, PAGE_SIZE, "page 0 stays unmapped");
        let low: u64 = segments.iter().filter(|s| s.range.end <= 1 << 32).map(|s| s.range.len()).sum();
        assert_eq!(low, (1 << 32) - PAGE_SIZE, "everything below 4 GiB but page 0");
        assert_eq!(segments.last().unwrap().range.end, (1 << 32) + 512 * MIB);
    }

    #[test]
    fn permissions_by_section() {
        let (_a, mut pool, tables, _) = built(PagingFeatures { nx: true, pages_1g: true });
        let at = |pool: &mut TablePool, addr| tables.translate(pool, addr);
        let text = at(&mut pool, LAYOUT.image.start).unwrap();
        assert!(text.flags.contains(MapFlags::EXECUTE) && !text.flags.contains(MapFlags::WRITE));
        let rodata = at(&mut pool, LAYOUT.text_end).unwrap();
        assert!(!rodata.flags.intersects(MapFlags::EXECUTE | MapFlags::WRITE));
        let data = at(&mut pool, LAYOUT.rodata_end).unwrap();
        assert!(data.flags.contains(MapFlags::WRITE) && !data.flags.contains(MapFlags::EXECUTE));
        assert!(at(&mut pool, LAYOUT.guard_page).is_none(), "guard page unmapped");
        assert!(at(&mut pool, LAYOUT.guard_page + PAGE_SIZE).is_some());
        assert!(at(&mut pool, 0).is_none(), "page 0 unmapped");
        let ram = at(&mut pool, 256 * MIB).unwrap();
        assert!(ram.flags.contains(MapFlags::WRITE) && !ram.flags.intersects(MapFlags::EXECUTE | MapFlags::UNCACHED));
        let apic = at(&mut pool, 0xFEE0_0000).unwrap();
        assert!(apic.flags.contains(MapFlags::UNCACHED), "device space is uncached");
        assert_eq!(at(&mut pool, 0xFEE0_0000).unwrap().phys, 0xFEE0_0000);
        let high = at(&mut pool, (1 << 32) + 100 * MIB).unwrap();
        assert_eq!(high.phys, (1 << 32) + 100 * MIB);
        assert!(at(&mut pool, (1 << 32) + 600 * MIB).is_none(), "no RAM there");
        assert!(pool.used() <= pool.capacity());
    }

    #[test]
    fn without_nx_everything_is_executable_and_2m_pages_only() {
        let (_a, mut pool, tables, _) = built(PagingFeatures { nx: false, pages_1g: false });
        for addr in [LAYOUT.rodata_end, 256 * MIB, 0xFEE0_0000] {
            assert!(tables.translate(&mut pool, addr).unwrap().flags.contains(MapFlags::EXECUTE));
        }
        assert_eq!(tables.translate(&mut pool, 512 * MIB).unwrap().page_size, PageSize::Size2M);
    }

    #[test]
    #[should_panic(expected = "not a table of this pool")]
    fn pool_refuses_foreign_addresses() {
        let mut arena = vec![[0u64; 512]; 2];
        // SAFETY: the arena holds two tables and outlives the pool.
        let mut pool = unsafe { TablePool::new(0x1000, arena.as_mut_ptr(), 2) };
        let _ = pool.alloc_table();
        let _ = pool.table(0x5000);
    }
}
