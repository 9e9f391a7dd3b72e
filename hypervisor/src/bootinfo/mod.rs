//! What the boot loader told us: multiboot2 information turned into Vireo's own
//! [`BootInfo`], validated.
//!
//! The multiboot2 crate parses the tags; this module decides what they mean for Vireo and
//! rejects what it cannot trust. A missing memory map or a damaged information structure is
//! a fatal, clearly reported error; a bad module is reported and dropped, and Vireo goes on
//! with the rest.

pub mod cmdline;

use core::fmt;

use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};

use crate::mm::PhysRange;

/// EAX at the multiboot2 entry (Multiboot2 spec §3.3).
pub const MULTIBOOT2_BOOTLOADER_MAGIC: u32 = 0x36D7_6289;
/// Memory map entries Vireo keeps; more are reported and dropped.
pub const MAX_REGIONS: usize = 128;
/// Boot modules Vireo accepts; more are rejected.
pub const MAX_MODULES: usize = 32;

/// How the machine was booted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

/// The kind of a memory map entry (e820 types, Multiboot2 spec §3.6.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    Available,
    AcpiReclaimable,
    AcpiNvs,
    Defective,
    Reserved,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub range: PhysRange,
    pub kind: RegionKind,
}

/// A boot module that passed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module<'a> {
    /// Position on GRUB's command lines (0 = first `module2`).
    pub index: usize,
    /// The text after the module's path on its `module2` line.
    pub cmdline: &'a str,
    pub range: PhysRange,
}

/// Why a module was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleProblem {
    Empty,
    /// The loader reported an end address below the start address.
    InvertedRange,
    CmdlineNotUtf8,
    OverlapsImage,
    OverlapsBootInfo,
    OverlapsModule {
        other: usize,
    },
    /// Not entirely inside available RAM of the memory map.
    OutsideRam,
    TooMany,
}

impl fmt::Display for ModuleProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleProblem::Empty => f.write_str("empty module"),
            ModuleProblem::InvertedRange => f.write_str("end address below start address"),
            ModuleProblem::CmdlineNotUtf8 => f.write_str("module command line is not UTF-8"),
            ModuleProblem::OverlapsImage => f.write_str("overlaps Vireo's own image"),
            ModuleProblem::OverlapsBootInfo => f.write_str("overlaps the multiboot2 information"),
            ModuleProblem::OverlapsModule { other } => write!(f, "overlaps module {other}"),
            ModuleProblem::OutsideRam => f.write_str("not inside available RAM"),
            ModuleProblem::TooMany => write!(f, "more than {MAX_MODULES} modules"),
        }
    }
}

/// A rejected module: reported, never used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub index: usize,
    pub range: PhysRange,
    pub problem: ModuleProblem,
}

/// Fatal problems with the boot information: Vireo cannot know its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// EAX at entry was not the multiboot2 magic: not booted by a multiboot2 loader.
    BadMagic(u32),
    NullPointer,
    /// The structure failed to parse (bad size, alignment or missing end tag).
    Malformed(&'static str),
    NoMemoryMap,
    NoAvailableMemory,
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootInfoError::BadMagic(m) => {
                write!(f, "not booted by a multiboot2 loader (EAX={m:#x}, expected {MULTIBOOT2_BOOTLOADER_MAGIC:#x})")
            }
            BootInfoError::NullPointer => f.write_str("multiboot2 information pointer is null"),
            BootInfoError::Malformed(why) => write!(f, "multiboot2 information is malformed: {why}"),
            BootInfoError::NoMemoryMap => f.write_str("multiboot2 information has no memory map tag"),
            BootInfoError::NoAvailableMemory => f.write_str("memory map lists no available RAM"),
        }
    }
}

