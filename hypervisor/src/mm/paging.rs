//! Four-level page-table builder, generic over the entry format.
//!
//! One walker builds three kinds of tables:
//!
//! * [`LongMode`]: Vireo's own x86-64 tables (SDM Vol. 3A §4.5 "4-Level
//!   Paging", Tables 4-15..4-20; APM Vol. 2 §5.3 long-mode page translation,
//!   §5.4 entry fields).
//! * [`Npt`]: AMD nested page tables (APM Vol. 2 §15.25). Same entry format
//!   as long mode, but the input is a guest-physical address and every leaf
//!   has U/S=1, because the nested walk treats all accesses as user accesses
//!   (APM Vol. 2 §15.25.5).
//! * [`Ept`]: Intel extended page tables (SDM Vol. 3C §29.3 "The Extended
//!   Page Table Mechanism", §28.3 in older editions), with its own bit layout.
//!
//! All four levels (PML4, PDPT, PD, PT) have 512 eight-byte entries. Bits
//! 51:12 of a non-leaf entry hold the physical address of the next table;
//! a PDPTE or PDE with the page-size bit set maps a 1 GiB or 2 MiB page
//! directly. Non-leaf entries are made maximally permissive, so each
//! mapping's permissions are decided by its leaf alone.
//!
//! Nothing here flushes TLBs: after [`PageTables::unmap`] (or changing live
//! tables in any way) the caller must `invlpg`/reload CR3, `INVEPT`, or flush
//! the guest ASID.

use super::frame::FrameError;
use super::{is_aligned, PAGE_SIZE};
use bitflags::bitflags;
use core::fmt;
use core::marker::PhantomData;

/// Entries in one paging structure at any level.
pub const ENTRIES_PER_TABLE: usize = 512;
/// Bits 51:12: the physical address field of every entry (MAXPHYADDR is at
/// most 52, SDM Vol. 3A §4.1.4).
pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// Physical addresses must be below `2^52`.
pub const MAX_PHYS_ADDR: u64 = 1 << 52;
/// Four-level tables translate 48-bit input addresses.
const INPUT_BITS: u32 = 48;
/// Lowest address of the canonical upper half (bits 63:47 all set).
const UPPER_HALF_START: u64 = !((1u64 << (INPUT_BITS - 1)) - 1);
/// Root level (PML4).
const ROOT_LEVEL: u8 = 4;
/// Index bits per level.
const INDEX_BITS: u32 = 9;

/// One paging structure: 512 entries, exactly one 4 KiB frame.
pub type Table = [u64; ENTRIES_PER_TABLE];

const _: () = assert!(core::mem::size_of::<Table>() == PAGE_SIZE as usize);
const _: () = assert!(ENTRIES_PER_TABLE == 1 << INDEX_BITS);
const _: () = assert!(UPPER_HALF_START == 0xFFFF_8000_0000_0000);
const _: () = assert!(ADDR_MASK == (MAX_PHYS_ADDR - 1) & !(PAGE_SIZE - 1));

/// Size of one mapping (leaf).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB, mapped by a PTE.
    Size4K,
    /// 2 MiB, mapped by a PDE with the page-size bit set.
    Size2M,
    /// 1 GiB, mapped by a PDPTE with the page-size bit set. Needs
    /// CPUID.80000001H:EDX.Page1GB (long mode/NPT) or
    /// IA32_VMX_EPT_VPID_CAP bit 17 (EPT).
    Size1G,
}

impl PageSize {
    /// Bytes covered by one page of this size.
    pub const fn bytes(self) -> u64 {
        level_span(self.level())
    }

    /// The paging level whose entries map pages of this size (PT = 1).
    const fn level(self) -> u8 {
        match self {
            Self::Size4K => 1,
            Self::Size2M => 2,
            Self::Size1G => 3,
        }
    }

    /// The page size a leaf at `level` maps, if that level can hold leaves.
    const fn from_level(level: u8) -> Option<Self> {
        match level {
            1 => Some(Self::Size4K),
            2 => Some(Self::Size2M),
            3 => Some(Self::Size1G),
            _ => None,
        }
    }

    /// The next smaller page size (what a split leaf is made of).
    const fn smaller(self) -> Option<Self> {
        match self {
            Self::Size4K => None,
            Self::Size2M => Some(Self::Size4K),
            Self::Size1G => Some(Self::Size2M),
        }
    }
}

