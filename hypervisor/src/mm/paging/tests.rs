//! Host tests for the page-table builder, backed by an arena.

use super::*;
use std::boxed::Box;
use std::collections::BTreeMap;
use std::vec::Vec;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const RWX: MapFlags = MapFlags::READ.union(MapFlags::WRITE).union(MapFlags::EXECUTE);
const RW: MapFlags = MapFlags::READ.union(MapFlags::WRITE);

/// Tables live at made-up physical addresses far from anything mapped.
const ARENA_BASE: u64 = 0xF0_0000_0000;

struct Arena {
    /// Table `i` lives at `ARENA_BASE + i * PAGE_SIZE`.
    tables: Vec<Box<Table>>,
    limit: usize,
}

impl Arena {
    fn new() -> Self {
        Self::with_limit(usize::MAX)
    }
    fn with_limit(limit: usize) -> Self {
        Self { tables: Vec::new(), limit }
    }
    fn count(&self) -> usize {
        self.tables.len()
    }
    fn is_table(&self, phys: u64) -> bool {
        phys >= ARENA_BASE && ((phys - ARENA_BASE) / PAGE_SIZE) < self.tables.len() as u64
    }
}

impl PageTableMemory for Arena {
    fn alloc_table(&mut self) -> Result<u64, MapError> {
        if self.tables.len() >= self.limit {
            return Err(MapError::OutOfMemory);
        }
        let phys = ARENA_BASE + self.tables.len() as u64 * PAGE_SIZE;
        // Garbage on purpose: PageTables must clear new tables itself.
        self.tables.push(Box::new([0xDEAD_BEEF_DEAD_BEEF; ENTRIES_PER_TABLE]));
        Ok(phys)
    }
    fn table(&mut self, phys: u64) -> &mut Table {
        assert!(self.is_table(phys) && phys.is_multiple_of(PAGE_SIZE), "{phys:#x} is not a table");
        &mut self.tables[((phys - ARENA_BASE) / PAGE_SIZE) as usize]
    }
}

/// The raw leaf entry mapping `virt` and its page size.
fn leaf<F: EntryFormat>(pt: &PageTables<F>, mem: &mut Arena, virt: u64) -> (u64, PageSize) {
    let mut table = pt.root();
    let mut level = ROOT_LEVEL;
    loop {
        let entry = mem.table(table)[index(virt, level)];
        assert!(F::is_present(entry), "{virt:#x} not mapped at level {level}");
        if let Some(page) = PageSize::from_level(level) {
            if level == 1 || F::is_large(entry) {
                return (entry, page);
            }
        }
        table = F::table_address(entry);
        level -= 1;
    }
}

/// The raw entry at `level` on the walk to `virt` (must be reachable).
fn entry_at<F: EntryFormat>(pt: &PageTables<F>, mem: &mut Arena, virt: u64, level: u8) -> u64 {
    let mut table = pt.root();
    for l in (level + 1..=ROOT_LEVEL).rev() {
        table = F::table_address(mem.table(table)[index(virt, l)]);
    }
    mem.table(table)[index(virt, level)]
}

fn tr<F: EntryFormat>(pt: &PageTables<F>, mem: &mut Arena, virt: u64) -> Option<(u64, PageSize)> {
    pt.translate(mem, virt).map(|t| (t.phys, t.page_size))
}

#[test]
fn identity_4gib_with_1gib_pages() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    pt.map(&mut mem, 0, 0, 4 * GIB, RWX, PageSize::Size1G).unwrap();
    assert_eq!(mem.count(), 2, "PML4 + one PDPT");
    for addr in [0, 0x1234_5678, GIB, 3 * GIB + 0xabc, 4 * GIB - 1] {
        assert_eq!(tr(&pt, &mut mem, addr), Some((addr, PageSize::Size1G)));
    }
    assert_eq!(pt.translate(&mut mem, 4 * GIB), None);
    let t = pt.translate(&mut mem, 0x1000).unwrap();
    assert_eq!(t.flags, RWX);
}