/// Everything Vireo takes from the boot loader.
#[derive(Clone, Debug)]
pub struct BootInfo<'a> {
    pub cmdline: &'a str,
    pub loader: &'a str,
    pub firmware: Firmware,
    /// The multiboot2 information structure itself (must not be overwritten while used).
    pub mbi: PhysRange,
    /// Sorted by start address.
    pub regions: [Option<Region>; MAX_REGIONS],
    /// Entries of the firmware map that were dropped (zero-sized, overflowing, too many).
    pub dropped_regions: usize,
    pub modules: [Option<Module<'a>>; MAX_MODULES],
    pub rejected: [Option<Rejected>; MAX_MODULES],
    /// Physical address of the firmware's ACPI RSDP copy in the boot information, if any.
    pub rsdp: Option<(u64, u8)>,
}

impl<'a> BootInfo<'a> {
    pub fn regions(&self) -> impl Iterator<Item = &Region> + '_ {
        self.regions.iter().flatten()
    }

    pub fn available(&self) -> impl Iterator<Item = PhysRange> + '_ {
        self.regions().filter(|r| r.kind == RegionKind::Available).map(|r| r.range)
    }

    pub fn modules(&self) -> impl Iterator<Item = &Module<'a>> + '_ {
        self.modules.iter().flatten()
    }

    pub fn rejected(&self) -> impl Iterator<Item = &Rejected> + '_ {
        self.rejected.iter().flatten()
    }

    /// Total available RAM in bytes.
    pub fn available_bytes(&self) -> u64 {
        self.available().map(|r| r.len()).sum()
    }

    /// Ranges the frame allocator must never hand out: the image, the boot information,
    /// every module (rejected ones too, since their bytes may still be looked at).
    pub fn reserved(&self, image: PhysRange, out: &mut [PhysRange]) -> usize {
        let all = [image, self.mbi]
            .into_iter()
            .chain(self.modules().map(|m| m.range))
            .chain(self.rejected().map(|r| r.range).filter(|r| !r.is_empty()));
        let mut n = 0;
        for (slot, range) in out.iter_mut().zip(all) {
            *slot = range;
            n += 1;
        }
        n
    }
}

/// Loads the multiboot2 information at `addr` after checking the entry magic.
///
/// # Safety
/// `addr` must be the address GRUB passed in EBX, identity-mapped and readable.
pub unsafe fn load(magic: u32, addr: u64) -> Result<BootInformation<'static>, BootInfoError> {
    if magic != MULTIBOOT2_BOOTLOADER_MAGIC {
        return Err(BootInfoError::BadMagic(magic));
    }
    if addr == 0 {
        return Err(BootInfoError::NullPointer);
    }
    // SAFETY: the caller guarantees `addr` is the loader's readable information; the crate
    // checks alignment, total size and the end tag before handing out any tag.
    unsafe { BootInformation::load(addr as *const BootInformationHeader) }.map_err(|e| match e {
        multiboot2::LoadError::NoEndTag => BootInfoError::Malformed("missing end tag"),
        multiboot2::LoadError::Memory(_) => BootInfoError::Malformed("bad size or alignment"),
    })
}