bitflags! {
    /// Vendor-neutral permissions and attributes of a mapping; each
    /// [`EntryFormat`] translates them to its own bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MapFlags: u32 {
        /// Reads allowed. Required by long mode/NPT (a present page is
        /// always readable); EPT forbids WRITE without READ.
        const READ = 1 << 0;
        /// Writes allowed.
        const WRITE = 1 << 1;
        /// Instruction fetches allowed. Long mode/NPT: clear sets NX, which
        /// needs EFER.NXE=1 (the host's, for nested walks). EPT: execute-only
        /// (EXECUTE without READ) needs IA32_VMX_EPT_VPID_CAP bit 0.
        const EXECUTE = 1 << 2;
        /// User-mode (CPL 3) access; long mode only (NPT forces it, EPT
        /// ignores it).
        const USER = 1 << 3;
        /// Global translation, kept across CR3 loads; long mode only (NPT and
        /// EPT ignore it).
        const GLOBAL = 1 << 4;
        /// Uncacheable memory (MMIO) instead of write-back.
        const UNCACHED = 1 << 5;
    }
}

/// Why building or changing page tables failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// No memory for another paging structure.
    OutOfMemory,
    /// The frame allocator behind [`PageTableMemory`] failed.
    Frame(FrameError),
    /// [`PageTableMemory::alloc_table`] (or a root given to
    /// [`PageTables::from_root`]) is not a 4 KiB-aligned address below 2^52.
    MisalignedTable {
        /// The offending table address.
        phys: u64,
    },
    /// An address is not 4 KiB-aligned.
    UnalignedAddress {
        /// The offending address.
        addr: u64,
    },
    /// The size is not a multiple of 4 KiB.
    UnalignedSize {
        /// The offending size.
        size: u64,
    },
    /// The size is zero.
    EmptyRange,
    /// `[virt, virt + size)` is not translatable by 4-level tables: not
    /// canonical (long mode), at or above 2^48 (NPT/EPT), or overflowing.
    VirtOutOfRange {
        /// Start of the range.
        virt: u64,
        /// Size of the range.
        size: u64,
    },
    /// `[phys, phys + size)` reaches past 2^52.
    PhysOutOfRange {
        /// Start of the range.
        phys: u64,
        /// Size of the range.
        size: u64,
    },
    /// Part of the range is already mapped (first mapped address given);
    /// nothing was changed.
    AlreadyMapped {
        /// The first already-mapped address.
        virt: u64,
    },
    /// The format cannot express these flags.
    InvalidFlags {
        /// The flags given.
        flags: MapFlags,
        /// Which hardware rule they break.
        reason: &'static str,
    },
}

impl From<FrameError> for MapError {
    fn from(e: FrameError) -> Self {
        Self::Frame(e)
    }
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfMemory => f.write_str("out of memory for page tables"),
            Self::Frame(e) => write!(f, "page-table frame allocation failed: {e}"),
            Self::MisalignedTable { phys } => {
                write!(f, "page table at {phys:#x} is not a 4 KiB-aligned address below 2^52")
            }
            Self::UnalignedAddress { addr } => write!(f, "address {addr:#x} is not 4 KiB-aligned"),
            Self::UnalignedSize { size } => {
                write!(f, "size {size:#x} is not a multiple of 4 KiB")
            }
            Self::EmptyRange => f.write_str("empty range"),
            Self::VirtOutOfRange { virt, size } => {
                write!(f, "input range {virt:#x}+{size:#x} is not translatable by 4-level tables")
            }
            Self::PhysOutOfRange { phys, size } => {
                write!(f, "physical range {phys:#x}+{size:#x} reaches past 2^52")
            }
            Self::AlreadyMapped { virt } => write!(f, "address {virt:#x} is already mapped"),
            Self::InvalidFlags { flags, reason } => write!(f, "invalid flags {flags:?}: {reason}"),
        }
    }
}

/// Backing store for paging structures.
///
/// In the kernel this hands out frames from the frame allocator and reaches
/// them through the identity mapping; in tests it is an arena.
pub trait PageTableMemory {
    /// Allocates one 4 KiB-aligned frame for a paging structure and returns
    /// its physical address. It should be zeroed; [`PageTables`] clears it
    /// anyway before linking it in, so stale contents never become entries.
    fn alloc_table(&mut self) -> Result<u64, MapError>;