#[test]
fn identity_4gib_with_2mib_pages() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    pt.map(&mut mem, 0, 0, 4 * GIB, RW, PageSize::Size2M).unwrap();
    assert_eq!(mem.count(), 1 + 1 + 4, "PML4 + PDPT + 4 PDs");
    for addr in [0, 0x1f_ffff, 0x20_0000, 0x8765_4321, 4 * GIB - 1] {
        assert_eq!(tr(&pt, &mut mem, addr), Some((addr, PageSize::Size2M)));
    }
    assert_eq!(pt.translate(&mut mem, 4 * GIB), None);
}

#[test]
fn largest_is_capped_by_caller() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    pt.map(&mut mem, GIB, GIB, GIB, RW, PageSize::Size4K).unwrap();
    assert_eq!(mem.count(), 1 + 1 + 1 + 512);
    assert_eq!(tr(&pt, &mut mem, GIB + 0x12_3456), Some((GIB + 0x12_3456, PageSize::Size4K)));
}

#[test]
fn mixed_alignment_uses_4k_then_2m_then_4k() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    pt.map(&mut mem, 0x1000, 0x1000, 4 * MIB, RW, PageSize::Size1G).unwrap();
    // PML4, PDPT, PD, PT for [0x1000, 2M), PT for [4M, 4M + 4K).
    assert_eq!(mem.count(), 5);
    assert_eq!(pt.translate(&mut mem, 0), None);
    assert_eq!(tr(&pt, &mut mem, 0x1000), Some((0x1000, PageSize::Size4K)));
    assert_eq!(tr(&pt, &mut mem, 0x1f_f000), Some((0x1f_f000, PageSize::Size4K)));
    assert_eq!(tr(&pt, &mut mem, 0x20_0000), Some((0x20_0000, PageSize::Size2M)));
    assert_eq!(tr(&pt, &mut mem, 0x3f_ffff), Some((0x3f_ffff, PageSize::Size2M)));
    assert_eq!(tr(&pt, &mut mem, 0x40_0000), Some((0x40_0000, PageSize::Size4K)));
    assert_eq!(tr(&pt, &mut mem, 0x40_0fff), Some((0x40_0fff, PageSize::Size4K)));
    assert_eq!(pt.translate(&mut mem, 0x40_1000), None);
}

#[test]
fn misaligned_phys_forces_small_pages() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    let (virt, phys) = (0x20_0000, 0x40_1000);
    pt.map(&mut mem, virt, phys, 4 * MIB, RW, PageSize::Size1G).unwrap();
    for off in (0..4 * MIB).step_by(0x7_3000) {
        assert_eq!(tr(&pt, &mut mem, virt + off), Some((phys + off, PageSize::Size4K)));
    }
}

#[test]
fn overlap_is_refused_without_changes() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    pt.map(&mut mem, 2 * MIB, 2 * MIB, 2 * MIB, RW, PageSize::Size2M).unwrap();
    let tables = mem.count();
    assert_eq!(
        pt.map(&mut mem, 3 * MIB, 0, 2 * MIB, RW, PageSize::Size2M),
        Err(MapError::AlreadyMapped { virt: 3 * MIB })
    );
    assert_eq!(pt.map(&mut mem, 0, 0, 8 * MIB, RW, PageSize::Size2M), Err(MapError::AlreadyMapped { virt: 2 * MIB }));
    assert_eq!(mem.count(), tables);
    assert_eq!(pt.translate(&mut mem, 0), None);
    assert_eq!(pt.translate(&mut mem, 5 * MIB), None);
    // Inside a 1 GiB page.
    pt.map(&mut mem, 4 * GIB, 0, GIB, RW, PageSize::Size1G).unwrap();
    assert_eq!(
        pt.map(&mut mem, 4 * GIB + 0x5000, 0, PAGE_SIZE, RW, PageSize::Size4K),
        Err(MapError::AlreadyMapped { virt: 4 * GIB + 0x5000 })
    );
    // A 4 KiB page inside the range of a would-be large page.
    pt.map(&mut mem, 16 * GIB + 0x3000, 0, PAGE_SIZE, RW, PageSize::Size4K).unwrap();
    assert_eq!(
        pt.map(&mut mem, 16 * GIB, 0, GIB, RW, PageSize::Size1G),
        Err(MapError::AlreadyMapped { virt: 16 * GIB + 0x3000 })
    );
}