/// Turns parsed multiboot2 information into a validated [`BootInfo`]. `image` is Vireo's
/// own physical extent, which no module may overlap.
pub fn parse<'a>(mbi: &'a BootInformation<'a>, image: PhysRange) -> Result<BootInfo<'a>, BootInfoError> {
    let mbi_range = PhysRange::new(mbi.start_address() as u64, mbi.end_address() as u64);
    let mut info = BootInfo {
        cmdline: mbi.command_line_tag().and_then(|t| t.cmdline().ok()).unwrap_or(""),
        loader: mbi.boot_loader_name_tag().and_then(|t| t.name().ok()).unwrap_or("unknown"),
        firmware: if mbi.efi_sdt64_tag().is_some() || mbi.efi_memory_map_tag().is_some() {
            Firmware::Uefi
        } else {
            Firmware::Bios
        },
        mbi: mbi_range,
        regions: [None; MAX_REGIONS],
        dropped_regions: 0,
        modules: [None; MAX_MODULES],
        rejected: [None; MAX_MODULES],
        rsdp: None,
    };
    if let Some(tag) = mbi.rsdp_v2_tag() {
        info.rsdp = Some((payload_addr(tag), 2));
    } else if let Some(tag) = mbi.rsdp_v1_tag() {
        info.rsdp = Some((payload_addr(tag), 1));
    }

    let map = mbi.memory_map_tag().ok_or(BootInfoError::NoMemoryMap)?;
    let mut count = 0;
    for area in map.memory_areas() {
        let start = area.start_address();
        let end = start.checked_add(area.size());
        let (Some(end), true) = (end, area.size() > 0) else {
            info.dropped_regions += 1;
            continue;
        };
        if count == MAX_REGIONS {
            info.dropped_regions += 1;
            continue;
        }
        let kind = match area.typ() {
            MemoryAreaType::Available => RegionKind::Available,
            MemoryAreaType::AcpiAvailable => RegionKind::AcpiReclaimable,
            MemoryAreaType::ReservedHibernate => RegionKind::AcpiNvs,
            MemoryAreaType::Defective => RegionKind::Defective,
            _ => RegionKind::Reserved,
        };
        info.regions[count] = Some(Region { range: PhysRange::new(start, end), kind });
        count += 1;
    }
    info.regions[..count].sort_unstable_by_key(|r| r.map(|r| r.range.start));
    if info.available_bytes() == 0 {
        return Err(BootInfoError::NoAvailableMemory);
    }

    let (mut accepted, mut rejected) = (0, 0);
    for (index, tag) in mbi.module_tags().enumerate() {
        let (start, end) = (tag.start_address() as u64, tag.end_address() as u64);
        let range = PhysRange::new(start, end.max(start));
        let verdict = if accepted == MAX_MODULES {
            Err(ModuleProblem::TooMany)
        } else {
            check_module(&info, index, start, end, image)
                .and_then(|()| tag.cmdline().map_err(|_| ModuleProblem::CmdlineNotUtf8))
        };
        match verdict {
            Ok(cmdline) => {
                info.modules[accepted] = Some(Module { index, cmdline, range });
                accepted += 1;
            }
            Err(problem) if rejected < MAX_MODULES => {
                info.rejected[rejected] = Some(Rejected { index, range, problem });
                rejected += 1;
            }
            Err(_) => {}
        }
    }
    Ok(info)
}

fn check_module(
    info: &BootInfo<'_>,
    index: usize,
    start: u64,
    end: u64,
    image: PhysRange,
) -> Result<(), ModuleProblem> {
    if end < start {
        return Err(ModuleProblem::InvertedRange);
    }
    let range = PhysRange::new(start, end);
    if range.is_empty() {
        return Err(ModuleProblem::Empty);
    }
    if range.overlaps(&image) {
        return Err(ModuleProblem::OverlapsImage);
    }
    if range.overlaps(&info.mbi) {
        return Err(ModuleProblem::OverlapsBootInfo);
    }
    if let Some(other) = info.modules().find(|m| m.range.overlaps(&range)) {
        debug_assert_ne!(other.index, index);
        return Err(ModuleProblem::OverlapsModule { other: other.index });
    }
    if !covered(range, info.available()) {
        return Err(ModuleProblem::OutsideRam);
    }
    Ok(())
}

/// Whether `range` lies entirely inside the union of `sorted` (sorted by start).
fn covered(range: PhysRange, sorted: impl Iterator<Item = PhysRange>) -> bool {
    let mut cursor = range.start;
    for r in sorted {
        if r.start <= cursor && r.end > cursor {
            cursor = r.end;
            if cursor >= range.end {
                return true;
            }
        }
    }
    cursor >= range.end
}

/// Physical address of a tag's payload (just past its 8-byte header).
fn payload_addr<T>(tag: &T) -> u64 {
    tag as *const T as u64 + 8
}