    /// The paging structure at `phys`, an address previously returned by
    /// [`PageTableMemory::alloc_table`] (or the root given to
    /// [`PageTables::from_root`]).
    fn table(&mut self, phys: u64) -> &mut Table;
}

/// How a page-table format encodes entries.
///
/// Levels are numbered like the SDM: 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT.
pub trait EntryFormat {
    /// Largest leaf the format can encode (the caller may ask for less).
    const LARGEST_PAGE: PageSize;
    /// `true`: inputs are 48-bit canonical linear addresses (bits 63:47 all
    /// equal, so the upper half is usable). `false`: inputs are
    /// guest-physical addresses below 2^48.
    const SIGN_EXTENDED_INPUT: bool;

    /// Checks that the format can express `flags` for a leaf.
    fn check_flags(flags: MapFlags) -> Result<(), MapError>;
    /// Whether the entry maps anything (a table or a page).
    fn is_present(entry: u64) -> bool;
    /// Whether a present PDPTE/PDE maps a page (page-size bit) instead of
    /// pointing to a table. Never asked for PML4Es or PTEs.
    fn is_large(entry: u64) -> bool;
    /// A maximally permissive non-leaf entry pointing to the table at `table`.
    fn table_entry(table: u64) -> u64;
    /// The table address in a non-leaf entry.
    fn table_address(entry: u64) -> u64 {
        entry & ADDR_MASK
    }
    /// A leaf mapping a page of `size` at `phys` (aligned to `size`) with
    /// `flags` (already accepted by [`EntryFormat::check_flags`]).
    fn leaf_entry(phys: u64, flags: MapFlags, size: PageSize) -> u64;
    /// The page address in a leaf of `size` (bits below the page size, such
    /// as the large-page PAT bit 12, are not part of it).
    fn leaf_address(entry: u64, size: PageSize) -> u64 {
        entry & ADDR_MASK & !(size.bytes() - 1)
    }
    /// The vendor-neutral flags of a leaf.
    fn leaf_flags(entry: u64, size: PageSize) -> MapFlags;
    /// Child `index` (0..512) of a leaf of `size` split into the next smaller
    /// page size, keeping every attribute bit of the original leaf.
    fn split_leaf(entry: u64, size: PageSize, index: u64) -> u64;
}

bitflags! {
    /// Bits of a long-mode (and NPT) paging-structure entry
    /// (SDM Vol. 3A Tables 4-15..4-20, APM Vol. 2 §5.4.1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct LongModeBits: u64 {
        /// P: the entry is valid.
        const PRESENT = 1 << 0;
        /// R/W: writes allowed.
        const WRITABLE = 1 << 1;
        /// U/S: user-mode accesses allowed.
        const USER = 1 << 2;
        /// PWT: page-level write-through.
        const PWT = 1 << 3;
        /// PCD: page-level cache disable.
        const PCD = 1 << 4;
        /// A: set by the CPU on access.
        const ACCESSED = 1 << 5;
        /// D: set by the CPU on write (leaves only).
        const DIRTY = 1 << 6;
        /// PS: a PDPTE/PDE maps a 1 GiB/2 MiB page (in a PTE this bit is PAT).
        const HUGE_PAGE = 1 << 7;
        /// G: global translation (leaves only, needs CR4.PGE).
        const GLOBAL = 1 << 8;
        /// PAT bit of a 1 GiB/2 MiB leaf.
        const HUGE_PAT = 1 << 12;
        /// XD/NX: instruction fetches not allowed (needs EFER.NXE).
        const NO_EXECUTE = 1 << 63;
    }
}

/// PAT bit of a 4 KiB leaf (shares bit 7 with PS of the higher levels).
const PTE_PAT: u64 = 1 << 7;

bitflags! {
    /// Bits of an EPT paging-structure entry (SDM Vol. 3C §29.3.2,
    /// Tables 29-1..29-6).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct EptBits: u64 {
        /// Reads allowed.
        const READ = 1 << 0;
        /// Writes allowed.
        const WRITE = 1 << 1;
        /// Instruction fetches allowed (supervisor fetches with MBEC).
        const EXECUTE = 1 << 2;
        /// Memory type, leaves only (bits 5:3, see [`EptMemType`]).
        const MEMORY_TYPE = 0b111 << 3;
        /// Ignore the guest PAT: the EPT memory type alone applies (leaves only).
        const IGNORE_PAT = 1 << 6;
        /// The PDPTE/PDE maps a 1 GiB/2 MiB page.
        const LARGE_PAGE = 1 << 7;
        /// Accessed flag (if enabled in the EPTP).
        const ACCESSED = 1 << 8;
        /// Dirty flag, leaves only (if enabled in the EPTP).
        const DIRTY = 1 << 9;
    }
}