#[test]
fn invalid_input_errors() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    let big = PageSize::Size1G;
    assert_eq!(pt.map(&mut mem, 0x1001, 0, PAGE_SIZE, RW, big), Err(MapError::UnalignedAddress { addr: 0x1001 }));
    assert_eq!(pt.map(&mut mem, 0, 0x10, PAGE_SIZE, RW, big), Err(MapError::UnalignedAddress { addr: 0x10 }));
    assert_eq!(pt.map(&mut mem, 0, 0, 0x1800, RW, big), Err(MapError::UnalignedSize { size: 0x1800 }));
    assert_eq!(pt.map(&mut mem, 0, 0, 0, RW, big), Err(MapError::EmptyRange));
    // Non-canonical, straddling the canonical hole, wrapping.
    let hole = 0x0000_8000_0000_0000;
    assert_eq!(
        pt.map(&mut mem, hole, 0, PAGE_SIZE, RW, big),
        Err(MapError::VirtOutOfRange { virt: hole, size: PAGE_SIZE })
    );
    let below = hole - PAGE_SIZE;
    assert!(matches!(pt.map(&mut mem, below, 0, 2 * PAGE_SIZE, RW, big), Err(MapError::VirtOutOfRange { .. })));
    assert!(matches!(
        pt.map(&mut mem, u64::MAX - 0xfff, 0, 2 * PAGE_SIZE, RW, big),
        Err(MapError::VirtOutOfRange { .. })
    ));
    // Physical range past 2^52.
    assert!(matches!(
        pt.map(&mut mem, 0, MAX_PHYS_ADDR - PAGE_SIZE, 2 * PAGE_SIZE, RW, big),
        Err(MapError::PhysOutOfRange { .. })
    ));
    // Flags long mode cannot express.
    assert!(matches!(pt.map(&mut mem, 0, 0, PAGE_SIZE, MapFlags::EXECUTE, big), Err(MapError::InvalidFlags { .. })));
    assert_eq!(mem.count(), 1, "no tables allocated by failed calls");
    assert_eq!(pt.unmap(&mut mem, 0x800, PAGE_SIZE), Err(MapError::UnalignedAddress { addr: 0x800 }));
    assert_eq!(pt.unmap(&mut mem, 0, 0), Err(MapError::EmptyRange));
    assert_eq!(pt.translate(&mut mem, hole), None);
    assert!(matches!(PageTables::<LongMode>::from_root(0x1234), Err(MapError::MisalignedTable { .. })));
}

#[test]
fn upper_half_and_last_page_of_address_space() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    let kernel = 0xFFFF_FFFF_8000_0000;
    pt.map(&mut mem, kernel, 0x20_0000, 2 * MIB, RWX, PageSize::Size2M).unwrap();
    assert_eq!(tr(&pt, &mut mem, kernel + 0x1234), Some((0x20_1234, PageSize::Size2M)));
    assert_eq!(index(kernel, 4), 511);
    let top = u64::MAX - 0xfff;
    pt.map(&mut mem, top, 0x5000, PAGE_SIZE, RW, PageSize::Size1G).unwrap();
    assert_eq!(tr(&pt, &mut mem, u64::MAX), Some((0x5fff, PageSize::Size4K)));
    pt.unmap(&mut mem, top, PAGE_SIZE).unwrap();
    assert_eq!(pt.translate(&mut mem, top), None);
    pt.map(&mut mem, 0xFFFF_8000_0000_0000, 0, PAGE_SIZE, RW, PageSize::Size4K).unwrap();
}