/// Test hook: rewrites the first accepted module as if it overlapped Vireo's image, then
/// runs it through the same validation as real input.
pub fn corrupt_first_module_for_test(info: &mut BootInfo<'_>, image: PhysRange) {
    if let Some(m) = info.modules[0].take() {
        let range = PhysRange::new(image.start, image.start + m.range.len().max(1));
        let problem =
            check_module(info, m.index, range.start, range.end, image).err().unwrap_or(ModuleProblem::OverlapsImage);
        if let Some(slot) = info.rejected.iter_mut().find(|s| s.is_none()) {
            *slot = Some(Rejected { index: m.index, range, problem });
        }
        info.modules.copy_within(1.., 0);
        info.modules[MAX_MODULES - 1] = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use multiboot2::{Builder, CommandLineTag, MaybeDynSized, MemoryArea, MemoryMapTag, ModuleTag};

    const MIB: u64 = 1 << 20;
    const IMAGE: PhysRange = PhysRange { start: 2 * MIB, end: 3 * MIB };

    fn standard_map() -> Box<MemoryMapTag> {
        MemoryMapTag::new(&[
            MemoryArea::new(0, 0x9fc00, MemoryAreaType::Available),
            MemoryArea::new(0x9fc00, 0x400, MemoryAreaType::Reserved),
            MemoryArea::new(0xf0000, 0x10000, MemoryAreaType::Reserved),
            MemoryArea::new(MIB, 511 * MIB, MemoryAreaType::Available),
            MemoryArea::new(0xfffc0000, 0x40000, MemoryAreaType::Reserved),
        ])
    }

    /// Builds an MBI and hands the parsed result to `check`.
    fn with_mbi(builder: Builder, check: impl FnOnce(Result<BootInfo<'_>, BootInfoError>)) {
        let structure = builder.build();
        let bytes = structure.as_bytes();
        // SAFETY: the builder produces a complete, 8-byte aligned MBI with an end tag,
        // alive for the whole closure.
        let mbi = unsafe { load(MULTIBOOT2_BOOTLOADER_MAGIC, bytes.as_ptr() as u64) }.expect("load");
        check(parse(&mbi, IMAGE));
    }

    #[test]
    fn bad_magic_and_null_are_clear_errors() {
        let err = unsafe { load(0x2BADB002, 0x1000) }.unwrap_err();
        assert_eq!(err, BootInfoError::BadMagic(0x2BADB002));
        assert!(err.to_string().contains("not booted by a multiboot2 loader"));
        assert_eq!(unsafe { load(MULTIBOOT2_BOOTLOADER_MAGIC, 0) }.unwrap_err(), BootInfoError::NullPointer);
    }

    #[test]
    fn malformed_structure_is_rejected() {
        // total_size smaller than the header and no end tag.
        #[repr(C, align(8))]
        struct Raw([u32; 4]);
        let raw = Raw([4, 0, 0, 0]);
        let err = unsafe { load(MULTIBOOT2_BOOTLOADER_MAGIC, raw.0.as_ptr() as u64) }.unwrap_err();
        assert!(matches!(err, BootInfoError::Malformed(_)), "{err:?}");
        // Plausible size, but the last tag is not an end tag.
        let raw = Raw([16, 0, 1, 8]);
        let err = unsafe { load(MULTIBOOT2_BOOTLOADER_MAGIC, raw.0.as_ptr() as u64) }.unwrap_err();
        assert!(matches!(err, BootInfoError::Malformed(_)), "{err:?}");
    }

    #[test]
    fn missing_memory_map_is_fatal() {
        with_mbi(Builder::new().cmdline(CommandLineTag::new("log=info")), |r| {
            assert_eq!(r.unwrap_err(), BootInfoError::NoMemoryMap);
        });
        let empty = MemoryMapTag::new(&[MemoryArea::new(0, 0x1000, MemoryAreaType::Reserved)]);
        with_mbi(Builder::new().mmap(empty), |r| {
            assert_eq!(r.unwrap_err(), BootInfoError::NoAvailableMemory);
        });
    }

    #[test]
    fn memory_cmdline_and_modules() {
        let b = Builder::new()
            .cmdline(CommandLineTag::new("log=debug exit=qemu"))
            .mmap(standard_map())
            .add_module(ModuleTag::new(4 * MIB as u32, 5 * MIB as u32, "selftest"))
            .add_module(ModuleTag::new(6 * MIB as u32, (6 * MIB + 100) as u32, "kernel cmd=x"));
        with_mbi(b, |r| {
            let info = r.unwrap();
            assert_eq!(info.cmdline, "log=debug exit=qemu");
            assert_eq!(info.firmware, Firmware::Bios);
            assert_eq!(info.available_bytes(), 0x9fc00 + 511 * MIB);
            assert_eq!(info.regions().count(), 5);
            let mods: Vec<_> = info.modules().collect();
            assert_eq!(mods.len(), 2);
            assert_eq!(mods[0].cmdline, "selftest");
            assert_eq!(mods[1].range, PhysRange::new(6 * MIB, 6 * MIB + 100));
            assert_eq!(info.rejected().count(), 0);
            let mut reserved = [PhysRange::new(0, 0); 8];
            let n = info.reserved(IMAGE, &mut reserved);
            assert_eq!(n, 4);
            assert_eq!(reserved[0], IMAGE);
        });
    }

    #[test]
    fn bad_modules_are_rejected_with_reasons() {
        let b = Builder::new()
            .mmap(standard_map())
            .add_module(ModuleTag::new((2 * MIB + 4096) as u32, (2 * MIB + 8192) as u32, "on-image"))
            .add_module(ModuleTag::new(8 * MIB as u32, 9 * MIB as u32, "good"))
            .add_module(ModuleTag::new((8 * MIB + 10) as u32, (8 * MIB + 20) as u32, "on-good"))
            .add_module(ModuleTag::new(0xfffc0000, 0xfffd0000, "in-rom"))
            .add_module(ModuleTag::new(0x9f000, 0xa1000, "straddles-hole"));
        with_mbi(b, |r| {
            let info = r.unwrap();
            let good: Vec<_> = info.modules().map(|m| m.cmdline).collect();
            assert_eq!(good, ["good"]);
            let problems: Vec<_> = info.rejected().map(|r| (r.index, r.problem)).collect();
            assert_eq!(
                problems,
                [
                    (0, ModuleProblem::OverlapsImage),
                    (2, ModuleProblem::OverlapsModule { other: 1 }),
                    (3, ModuleProblem::OutsideRam),
                    (4, ModuleProblem::OutsideRam),
                ]
            );
            // The builder cannot express empty or inverted modules (GRUB does pass empty
            // ones, as start=end=0); the check itself sees them.
            assert_eq!(check_module(&info, 8, 0, 0, IMAGE), Err(ModuleProblem::Empty));
            assert_eq!(check_module(&info, 9, 10 * MIB, 9 * MIB, IMAGE), Err(ModuleProblem::InvertedRange));
        });
    }

    #[test]
    fn module_spanning_adjacent_regions_is_accepted() {
        let map = MemoryMapTag::new(&[
            MemoryArea::new(MIB, 3 * MIB, MemoryAreaType::Available),
            MemoryArea::new(4 * MIB, 4 * MIB, MemoryAreaType::Available),
        ]);
        let b = Builder::new().mmap(map).add_module(ModuleTag::new((3 * MIB + 5) as u32, (5 * MIB) as u32, "x"));
        with_mbi(b, |r| assert_eq!(r.unwrap().modules().count(), 1));
    }

    #[test]
    fn overflowing_and_empty_regions_are_dropped() {
        let map = MemoryMapTag::new(&[
            MemoryArea::new(MIB, 8 * MIB, MemoryAreaType::Available),
            MemoryArea::new(u64::MAX - 10, 100, MemoryAreaType::Available),
            MemoryArea::new(64 * MIB, 0, MemoryAreaType::Available),
        ]);
        with_mbi(Builder::new().mmap(map), |r| {
            let info = r.unwrap();
            assert_eq!(info.dropped_regions, 2);
            assert_eq!(info.available_bytes(), 8 * MIB);
        });
    }

    #[test]
    fn test_hook_moves_module_onto_image() {
        let b = Builder::new().mmap(standard_map()).add_module(ModuleTag::new(8 * MIB as u32, 9 * MIB as u32, "m"));
        with_mbi(b, |r| {
            let mut info = r.unwrap();
            corrupt_first_module_for_test(&mut info, IMAGE);
            assert_eq!(info.modules().count(), 0);
            assert_eq!(info.rejected().next().unwrap().problem, ModuleProblem::OverlapsImage);
        });
    }
}