/// Shift of the memory-type field in EPT leaves.
const EPT_MEMORY_TYPE_SHIFT: u32 = 3;

/// EPT memory types (SDM Vol. 3C §29.3.7; values as in the PAT/MTRRs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EptMemType {
    /// UC.
    Uncacheable = 0,
    /// WC.
    WriteCombining = 1,
    /// WT.
    WriteThrough = 4,
    /// WP.
    WriteProtected = 5,
    /// WB.
    WriteBack = 6,
}

impl EptMemType {
    /// Decodes a 3-bit memory-type field (`None` for reserved values 2, 3, 7).
    pub const fn from_bits(bits: u64) -> Option<Self> {
        match bits {
            0 => Some(Self::Uncacheable),
            1 => Some(Self::WriteCombining),
            4 => Some(Self::WriteThrough),
            5 => Some(Self::WriteProtected),
            6 => Some(Self::WriteBack),
            _ => None,
        }
    }
}

/// Long-mode paging as used by the CPU for linear addresses: Vireo's own
/// tables (SDM Vol. 3A §4.5, APM Vol. 2 §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LongMode;

/// AMD nested page tables (APM Vol. 2 §15.25): long-mode entries translating
/// guest-physical addresses, every leaf with U/S=1 (§15.25.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Npt;

/// Intel extended page tables (SDM Vol. 3C §29.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ept;

/// Non-leaf long-mode entries allow everything; the leaf restricts.
const LONG_MODE_TABLE_BITS: LongModeBits =
    LongModeBits::PRESENT.union(LongModeBits::WRITABLE).union(LongModeBits::USER);

fn long_mode_check(flags: MapFlags) -> Result<(), MapError> {
    if flags.contains(MapFlags::READ) {
        Ok(())
    } else {
        Err(MapError::InvalidFlags { flags, reason: "long-mode/NPT pages are always readable: READ is required" })
    }
}

fn long_mode_leaf(phys: u64, flags: MapFlags, size: PageSize) -> u64 {
    let mut bits = LongModeBits::PRESENT;
    bits.set(LongModeBits::WRITABLE, flags.contains(MapFlags::WRITE));
    bits.set(LongModeBits::USER, flags.contains(MapFlags::USER));
    bits.set(LongModeBits::GLOBAL, flags.contains(MapFlags::GLOBAL));
    bits.set(LongModeBits::NO_EXECUTE, !flags.contains(MapFlags::EXECUTE));
    // PCD=PWT=1 selects PAT entry 3, UC in the power-on PAT
    // (SDM Vol. 3A §13.12.4, §11.12.4 in older editions).
    bits.set(LongModeBits::PCD | LongModeBits::PWT, flags.contains(MapFlags::UNCACHED));
    bits.set(LongModeBits::HUGE_PAGE, size != PageSize::Size4K);
    bits.bits() | (phys & ADDR_MASK)
}

fn long_mode_flags(entry: u64) -> MapFlags {
    let bits = LongModeBits::from_bits_retain(entry);
    let mut flags = MapFlags::READ;
    flags.set(MapFlags::WRITE, bits.contains(LongModeBits::WRITABLE));
    flags.set(MapFlags::USER, bits.contains(LongModeBits::USER));
    flags.set(MapFlags::GLOBAL, bits.contains(LongModeBits::GLOBAL));
    flags.set(MapFlags::EXECUTE, !bits.contains(LongModeBits::NO_EXECUTE));
    flags.set(MapFlags::UNCACHED, bits.contains(LongModeBits::PCD));
    flags
}

fn long_mode_split(entry: u64, size: PageSize, index: u64) -> u64 {
    let Some(child) = size.smaller() else {
        return entry;
    };
    let base = entry & ADDR_MASK & !(size.bytes() - 1);
    let pat = entry & LongModeBits::HUGE_PAT.bits() != 0;
    let mut attrs = entry & !ADDR_MASK & !LongModeBits::HUGE_PAGE.bits();
    match child {
        PageSize::Size4K if pat => attrs |= PTE_PAT,
        PageSize::Size4K => {}
        _ => {
            attrs |= LongModeBits::HUGE_PAGE.bits();
            if pat {
                attrs |= LongModeBits::HUGE_PAT.bits();
            }
        }
    }
    attrs | (base + index * child.bytes())
}