#[test]
fn long_mode_entry_bits() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    pt.map(&mut mem, 0x1000, 0x7000, PAGE_SIZE, MapFlags::READ, PageSize::Size4K).unwrap();
    let (e, _) = leaf(&pt, &mut mem, 0x1000);
    assert_eq!(e, (1 << 63) | 0x7000 | 0b1, "read-only, non-executable: P + NX");
    let all = RWX | MapFlags::USER | MapFlags::GLOBAL | MapFlags::UNCACHED;
    pt.map(&mut mem, 0x2000, 0x8000, PAGE_SIZE, all, PageSize::Size4K).unwrap();
    let (e, _) = leaf(&pt, &mut mem, 0x2000);
    assert_eq!(e, 0x8000 | (1 << 8) | 0b1_1111, "P RW US PWT PCD G, no NX");
    assert_eq!(pt.translate(&mut mem, 0x2000).unwrap().flags, all);
    pt.map(&mut mem, 2 * MIB, 2 * MIB, 2 * MIB, RW, PageSize::Size2M).unwrap();
    let (e, size) = leaf(&pt, &mut mem, 2 * MIB);
    assert_eq!(size, PageSize::Size2M);
    assert_eq!(e, (1 << 63) | (2 * MIB) | (1 << 7) | 0b11, "PS set on a 2 MiB leaf");
    // Non-leaf entries: P RW US, no NX, pointing at a table.
    for level in 2..=4 {
        let e = entry_at(&pt, &mut mem, 0x1000, level);
        assert_eq!(e & !ADDR_MASK, 0b111, "level {level}");
        assert!(mem.is_table(e & ADDR_MASK));
    }
}

#[test]
fn npt_forces_user_and_rejects_upper_half() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<Npt>::new(&mut mem).unwrap();
    pt.map(&mut mem, 0, 0, 2 * MIB, RW | MapFlags::GLOBAL, PageSize::Size2M).unwrap();
    let (e, _) = leaf(&pt, &mut mem, 0);
    assert_eq!(e & 0x1ff, (1 << 7) | 0b111, "PS + P RW US, no G");
    assert_eq!(pt.translate(&mut mem, 0x1000).unwrap().flags, RW | MapFlags::USER);
    // Guest-physical addresses: anything below 2^48, no sign extension.
    pt.map(&mut mem, (1 << 47) + GIB, 0, GIB, RW, PageSize::Size1G).unwrap();
    assert!(matches!(
        pt.map(&mut mem, 0xFFFF_8000_0000_0000, 0, PAGE_SIZE, RW, PageSize::Size4K),
        Err(MapError::VirtOutOfRange { .. })
    ));
}

#[test]
fn ept_entry_bits() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<Ept>::new(&mut mem).unwrap();
    pt.map(&mut mem, 0, 0x10_0000, PAGE_SIZE, RWX, PageSize::Size4K).unwrap();
    let (e, _) = leaf(&pt, &mut mem, 0);
    assert_eq!(e, 0x10_0000 | 0b110_111, "RWX + WB memory type");
    pt.map(&mut mem, 2 * MIB, 4 * MIB, 2 * MIB, RWX, PageSize::Size1G).unwrap();
    let (e, size) = leaf(&pt, &mut mem, 2 * MIB);
    assert_eq!(size, PageSize::Size2M);
    assert_eq!(e, (4 * MIB) | (1 << 7) | 0b110_111, "large page bit 7");
    pt.map(&mut mem, GIB, 0, GIB, MapFlags::READ, PageSize::Size1G).unwrap();
    assert_eq!(leaf(&pt, &mut mem, GIB).0, (1 << 7) | 0b110_001);
    pt.map(&mut mem, 0x1000, 0xfee0_0000, PAGE_SIZE, RW | MapFlags::UNCACHED, PageSize::Size4K).unwrap();
    assert_eq!(leaf(&pt, &mut mem, 0x1000).0, 0xfee0_0000 | 0b000_011, "UC memory type");
    assert_eq!(pt.translate(&mut mem, 0x1000).unwrap().flags, RW | MapFlags::UNCACHED);
    pt.map(&mut mem, 0x2000, 0x2000, PAGE_SIZE, MapFlags::EXECUTE, PageSize::Size4K).unwrap();
    assert_eq!(leaf(&pt, &mut mem, 0x2000).0 & 0xfff, 0b110_100, "execute-only");
    // USER and GLOBAL mean nothing in EPT.
    pt.map(&mut mem, 0x3000, 0x3000, PAGE_SIZE, RW | MapFlags::USER | MapFlags::GLOBAL, PageSize::Size4K).unwrap();
    assert_eq!(leaf(&pt, &mut mem, 0x3000).0 & 0xfff, 0b110_011);
    for level in 2..=4 {
        assert_eq!(entry_at(&pt, &mut mem, 0, level) & !ADDR_MASK, 0b111, "non-leaf RWX, level {level}");
    }
    assert!(matches!(
        pt.map(&mut mem, 0x4000, 0, PAGE_SIZE, MapFlags::WRITE, PageSize::Size4K),
        Err(MapError::InvalidFlags { .. })
    ));
    assert!(matches!(
        pt.map(&mut mem, 0x4000, 0, PAGE_SIZE, MapFlags::UNCACHED, PageSize::Size4K),
        Err(MapError::InvalidFlags { .. })
    ));
    assert!(matches!(
        pt.map(&mut mem, 1 << 48, 0, PAGE_SIZE, RW, PageSize::Size4K),
        Err(MapError::VirtOutOfRange { .. })
    ));
    assert_eq!(Ept::eptp(pt.root(), false), pt.root() | 0x1e);
    assert_eq!(Ept::eptp(pt.root(), true), pt.root() | 0x5e);
}