impl EntryFormat for LongMode {
    const LARGEST_PAGE: PageSize = PageSize::Size1G;
    const SIGN_EXTENDED_INPUT: bool = true;

    fn check_flags(flags: MapFlags) -> Result<(), MapError> {
        long_mode_check(flags)
    }
    fn is_present(entry: u64) -> bool {
        entry & LongModeBits::PRESENT.bits() != 0
    }
    fn is_large(entry: u64) -> bool {
        entry & LongModeBits::HUGE_PAGE.bits() != 0
    }
    fn table_entry(table: u64) -> u64 {
        LONG_MODE_TABLE_BITS.bits() | (table & ADDR_MASK)
    }
    fn leaf_entry(phys: u64, flags: MapFlags, size: PageSize) -> u64 {
        long_mode_leaf(phys, flags, size)
    }
    fn leaf_flags(entry: u64, _size: PageSize) -> MapFlags {
        long_mode_flags(entry)
    }
    fn split_leaf(entry: u64, size: PageSize, index: u64) -> u64 {
        long_mode_split(entry, size, index)
    }
}

impl EntryFormat for Npt {
    const LARGEST_PAGE: PageSize = PageSize::Size1G;
    const SIGN_EXTENDED_INPUT: bool = false;

    fn check_flags(flags: MapFlags) -> Result<(), MapError> {
        long_mode_check(flags)
    }
    fn is_present(entry: u64) -> bool {
        LongMode::is_present(entry)
    }
    fn is_large(entry: u64) -> bool {
        LongMode::is_large(entry)
    }
    fn table_entry(table: u64) -> u64 {
        LongMode::table_entry(table)
    }
    fn leaf_entry(phys: u64, flags: MapFlags, size: PageSize) -> u64 {
        // Nested walks are user accesses (APM Vol. 2 §15.25.5); the G bit
        // has no use for guest-physical translations.
        let flags = (flags | MapFlags::USER) - MapFlags::GLOBAL;
        long_mode_leaf(phys, flags, size)
    }
    fn leaf_flags(entry: u64, _size: PageSize) -> MapFlags {
        long_mode_flags(entry)
    }
    fn split_leaf(entry: u64, size: PageSize, index: u64) -> u64 {
        long_mode_split(entry, size, index)
    }
}

impl Ept {
    /// Page-walk length minus one, EPTP bits 5:3 (4-level EPT).
    const EPTP_WALK_LENGTH_4: u64 = 3 << 3;
    /// EPTP bit 6: enable accessed/dirty flags.
    const EPTP_ACCESSED_DIRTY: u64 = 1 << 6;

    /// The EPT pointer for a VMCS (SDM Vol. 3C §25.6.11, §24.6.11 in older
    /// editions): the PML4 at `root`, write-back paging structures (check
    /// IA32_VMX_EPT_VPID_CAP bit 14), 4-level walk, and A/D flags if
    /// `accessed_dirty` (check IA32_VMX_EPT_VPID_CAP bit 21).
    pub const fn eptp(root: u64, accessed_dirty: bool) -> u64 {
        let ad = if accessed_dirty { Self::EPTP_ACCESSED_DIRTY } else { 0 };
        (root & ADDR_MASK) | Self::EPTP_WALK_LENGTH_4 | EptMemType::WriteBack as u64 | ad
    }

    fn memory_type(flags: MapFlags) -> EptMemType {
        if flags.contains(MapFlags::UNCACHED) {
            EptMemType::Uncacheable
        } else {
            EptMemType::WriteBack
        }
    }
}

const EPT_RWX: EptBits = EptBits::READ.union(EptBits::WRITE).union(EptBits::EXECUTE);

impl EntryFormat for Ept {
    const LARGEST_PAGE: PageSize = PageSize::Size1G;
    const SIGN_EXTENDED_INPUT: bool = false;

    fn check_flags(flags: MapFlags) -> Result<(), MapError> {
        if !flags.intersects(MapFlags::READ | MapFlags::WRITE | MapFlags::EXECUTE) {
            return Err(MapError::InvalidFlags {
                flags,
                reason: "an EPT entry without read, write or execute is not present",
            });
        }
        if flags.contains(MapFlags::WRITE) && !flags.contains(MapFlags::READ) {
            return Err(MapError::InvalidFlags {
                flags,
                reason: "write without read is an EPT misconfiguration (SDM Vol. 3C §29.3.3.1)",
            });
        }
        Ok(())
    }
    fn is_present(entry: u64) -> bool {
        entry & EPT_RWX.bits() != 0
    }
    fn is_large(entry: u64) -> bool {
        entry & EptBits::LARGE_PAGE.bits() != 0
    }
    fn table_entry(table: u64) -> u64 {
        EPT_RWX.bits() | (table & ADDR_MASK)
    }
    fn leaf_entry(phys: u64, flags: MapFlags, size: PageSize) -> u64 {
        let mut bits = EptBits::empty();
        bits.set(EptBits::READ, flags.contains(MapFlags::READ));
        bits.set(EptBits::WRITE, flags.contains(MapFlags::WRITE));
        bits.set(EptBits::EXECUTE, flags.contains(MapFlags::EXECUTE));
        bits.set(EptBits::LARGE_PAGE, size != PageSize::Size4K);
        let memory_type = (Self::memory_type(flags) as u64) << EPT_MEMORY_TYPE_SHIFT;
        bits.bits() | memory_type | (phys & ADDR_MASK)
    }
    fn leaf_flags(entry: u64, _size: PageSize) -> MapFlags {
        let bits = EptBits::from_bits_retain(entry);
        let mut flags = MapFlags::empty();
        flags.set(MapFlags::READ, bits.contains(EptBits::READ));
        flags.set(MapFlags::WRITE, bits.contains(EptBits::WRITE));
        flags.set(MapFlags::EXECUTE, bits.contains(EptBits::EXECUTE));
        let memory_type = (entry & EptBits::MEMORY_TYPE.bits()) >> EPT_MEMORY_TYPE_SHIFT;
        flags.set(MapFlags::UNCACHED, EptMemType::from_bits(memory_type) == Some(EptMemType::Uncacheable));
        flags
    }
    fn split_leaf(entry: u64, size: PageSize, index: u64) -> u64 {
        let Some(child) = size.smaller() else {
            return entry;
        };
        let base = entry & ADDR_MASK & !(size.bytes() - 1);
        let mut attrs = entry & !ADDR_MASK & !EptBits::LARGE_PAGE.bits();
        if child != PageSize::Size4K {
            attrs |= EptBits::LARGE_PAGE.bits();
        }
        attrs | (base + index * child.bytes())
    }
}

/// Result of [`PageTables::translate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The physical address the input address maps to.
    pub phys: u64,
    /// Flags of the leaf mapping it.
    pub flags: MapFlags,
    /// Size of the page containing it.
    pub page_size: PageSize,
}

/// Bytes covered by one entry at `level`.
const fn level_span(level: u8) -> u64 {
    1 << (PAGE_SIZE.trailing_zeros() + INDEX_BITS * (level as u32 - 1))
}

/// Index of the entry for `addr` in the table at `level`.
const fn index(addr: u64, level: u8) -> usize {
    ((addr / level_span(level)) % ENTRIES_PER_TABLE as u64) as usize
}

/// A 4-level page-table hierarchy in format `F`, identified by its root.
pub struct PageTables<F: EntryFormat> {
    root: u64,
    format: PhantomData<fn() -> F>,
}

impl<F: EntryFormat> fmt::Debug for PageTables<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageTables")
            .field("format", &core::any::type_name::<F>())
            .field("root", &format_args!("{:#x}", self.root))
            .finish()
    }
}

impl<F: EntryFormat> PageTables<F> {
    /// Allocates an empty root table.
    pub fn new<M: PageTableMemory + ?Sized>(mem: &mut M) -> Result<Self, MapError> {
        let root = alloc_cleared(mem)?;
        Ok(Self { root, format: PhantomData })
    }

    /// Adopts an existing hierarchy rooted at `root` (reached through the
    /// same [`PageTableMemory`]).
    pub fn from_root(root: u64) -> Result<Self, MapError> {
        if root & !ADDR_MASK != 0 {
            return Err(MapError::MisalignedTable { phys: root });
        }
        Ok(Self { root, format: PhantomData })
    }