#[test]
fn unmap_splits_2mib_page() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    let flags = RW | MapFlags::GLOBAL;
    pt.map(&mut mem, 2 * MIB, 8 * MIB, 2 * MIB, flags, PageSize::Size2M).unwrap();
    let before = mem.count();
    let guard = 2 * MIB + 0x5000;
    pt.unmap(&mut mem, guard, PAGE_SIZE).unwrap();
    assert_eq!(mem.count(), before + 1, "one new PT");
    assert_eq!(pt.translate(&mut mem, guard), None);
    for off in (0..2 * MIB).step_by(PAGE_SIZE as usize) {
        let v = 2 * MIB + off;
        if v == guard {
            continue;
        }
        let t = pt.translate(&mut mem, v).unwrap_or_else(|| panic!("{v:#x} lost"));
        assert_eq!((t.phys, t.page_size, t.flags), (8 * MIB + off, PageSize::Size4K, flags));
    }
    // The split leaves are real 4 KiB PTEs (no PS bit, attributes kept).
    let (e, _) = leaf(&pt, &mut mem, 2 * MIB);
    assert_eq!(e, (8 * MIB) | (1 << 63) | (1 << 8) | 0b11);
    // The hole can be filled again.
    pt.map(&mut mem, guard, 0x1000, PAGE_SIZE, MapFlags::READ, PageSize::Size4K).unwrap();
    assert_eq!(tr(&pt, &mut mem, guard), Some((0x1000, PageSize::Size4K)));
}

#[test]
fn unmap_splits_1gib_page_twice_and_keeps_attributes() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<Ept>::new(&mut mem).unwrap();
    let flags = MapFlags::READ | MapFlags::EXECUTE | MapFlags::UNCACHED;
    pt.map(&mut mem, GIB, 3 * GIB, GIB, flags, PageSize::Size1G).unwrap();
    let hole = GIB + 6 * MIB + 0x3000;
    pt.unmap(&mut mem, hole, 0x2000).unwrap();
    assert_eq!(mem.count(), 2 + 2, "a PD and a PT");
    assert_eq!(pt.translate(&mut mem, hole), None);
    assert_eq!(pt.translate(&mut mem, hole + 0x1000), None);
    let t = pt.translate(&mut mem, hole + 0x2000).unwrap();
    assert_eq!((t.phys, t.page_size, t.flags), (3 * GIB + 6 * MIB + 0x5000, PageSize::Size4K, flags));
    let t = pt.translate(&mut mem, GIB + 0x1234).unwrap();
    assert_eq!((t.phys, t.page_size, t.flags), (3 * GIB + 0x1234, PageSize::Size2M, flags));
    let (e, _) = leaf(&pt, &mut mem, 2 * GIB - 1);
    assert_eq!(e, (4 * GIB - 2 * MIB) | (1 << 7) | 0b000_101);
    let (e, _) = leaf(&pt, &mut mem, hole - 0x1000);
    assert_eq!(e, (hole - 0x1000 + 2 * GIB) | 0b000_101);
}