    /// Physical address of the root (PML4) table: the CR3/nCR3 base, or the
    /// EPTP base (see [`Ept::eptp`]).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Maps `[virt, virt + size)` to `[phys, phys + size)` with `flags`,
    /// using at each step the largest page (at most `largest`, and at most
    /// what the format supports) that the alignment of both addresses and the
    /// remaining size allow. A slot that already holds a (possibly empty)
    /// lower-level table is filled with smaller pages instead.
    ///
    /// Errors, before changing anything, on unaligned or empty input,
    /// untranslatable ranges, flags the format cannot express, or overlap
    /// with an existing mapping. If a table allocation fails midway
    /// ([`MapError::OutOfMemory`]/[`MapError::Frame`]), the part mapped so
    /// far stays mapped; the caller may [`PageTables::unmap`] it.
    pub fn map<M: PageTableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        virt: u64,
        phys: u64,
        size: u64,
        flags: MapFlags,
        largest: PageSize,
    ) -> Result<(), MapError> {
        check_alignment(virt, size)?;
        if !is_aligned(phys, PAGE_SIZE) {
            return Err(MapError::UnalignedAddress { addr: phys });
        }
        check_input_range::<F>(virt, size)?;
        match phys.checked_add(size) {
            Some(end) if end <= MAX_PHYS_ADDR => {}
            _ => return Err(MapError::PhysOutOfRange { phys, size }),
        }
        F::check_flags(flags)?;
        if let Some(mapped) = self.first_mapped(mem, virt, size) {
            return Err(MapError::AlreadyMapped { virt: mapped });
        }

        let largest = largest.min(F::LARGEST_PAGE);
        let mut done = 0;
        while done < size {
            let (v, p, remaining) = (virt + done, phys + done, size - done);
            let mut table = self.root;
            let mut level = ROOT_LEVEL;
            done += loop {
                let idx = index(v, level);
                let entry = mem.table(table)[idx];
                let present = F::is_present(entry);
                if let Some(page) = PageSize::from_level(level) {
                    let bytes = page.bytes();
                    if present && (level == 1 || F::is_large(entry)) {
                        return Err(MapError::AlreadyMapped { virt: v });
                    }
                    let fits = page <= largest && is_aligned(v, bytes) && is_aligned(p, bytes) && remaining >= bytes;
                    if !present && fits {
                        mem.table(table)[idx] = F::leaf_entry(p, flags, page);
                        break bytes;
                    }
                }
                // Level 1 always ends the loop above (a 4 KiB page always
                // fits), so `level` is at least 2 here.
                table = if present {
                    F::table_address(entry)
                } else {
                    let new = alloc_cleared(mem)?;
                    mem.table(table)[idx] = F::table_entry(new);
                    new
                };
                level -= 1;
            };
        }
        Ok(())
    }

    /// Removes every mapping in `[virt, virt + size)`; holes are skipped. A
    /// 1 GiB or 2 MiB page only partly inside the range is first split into
    /// smaller pages with the same attributes, so the rest stays mapped
    /// (e.g. a guard page carved out of a large mapping). Emptied tables are
    /// kept. The caller flushes the TLB.
    ///
    /// If a split cannot allocate a table, the range is unmapped only up to
    /// that page and the error is returned.
    pub fn unmap<M: PageTableMemory + ?Sized>(&mut self, mem: &mut M, virt: u64, size: u64) -> Result<(), MapError> {
        check_alignment(virt, size)?;
        check_input_range::<F>(virt, size)?;
        let mut done = 0;
        while done < size {
            let (v, remaining) = (virt + done, size - done);
            let mut table = self.root;
            let mut level = ROOT_LEVEL;
            let step = loop {
                let idx = index(v, level);
                let entry = mem.table(table)[idx];
                let span = level_span(level);
                let offset = v & (span - 1);
                if !F::is_present(entry) {
                    break span - offset;
                }
                let leaf = match PageSize::from_level(level) {
                    Some(page) if level == 1 || F::is_large(entry) => Some(page),
                    _ => None,
                };
                table = match leaf {
                    Some(_) if offset == 0 && remaining >= span => {
                        mem.table(table)[idx] = 0;
                        break span;
                    }
                    Some(page) => {
                        // Partly covered large page (offset or size are
                        // 4 KiB multiples, so this is not a PTE): split it.
                        let child = alloc_cleared(mem)?;
                        for (i, slot) in mem.table(child).iter_mut().enumerate() {
                            *slot = F::split_leaf(entry, page, i as u64);
                        }
                        mem.table(table)[idx] = F::table_entry(child);
                        child
                    }
                    None => F::table_address(entry),
                };
                level -= 1;
            };
            done += step.min(remaining);
        }
        Ok(())
    }

    /// Looks up where `virt` maps to, or `None` if it is unmapped or not a
    /// translatable input address.
    pub fn translate<M: PageTableMemory + ?Sized>(&self, mem: &mut M, virt: u64) -> Option<Translation> {
        check_input_range::<F>(virt, 1).ok()?;
        let mut table = self.root;
        let mut level = ROOT_LEVEL;
        loop {
            let entry = mem.table(table)[index(virt, level)];
            if !F::is_present(entry) {
                return None;
            }
            if let Some(page) = PageSize::from_level(level) {
                if level == 1 || F::is_large(entry) {
                    return Some(Translation {
                        phys: F::leaf_address(entry, page) | (virt & (page.bytes() - 1)),
                        flags: F::leaf_flags(entry, page),
                        page_size: page,
                    });
                }
            }
            table = F::table_address(entry);
            level -= 1;
        }
    }

    /// The physical address of the leaf entry that maps `virt` (the 8-byte slot in its
    /// table), or `None` if `virt` is unmapped. For a caller that toggles a leaf in place
    /// (lazily populated guest memory) through its own pointer to the table.
    pub fn leaf_slot<M: PageTableMemory + ?Sized>(&self, mem: &mut M, virt: u64) -> Option<u64> {
        check_input_range::<F>(virt, 1).ok()?;
        let mut table = self.root;
        let mut level = ROOT_LEVEL;
        loop {
            let idx = index(virt, level);
            let entry = mem.table(table)[idx];
            if !F::is_present(entry) {
                return None;
            }
            if PageSize::from_level(level).is_some() && (level == 1 || F::is_large(entry)) {
                return Some(table + idx as u64 * 8);
            }
            table = F::table_address(entry);
            level -= 1;
        }
    }

    /// The lowest mapped address in `[virt, virt + size)` (already validated).
    fn first_mapped<M: PageTableMemory + ?Sized>(&self, mem: &mut M, virt: u64, size: u64) -> Option<u64> {
        let last = virt + (size - 1);
        let mut v = virt;
        loop {
            let mut table = self.root;
            let mut level = ROOT_LEVEL;
            let span = loop {
                let entry = mem.table(table)[index(v, level)];
                if !F::is_present(entry) {
                    break level_span(level);
                }
                if level == 1 || (PageSize::from_level(level).is_some() && F::is_large(entry)) {
                    return Some(v);
                }
                table = F::table_address(entry);
                level -= 1;
            };
            // The start of the next entry at this level; past the top of the
            // address space means done.
            v = (v & !(span - 1)).checked_add(span)?;
            if v > last {
                return None;
            }
        }
    }
}