#[test]
fn long_mode_split_moves_pat_bit() {
    let huge = LongModeBits::PRESENT | LongModeBits::HUGE_PAGE | LongModeBits::HUGE_PAT;
    let e = huge.bits() | GIB;
    let child = LongMode::split_leaf(e, PageSize::Size1G, 3);
    assert_eq!(child, huge.bits() | (GIB + 6 * MIB));
    let grandchild = LongMode::split_leaf(child, PageSize::Size2M, 5);
    assert_eq!(grandchild, 0b1 | PTE_PAT | (GIB + 6 * MIB + 0x5000));
}

#[test]
fn unmap_whole_pages_and_holes() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    pt.map(&mut mem, 0, 0, 4 * GIB, RW, PageSize::Size1G).unwrap();
    pt.unmap(&mut mem, GIB, GIB).unwrap();
    assert_eq!(mem.count(), 2, "whole page removed without splitting");
    assert_eq!(pt.translate(&mut mem, GIB + 5), None);
    // Unmapping across holes and mappings is fine and idempotent.
    pt.unmap(&mut mem, GIB - 2 * MIB, GIB + 4 * MIB).unwrap();
    pt.unmap(&mut mem, GIB - 2 * MIB, GIB + 4 * MIB).unwrap();
    pt.unmap(&mut mem, 512 * GIB, 4 * GIB).unwrap();
    assert_eq!(tr(&pt, &mut mem, GIB - 2 * MIB - 1), Some((GIB - 2 * MIB - 1, PageSize::Size2M)));
    assert_eq!(pt.translate(&mut mem, GIB - 2 * MIB), None);
    assert_eq!(pt.translate(&mut mem, 2 * GIB + 2 * MIB - 1), None);
    assert_eq!(tr(&pt, &mut mem, 2 * GIB + 2 * MIB), Some((2 * GIB + 2 * MIB, PageSize::Size2M)));
    // Remap with other flags.
    pt.map(&mut mem, GIB, GIB, GIB, MapFlags::READ, PageSize::Size1G).unwrap();
    assert_eq!(pt.translate(&mut mem, GIB).unwrap().flags, MapFlags::READ);
}

#[test]
fn empty_table_in_slot_is_reused_with_small_pages() {
    let mut mem = Arena::new();
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    pt.map(&mut mem, 0, 0, PAGE_SIZE, RW, PageSize::Size4K).unwrap();
    pt.unmap(&mut mem, 0, PAGE_SIZE).unwrap();
    let tables = mem.count();
    // The PD slot for [0, 2M) still points at the (empty) PT.
    pt.map(&mut mem, 0, 0, 4 * MIB, RW, PageSize::Size2M).unwrap();
    assert_eq!(mem.count(), tables);
    assert_eq!(tr(&pt, &mut mem, 0x1f_f000), Some((0x1f_f000, PageSize::Size4K)));
    assert_eq!(tr(&pt, &mut mem, 0x20_0000), Some((0x20_0000, PageSize::Size2M)));
}

#[test]
fn table_allocation_failure_is_an_error() {
    let mut mem = Arena::with_limit(3);
    let mut pt = PageTables::<LongMode>::new(&mut mem).unwrap();
    pt.map(&mut mem, 0, 0, 2 * MIB, RW, PageSize::Size2M).unwrap();
    assert_eq!(pt.map(&mut mem, 2 * MIB, 0, PAGE_SIZE, RW, PageSize::Size4K), Err(MapError::OutOfMemory));
    assert_eq!(pt.unmap(&mut mem, 0x1000, PAGE_SIZE), Err(MapError::OutOfMemory));
    assert_eq!(tr(&pt, &mut mem, 0x1000), Some((0x1000, PageSize::Size2M)), "failed split changes nothing");
    let mut none = Arena::with_limit(0);
    assert_eq!(PageTables::<Ept>::new(&mut none).unwrap_err(), MapError::OutOfMemory);
}