/// Allocates a paging structure, checks its address and clears it.
fn alloc_cleared<M: PageTableMemory + ?Sized>(mem: &mut M) -> Result<u64, MapError> {
    let phys = mem.alloc_table()?;
    if phys & !ADDR_MASK != 0 {
        return Err(MapError::MisalignedTable { phys });
    }
    *mem.table(phys) = [0; ENTRIES_PER_TABLE];
    Ok(phys)
}

fn check_alignment(virt: u64, size: u64) -> Result<(), MapError> {
    if size == 0 {
        return Err(MapError::EmptyRange);
    }
    if !is_aligned(virt, PAGE_SIZE) {
        return Err(MapError::UnalignedAddress { addr: virt });
    }
    if !is_aligned(size, PAGE_SIZE) {
        return Err(MapError::UnalignedSize { size });
    }
    Ok(())
}

/// Checks that `[virt, virt + size)` (size > 0) is translatable in format `F`:
/// within one canonical half for linear addresses (SDM Vol. 3A §3.3.7.1),
/// below 2^48 for guest-physical ones.
fn check_input_range<F: EntryFormat>(virt: u64, size: u64) -> Result<(), MapError> {
    let err = MapError::VirtOutOfRange { virt, size };
    let last = size.checked_sub(1).and_then(|s| virt.checked_add(s)).ok_or(err)?;
    let lower_limit = if F::SIGN_EXTENDED_INPUT { 1 << (INPUT_BITS - 1) } else { 1 << INPUT_BITS };
    let in_lower = last < lower_limit;
    let in_upper = F::SIGN_EXTENDED_INPUT && virt >= UPPER_HALF_START;
    if in_lower || in_upper {
        Ok(())
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests;