/// A table allocator handing out an unaligned address.
struct BadMemory(Table);
impl PageTableMemory for BadMemory {
    fn alloc_table(&mut self) -> Result<u64, MapError> {
        Ok(0x1008)
    }
    fn table(&mut self, _phys: u64) -> &mut Table {
        &mut self.0
    }
}

#[test]
fn misaligned_table_from_memory_is_refused() {
    let mut mem = BadMemory([0; ENTRIES_PER_TABLE]);
    assert_eq!(PageTables::<LongMode>::new(&mut mem).unwrap_err(), MapError::MisalignedTable { phys: 0x1008 });
}

/// xorshift64 (Marsaglia 2003).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Random maps/unmaps over 8 MiB against a page-by-page model.
fn randomized<F: EntryFormat>(seed: u64) {
    const SPAN_PAGES: u64 = 8 * MIB / PAGE_SIZE;
    let mut rng = Rng(seed);
    let mut mem = Arena::new();
    let mut pt = PageTables::<F>::new(&mut mem).unwrap();
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    for round in 0..300 {
        // Sizes and positions biased towards 2 MiB multiples so large pages occur.
        let (start, pages) = if rng.below(2) == 0 {
            (rng.below(4) * 512, 512 * (1 + rng.below(2)))
        } else {
            (rng.below(SPAN_PAGES - 1), 1 + rng.below(700))
        };
        let pages = pages.min(SPAN_PAGES - start);
        let (virt, size) = (start * PAGE_SIZE, pages * PAGE_SIZE);
        if rng.below(3) == 0 {
            pt.unmap(&mut mem, virt, size).unwrap();
            for p in start..start + pages {
                model.remove(&p);
            }
        } else {
            let phys = (rng.below(64) * 512 + if rng.below(2) == 0 { 0 } else { rng.below(512) }) * PAGE_SIZE;
            let first_mapped = (start..start + pages).find(|p| model.contains_key(p));
            match pt.map(&mut mem, virt, phys, size, RW, PageSize::Size1G) {
                Ok(()) => {
                    assert_eq!(first_mapped, None);
                    for (i, p) in (start..start + pages).enumerate() {
                        model.insert(p, phys + i as u64 * PAGE_SIZE);
                    }
                }
                Err(MapError::AlreadyMapped { virt: at }) => {
                    assert_eq!(Some(at / PAGE_SIZE), first_mapped);
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        // The touched pages and their neighbours every time, all pages now and then.
        let check =
            if round % 16 == 15 { 0..SPAN_PAGES } else { start.saturating_sub(1)..(start + pages + 1).min(SPAN_PAGES) };
        for p in check {
            let got = pt.translate(&mut mem, p * PAGE_SIZE + 0x123).map(|t| t.phys);
            assert_eq!(got, model.get(&p).map(|x| x + 0x123), "page {p:#x}");
        }
    }
}

#[test]
fn randomized_against_model() {
    for seed in [7, 0xfeed_f00d, 0x9e37_79b9_7f4a_7c15] {
        randomized::<LongMode>(seed);
        randomized::<Ept>(seed);
    }
}

#[test]
fn display_messages() {
    let e = MapError::AlreadyMapped { virt: 0x20_0000 };
    assert_eq!(std::format!("{e}"), "address 0x200000 is already mapped");
    let e: MapError = FrameError::TooManyRanges.into();
    assert!(std::format!("{e}").starts_with("page-table frame allocation failed"));
    let v: Vec<_> = [MapError::EmptyRange, MapError::OutOfMemory].iter().map(|e| std::format!("{e}")).collect();
    assert!(v.iter().all(|s| !s.is_empty()));
}
