//! Multiboot (version 1, specification 0.6.96) kernels: the header search, the load plan of
//! an ELF32/ELF64 image or of an image with the a.out-kludge address fields, and the
//! multiboot information structure (memory sizes and map, command line, boot loader name,
//! modules) the kernel finds through EBX.
//!
//! Everything here is pure and host-tested: [`plan`] turns the untrusted image and the VM's
//! parameters into a [`Plan`] (what bytes go where, every range checked to lie in RAM and
//! not to overlap another), and [`write`] copies a plan into guest memory.
//!
//! Guest-physical layout: the kernel where its headers say (never in the BIOS area
//! `0x9FC00-0xFFFFF`, which holds the ACPI tables and is reserved in the memory map); the
//! boot information (one page-aligned block: [`Mbi`], a flat GDT, the memory map, the module
//! list and the strings) and a small stack in the lowest free pages from 0x1000, else above
//! 1 MiB; modules page-aligned in the lowest free space from 1 MiB.

use alloc::vec::Vec;
use core::fmt;

use elf::{abi, endian::LittleEndian, ElfBytes};

use crate::vmm::guest_mem::{GuestMemError, GuestMemory};

/// `magic` of the multiboot header in the kernel image.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// EAX at the kernel's entry: a multiboot-compliant loader started it.
pub const BOOT_MAGIC: u32 = 0x2BAD_B002;
/// The header lies wholly in the image's first 8192 bytes, 32-bit aligned.
pub const SEARCH_LEN: usize = 8192;

/// Header `flags` (specification §3.1.2).
pub mod flags {
    /// Modules must be page (4 KiB) aligned.
    pub const PAGE_ALIGN: u32 = 1 << 0;
    /// `mem_*` fields (and the memory map) must be given.
    pub const MEMORY_INFO: u32 = 1 << 1;
    /// Video mode table wanted (not offered: the VM has no framebuffer).
    pub const VIDEO_MODE: u32 = 1 << 2;
    /// The header's address fields say where to load the image (the "a.out kludge").
    pub const AOUT_KLUDGE: u32 = 1 << 16;
    /// Bits 0-15 are requirements: a loader that does not know one must refuse the kernel.
    pub const REQUIRED_MASK: u32 = 0xFFFF;
    /// The requirements Vireo meets (video mode is tolerated, as QEMU and GRUB do).
    pub const KNOWN_REQUIRED: u32 = PAGE_ALIGN | MEMORY_INFO | VIDEO_MODE;
}

/// The multiboot header (specification §3.1.1) up to the a.out-kludge fields; the video
/// fields that may follow are not read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub magic: u32,
    pub flags: u32,
    pub checksum: u32,
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}
const _: () = assert!(core::mem::size_of::<Header>() == 32);

/// Bytes of the header that must be present: 12, or 32 with the a.out-kludge fields.
const HEADER_MIN: usize = 12;

impl Header {
    fn from_bytes(b: &[u8]) -> Self {
        let w = |i: usize| b.get(i * 4..i * 4 + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
        Self {
            magic: w(0),
            flags: w(1),
            checksum: w(2),
            header_addr: w(3),
            load_addr: w(4),
            load_end_addr: w(5),
            bss_end_addr: w(6),
            entry_addr: w(7),
        }
    }

    /// magic + flags + checksum is zero (mod 2^32).
    pub fn checksum_ok(&self) -> bool {
        self.magic.wrapping_add(self.flags).wrapping_add(self.checksum) == 0
    }
}

/// The multiboot information structure (specification §3.3) as EBX points at it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mbi {
    pub flags: u32,
    pub mem_lower: u32,
    pub mem_upper: u32,
    pub boot_device: u32,
    pub cmdline: u32,
    pub mods_count: u32,
    pub mods_addr: u32,
    pub syms: [u32; 4],
    pub mmap_length: u32,
    pub mmap_addr: u32,
    pub drives_length: u32,
    pub drives_addr: u32,
    pub config_table: u32,
    pub boot_loader_name: u32,
    pub apm_table: u32,
    pub vbe_control_info: u32,
    pub vbe_mode_info: u32,
    pub vbe_mode: u16,
    pub vbe_interface_seg: u16,
    pub vbe_interface_off: u16,
    pub vbe_interface_len: u16,
    pub framebuffer_addr: [u32; 2],
    pub framebuffer_pitch: u32,
    pub framebuffer_width: u32,
    pub framebuffer_height: u32,
    pub framebuffer_bpp: u8,
    pub framebuffer_type: u8,
    pub color_info: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<Mbi>() == 116);

/// [`Mbi::flags`] bits Vireo fills in.
pub mod info_flags {
    pub const MEMORY: u32 = 1 << 0;
    pub const CMDLINE: u32 = 1 << 2;
    pub const MODS: u32 = 1 << 3;
    pub const MMAP: u32 = 1 << 6;
    pub const BOOT_LOADER_NAME: u32 = 1 << 9;
}

impl Mbi {
    fn to_bytes(self) -> [u8; 116] {
        let mut b = [0u8; 116];
        let words = [
            self.flags,
            self.mem_lower,
            self.mem_upper,
            self.boot_device,
            self.cmdline,
            self.mods_count,
            self.mods_addr,
            self.syms[0],
            self.syms[1],
            self.syms[2],
            self.syms[3],
            self.mmap_length,
            self.mmap_addr,
            self.drives_length,
            self.drives_addr,
            self.config_table,
            self.boot_loader_name,
            self.apm_table,
            self.vbe_control_info,
            self.vbe_mode_info,
        ];
        for (i, w) in words.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        // Offsets 80-115 (VBE mode, framebuffer): Vireo sets no flag for them; zero.
        b
    }
}

/// One memory map entry as the kernel reads it: `size` (20, not counting itself), then the
/// packed base, length and type.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapEntry {
    pub size: u32,
    pub base: u64,
    pub len: u64,
    pub kind: u32,
}
const _: () = assert!(core::mem::size_of::<MmapEntry>() == 24);

/// Memory map types.
pub const MEMORY_AVAILABLE: u32 = 1;
pub const MEMORY_RESERVED: u32 = 2;

impl MmapEntry {
    fn to_bytes(self) -> [u8; 24] {
        let mut b = [0u8; 24];
        let (size, base, len, kind) = (self.size, self.base, self.len, self.kind);
        b[0..4].copy_from_slice(&size.to_le_bytes());
        b[4..12].copy_from_slice(&base.to_le_bytes());
        b[12..20].copy_from_slice(&len.to_le_bytes());
        b[20..24].copy_from_slice(&kind.to_le_bytes());
        b
    }
}

/// One module list entry (`mod_end` is the address after the module's last byte).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModEntry {
    pub mod_start: u32,
    pub mod_end: u32,
    pub cmdline: u32,
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<ModEntry>() == 16);

/// Where the lower memory ends (the extended BIOS data area and the BIOS follow).
pub const LOWER_END: u64 = 0x9_FC00;
/// The BIOS area up to 1 MiB: no kernel byte may go there (the VM's ACPI tables are there).
pub const BIOS_AREA: (u64, u64) = (LOWER_END, 0x10_0000);
/// The boot loader name the kernel sees.
pub const LOADER_NAME: &str = "Vireo";
/// Size of the stack Vireo gives the kernel (ESP at its top; the specification leaves ESP
/// undefined, a kernel must set up its own).
const STACK: u64 = 0x1000;
/// Where the boot information block starts when there is room below the BIOS area.
const LOW_START: u64 = 0x1000;
const PAGE: u64 = 0x1000;
/// Offset of the GDT in the boot information block, and its descriptors: null, null, flat
/// 32-bit code at 0x10, flat data at 0x18, a 32-bit TSS at 0x20 (what TR's hidden part says).
pub const GDT_OFFSET: u64 = 128;
pub const GDT: [u64; 5] = [0, 0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF, 0x0000_8B00_0000_0067];
const MMAP_OFFSET: u64 = GDT_OFFSET + 48;
/// Most loadable segments of an ELF kernel.
pub const MAX_SEGMENTS: usize = 32;

/// A part of the guest-physical layout, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Segment(usize),
    /// The a.out-kludge image (its file part and BSS).
    Image,
    Module(usize),
    BootInfo,
    BiosArea,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Segment(i) => write!(f, "ELF segment {i}"),
            Part::Image => f.write_str("the a.out-kludge image"),
            Part::Module(i) => write!(f, "module {i}"),
            Part::BootInfo => f.write_str("the boot information"),
            Part::BiosArea => write!(f, "the BIOS area {:#x}-{:#x}", BIOS_AREA.0, BIOS_AREA.1 - 1),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mb1Error {
    /// Magic found at `offset`, but no header there has a valid checksum.
    BadChecksum {
        offset: usize,
    },
    /// The header at `offset` does not lie wholly in the image's first 8192 bytes.
    HeaderTruncated {
        offset: usize,
    },
    /// Required feature bits (0-15) Vireo does not know.
    UnsupportedFlags {
        flags: u32,
    },
    /// Without the a.out-kludge fields the image must be an ELF file.
    NotElf,
    /// The ELF headers are malformed or not for x86.
    Elf(&'static str),
    /// An ELF segment's file range lies outside the image, or memsz < filesz.
    BadSegment {
        index: usize,
    },
    TooManySegments,
    /// The a.out-kludge addresses contradict each other or the file.
    BadAddresses(&'static str),
    /// `part` at `start-end` does not lie in the VM's RAM of `ram` bytes.
    OutsideRam {
        part: Part,
        start: u64,
        end: u64,
        ram: u64,
    },
    /// Two parts of the layout overlap.
    Overlap {
        a: Part,
        a_start: u64,
        a_end: u64,
        b: Part,
    },
    /// The entry point is not in RAM (or not a 32-bit address).
    BadEntry {
        entry: u64,
    },
    /// No free, RAM-backed room for `part` of `len` bytes.
    NoRoom {
        part: Part,
        len: u64,
    },
}

impl fmt::Display for Mb1Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mb1Error::BadChecksum { offset } => {
                write!(f, "multiboot header at offset {offset:#x} has a bad checksum (magic + flags + checksum != 0)")
            }
            Mb1Error::HeaderTruncated { offset } => {
                write!(f, "multiboot header at offset {offset:#x} does not lie wholly in the first 8192 bytes")
            }
            Mb1Error::UnsupportedFlags { flags } => write!(
                f,
                "multiboot header requires features Vireo does not offer (flags {flags:#x}, unknown required bits {:#x})",
                flags & flags::REQUIRED_MASK & !flags::KNOWN_REQUIRED
            ),
            Mb1Error::NotElf => f.write_str("multiboot kernel is not an ELF file and its header has no address fields (flag 16)"),
            Mb1Error::Elf(why) => write!(f, "multiboot kernel's ELF headers: {why}"),
            Mb1Error::BadSegment { index } => write!(f, "multiboot kernel's ELF segment {index} is malformed"),
            Mb1Error::TooManySegments => write!(f, "multiboot kernel has more than {MAX_SEGMENTS} loadable segments"),
            Mb1Error::BadAddresses(why) => write!(f, "multiboot header address fields: {why}"),
            Mb1Error::OutsideRam { part, start, end, ram } => write!(
                f,
                "{part} at {start:#x}-{:#x} lies outside the VM's RAM (0-{:#x})",
                end.saturating_sub(1),
                ram.saturating_sub(1)
            ),
            Mb1Error::Overlap { a, a_start, a_end, b } => {
                write!(f, "{a} at {a_start:#x}-{:#x} overlaps {b}", a_end.saturating_sub(1))
            }
            Mb1Error::BadEntry { entry } => write!(f, "multiboot entry point {entry:#x} is not in the VM's RAM"),
            Mb1Error::NoRoom { part, len } => write!(f, "no room in the VM's RAM for {part} ({len} bytes)"),
        }
    }
}

/// Finds the multiboot header: the first 32-bit aligned magic in the first 8192 bytes whose
/// checksum holds. `Ok(None)`: no magic at all (not a multiboot kernel); a magic with a bad
/// checksum and no good header is an error.
pub fn find_header(image: &[u8]) -> Result<Option<(usize, Header)>, Mb1Error> {
    let window = &image[..image.len().min(SEARCH_LEN)];
    let mut bad = None;
    let mut off = 0;
    while off + 4 <= window.len() {
        if window[off..off + 4] == HEADER_MAGIC.to_le_bytes() {
            if off + HEADER_MIN > window.len() {
                return Err(Mb1Error::HeaderTruncated { offset: off });
            }
            let h = Header::from_bytes(&window[off..]);
            if h.checksum_ok() {
                if h.flags & flags::AOUT_KLUDGE != 0 && off + 32 > window.len() {
                    return Err(Mb1Error::HeaderTruncated { offset: off });
                }
                return Ok(Some((off, h)));
            }
            bad.get_or_insert(off);
        }
        off += 4;
    }
    match bad {
        Some(offset) => Err(Mb1Error::BadChecksum { offset }),
        None => Ok(None),
    }
}

/// Whether `image` carries a multiboot header magic where a loader looks for it.
pub fn has_magic(image: &[u8]) -> bool {
    image[..image.len().min(SEARCH_LEN)].chunks_exact(4).any(|w| w == HEADER_MAGIC.to_le_bytes())
}

/// A piece of the kernel: `bytes` copied to `gpa`, then zeros up to `mem_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load<'a> {
    pub part: Part,
    pub gpa: u64,
    pub bytes: &'a [u8],
    pub mem_len: u64,
}

impl Load<'_> {
    fn end(&self) -> u64 {
        self.gpa.saturating_add(self.mem_len)
    }
}

/// A module for the kernel: a `<name>:module` line's file and the rest of its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootModule<'a> {
    pub bytes: &'a [u8],
    pub cmdline: &'a str,
}

/// Everything Vireo writes into the VM for a multiboot kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan<'a> {
    pub header_offset: usize,
    pub header: Header,
    pub kernel: Vec<Load<'a>>,
    /// (guest-physical address, contents) of each module.
    pub modules: Vec<(u64, &'a [u8])>,
    /// The boot information block and where it goes (EBX = its address: the [`Mbi`] is first).
    pub info_gpa: u64,
    pub info: Vec<u8>,
    /// The GDT inside the block: (base, limit).
    pub gdt: (u64, u16),
    /// ESP at entry (top of a small stack Vireo reserves).
    pub stack_top: u64,
    pub entry: u32,
}

/// The kernel's pieces from its header (a.out kludge) or its ELF program headers.
fn kernel_loads<'a>(image: &'a [u8], off: usize, h: &Header) -> Result<(Vec<Load<'a>>, u64), Mb1Error> {
    if h.flags & flags::AOUT_KLUDGE != 0 {
        let (header_addr, load_addr) = (h.header_addr as u64, h.load_addr as u64);
        if load_addr > header_addr {
            return Err(Mb1Error::BadAddresses("load_addr is above header_addr"));
        }
        let back = header_addr - load_addr;
        let file_start = (off as u64)
            .checked_sub(back)
            .ok_or(Mb1Error::BadAddresses("header_addr - load_addr reaches before the start of the file"))?
            as usize;
        let load_end = match h.load_end_addr as u64 {
            0 => load_addr + (image.len() - file_start) as u64,
            e if e <= load_addr => return Err(Mb1Error::BadAddresses("load_end_addr is not above load_addr")),
            e => e,
        };
        let file_len = load_end - load_addr;
        if file_start as u64 + file_len > image.len() as u64 {
            return Err(Mb1Error::BadAddresses("load_end_addr reaches beyond the end of the file"));
        }
        let mem_end = match h.bss_end_addr as u64 {
            0 => load_end,
            e if e < load_end => return Err(Mb1Error::BadAddresses("bss_end_addr is below load_end_addr")),
            e => e,
        };
        let bytes = &image[file_start..file_start + file_len as usize];
        return Ok((
            alloc::vec![Load { part: Part::Image, gpa: load_addr, bytes, mem_len: mem_end - load_addr }],
            h.entry_addr as u64,
        ));
    }
    if !image.starts_with(b"\x7fELF") {
        return Err(Mb1Error::NotElf);
    }
    let file = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(|_| Mb1Error::Elf("not a valid ELF file"))?;
    let hdr = &file.ehdr;
    let ok_machine = match hdr.class {
        elf::file::Class::ELF32 => hdr.e_machine == abi::EM_386,
        elf::file::Class::ELF64 => hdr.e_machine == abi::EM_X86_64,
    };
    if !ok_machine {
        return Err(Mb1Error::Elf("not an x86 (EM_386 or EM_X86_64) image"));
    }
    if hdr.e_type != abi::ET_EXEC {
        return Err(Mb1Error::Elf("not an executable (ET_EXEC)"));
    }
    let segments = file.segments().ok_or(Mb1Error::Elf("no program headers"))?;
    let mut loads = Vec::new();
    let mut entry = hdr.e_entry;
    for (index, ph) in segments.iter().enumerate() {
        if ph.p_type != abi::PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        if loads.len() == MAX_SEGMENTS {
            return Err(Mb1Error::TooManySegments);
        }
        let file_end = ph.p_offset.checked_add(ph.p_filesz).ok_or(Mb1Error::BadSegment { index })?;
        if file_end > image.len() as u64 || ph.p_memsz < ph.p_filesz {
            return Err(Mb1Error::BadSegment { index });
        }
        // A kernel linked at virtual addresses other than its load addresses: the entry is
        // translated as GRUB and QEMU do (from the segment holding it).
        if ph.p_vaddr != ph.p_paddr && (ph.p_vaddr..ph.p_vaddr.saturating_add(ph.p_memsz)).contains(&hdr.e_entry) {
            entry = (hdr.e_entry - ph.p_vaddr).wrapping_add(ph.p_paddr);
        }
        loads.push(Load {
            part: Part::Segment(index),
            gpa: ph.p_paddr,
            bytes: &image[ph.p_offset as usize..file_end as usize],
            mem_len: ph.p_memsz,
        });
    }
    if loads.is_empty() {
        return Err(Mb1Error::Elf("no loadable segment"));
    }
    Ok((loads, entry))
}

/// The lowest `align`-aligned `len` bytes in `[from, to)` that overlap none of `taken`.
fn first_fit(taken: &[(u64, u64)], from: u64, to: u64, len: u64, align: u64) -> Option<u64> {
    let mut at = from.next_multiple_of(align);
    loop {
        let end = at.checked_add(len)?;
        if end > to {
            return None;
        }
        match taken.iter().filter(|(s, e)| *s < end && at < *e).map(|(_, e)| *e).max() {
            Some(e) => at = e.next_multiple_of(align),
            None => return Some(at),
        }
    }
}

/// The memory map of a VM with `ram` bytes (at least 1 MiB): lower memory, the BIOS area,
/// the rest of RAM.
pub fn memory_map(ram: u64) -> [MmapEntry; 3] {
    let e = |base: u64, end: u64, kind| MmapEntry { size: 20, base, len: end - base, kind };
    [
        e(0, LOWER_END, MEMORY_AVAILABLE),
        e(BIOS_AREA.0, BIOS_AREA.1, MEMORY_RESERVED),
        e(BIOS_AREA.1, ram, MEMORY_AVAILABLE),
    ]
}

/// Plans loading `image` into a VM of `ram` bytes with command line `cmdline` and
/// `modules`. `Ok(None)`: the image has no multiboot header magic.
pub fn plan<'a>(
    image: &'a [u8],
    ram: u64,
    cmdline: &str,
    modules: &[BootModule<'a>],
) -> Result<Option<Plan<'a>>, Mb1Error> {
    let Some((header_offset, header)) = find_header(image)? else { return Ok(None) };
    if header.flags & flags::REQUIRED_MASK & !flags::KNOWN_REQUIRED != 0 {
        return Err(Mb1Error::UnsupportedFlags { flags: header.flags });
    }
    let (kernel, entry) = kernel_loads(image, header_offset, &header)?;
    // Every piece in RAM, none in the BIOS area, no two overlapping.
    let mut taken: Vec<(u64, u64)> = alloc::vec![BIOS_AREA];
    let mut parts: Vec<Part> = alloc::vec![Part::BiosArea];
    for l in &kernel {
        let end = l.gpa.checked_add(l.mem_len).filter(|e| *e <= ram);
        let Some(end) = end else {
            return Err(Mb1Error::OutsideRam { part: l.part, start: l.gpa, end: l.end(), ram });
        };
        if let Some(i) = taken.iter().position(|(s, e)| *s < end && l.gpa < *e) {
            return Err(Mb1Error::Overlap { a: l.part, a_start: l.gpa, a_end: end, b: parts[i] });
        }
        taken.push((l.gpa, end));
        parts.push(l.part);
    }
    if entry >= ram.min(1 << 32) {
        return Err(Mb1Error::BadEntry { entry });
    }
    // Modules: page-aligned (the header may ask for it; Vireo always does), from 1 MiB.
    let mut placed = Vec::with_capacity(modules.len());
    for (i, m) in modules.iter().enumerate() {
        let len = (m.bytes.len() as u64).max(1);
        let at = first_fit(&taken, BIOS_AREA.1, ram.min(1 << 32), len, PAGE)
            .ok_or(Mb1Error::NoRoom { part: Part::Module(i), len })?;
        taken.push((at, at + len));
        placed.push((at, m.bytes));
    }
    // The boot information block: MBI, GDT, memory map, module list, strings.
    let map = memory_map(ram);
    let mods_offset = MMAP_OFFSET + (map.len() * 24) as u64;
    let strings_offset = mods_offset + (modules.len() * 16) as u64;
    let strings_len =
        cmdline.len() + 1 + LOADER_NAME.len() + 1 + modules.iter().map(|m| m.cmdline.len() + 1).sum::<usize>();
    let info_len = strings_offset + strings_len as u64;
    let want = info_len.next_multiple_of(PAGE) + STACK;
    let low = first_fit(&taken, LOW_START, BIOS_AREA.0, want, PAGE);
    let at = low
        .or_else(|| first_fit(&taken, BIOS_AREA.1, ram.min(1 << 32), want, PAGE))
        .ok_or(Mb1Error::NoRoom { part: Part::BootInfo, len: want })?;
    // The stack first, the block above it: ESP starts just below the MBI.
    let stack_top = at + STACK;
    let info_gpa = stack_top;
    let mut info = alloc::vec![0u8; info_len as usize];
    let mut strings = strings_offset as usize;
    let mut put_str = |info: &mut Vec<u8>, s: &str| -> u32 {
        let addr = info_gpa + strings as u64;
        info[strings..strings + s.len()].copy_from_slice(s.as_bytes());
        strings += s.len() + 1;
        addr as u32
    };
    let cmdline_addr = put_str(&mut info, cmdline);
    let loader_addr = put_str(&mut info, LOADER_NAME);
    for (i, (m, (gpa, bytes))) in modules.iter().zip(&placed).enumerate() {
        let c = put_str(&mut info, m.cmdline);
        let e = ModEntry { mod_start: *gpa as u32, mod_end: (*gpa + bytes.len() as u64) as u32, cmdline: c, pad: 0 };
        let o = mods_offset as usize + i * 16;
        for (k, w) in [e.mod_start, e.mod_end, e.cmdline, e.pad].iter().enumerate() {
            info[o + k * 4..o + k * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
    }
    for (i, e) in map.iter().enumerate() {
        let o = MMAP_OFFSET as usize + i * 24;
        info[o..o + 24].copy_from_slice(&e.to_bytes());
    }
    for (i, d) in GDT.iter().enumerate() {
        let o = GDT_OFFSET as usize + i * 8;
        info[o..o + 8].copy_from_slice(&d.to_le_bytes());
    }
    let mut mbi = Mbi {
        flags: info_flags::MEMORY | info_flags::CMDLINE | info_flags::MMAP | info_flags::BOOT_LOADER_NAME,
        mem_lower: (LOWER_END / 1024) as u32,
        mem_upper: ((ram.min(1 << 32) - BIOS_AREA.1) / 1024) as u32,
        cmdline: cmdline_addr,
        mmap_length: (map.len() * 24) as u32,
        mmap_addr: (info_gpa + MMAP_OFFSET) as u32,
        boot_loader_name: loader_addr,
        ..Mbi::default()
    };
    if !modules.is_empty() {
        mbi.flags |= info_flags::MODS;
        mbi.mods_count = modules.len() as u32;
        mbi.mods_addr = (info_gpa + mods_offset) as u32;
    }
    info[..116].copy_from_slice(&mbi.to_bytes());
    Ok(Some(Plan {
        header_offset,
        header,
        kernel,
        modules: placed,
        info_gpa,
        info,
        gdt: (info_gpa + GDT_OFFSET, (GDT.len() * 8 - 1) as u16),
        stack_top,
        entry: entry as u32,
    }))
}

/// Copies `plan` into the VM's memory (every range was checked against its RAM size).
pub fn write(plan: &Plan<'_>, mem: &GuestMemory) -> Result<(), GuestMemError> {
    for l in &plan.kernel {
        mem.write(l.gpa, l.bytes)?;
        mem.zero(l.gpa + l.bytes.len() as u64, l.mem_len - l.bytes.len() as u64)?;
    }
    for (gpa, bytes) in &plan.modules {
        mem.write(*gpa, bytes)?;
    }
    mem.write(plan.info_gpa, &plan.info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::FrameAllocator;

    const MIB: u64 = 1 << 20;

    fn header(flags: u32, addrs: [u32; 5]) -> Vec<u8> {
        let mut h = Vec::new();
        for w in [HEADER_MAGIC, flags, 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags))].iter().chain(&addrs) {
            h.extend_from_slice(&w.to_le_bytes());
        }
        h
    }

    /// A flat binary with an a.out-kludge header at `off`, loaded at `load`.
    fn aout(off: usize, load: u32, len: usize, bss: u32, entry: u32) -> Vec<u8> {
        let mut img = alloc::vec![0x90u8; len];
        let h = header(flags::AOUT_KLUDGE | flags::MEMORY_INFO, [load + off as u32, load, 0, bss, entry]);
        img[off..off + h.len()].copy_from_slice(&h);
        img
    }

    /// A minimal ELF32 i386 executable with one PT_LOAD per (paddr, filesz, memsz), and a
    /// multiboot header (no address fields) at the start of the first segment's data.
    fn elf32(segs: &[(u32, u32, u32)], entry: u32, vaddr_delta: u32) -> Vec<u8> {
        let phoff = 52u32;
        let data_off = 0x1000u32;
        let mut img = alloc::vec![0u8; data_off as usize];
        img[..4].copy_from_slice(b"\x7fELF");
        img[4] = 1; // ELFCLASS32
        img[5] = 1; // little-endian
        img[6] = 1;
        let put16 = |img: &mut Vec<u8>, o: usize, v: u16| img[o..o + 2].copy_from_slice(&v.to_le_bytes());
        let put32 = |img: &mut Vec<u8>, o: usize, v: u32| img[o..o + 4].copy_from_slice(&v.to_le_bytes());
        put16(&mut img, 16, 2); // ET_EXEC
        put16(&mut img, 18, 3); // EM_386
        put32(&mut img, 20, 1);
        put32(&mut img, 24, entry);
        put32(&mut img, 28, phoff);
        put16(&mut img, 40, 52);
        put16(&mut img, 42, 32);
        put16(&mut img, 44, segs.len() as u16);
        let mut file_off = data_off;
        for (i, (paddr, filesz, memsz)) in segs.iter().enumerate() {
            let o = (phoff + i as u32 * 32) as usize;
            put32(&mut img, o, 1); // PT_LOAD
            put32(&mut img, o + 4, file_off);
            put32(&mut img, o + 8, paddr + vaddr_delta);
            put32(&mut img, o + 12, *paddr);
            put32(&mut img, o + 16, *filesz);
            put32(&mut img, o + 20, *memsz);
            put32(&mut img, o + 24, 7);
            file_off += filesz;
        }
        img.resize(file_off as usize, 0xCC);
        let h = header(flags::PAGE_ALIGN | flags::MEMORY_INFO, [0; 5]);
        img[data_off as usize..data_off as usize + 12].copy_from_slice(&h[..12]);
        img
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    #[test]
    fn header_search() {
        assert_eq!(find_header(b"no header here"), Ok(None));
        assert!(!has_magic(&[0u8; 100]));
        let img = aout(0x40, 0x10_0000, 0x2000, 0, 0x10_0000);
        let (off, h) = find_header(&img).unwrap().unwrap();
        assert_eq!((off, h.load_addr, h.flags & flags::AOUT_KLUDGE), (0x40, 0x10_0000, flags::AOUT_KLUDGE));
        // Only 32-bit aligned magics count.
        let mut odd = alloc::vec![0u8; 64];
        odd[2..14].copy_from_slice(&header(0, [0; 5])[..12]);
        assert_eq!(find_header(&odd), Ok(None));
        // Beyond the first 8 KiB: not found.
        let mut far = alloc::vec![0u8; SEARCH_LEN + 64];
        far[SEARCH_LEN..SEARCH_LEN + 12].copy_from_slice(&header(0, [0; 5])[..12]);
        assert_eq!(find_header(&far), Ok(None));
        // A bad checksum is refused by its offset, even when a good header follows a bad one
        // only the good one counts.
        let mut bad = header(0, [0; 5]);
        bad[8] ^= 1;
        assert_eq!(find_header(&bad), Err(Mb1Error::BadChecksum { offset: 0 }));
        assert!(Mb1Error::BadChecksum { offset: 0 }.to_string().contains("bad checksum"));
        let mut both = bad.clone();
        both.extend_from_slice(&header(0, [0; 5]));
        assert_eq!(find_header(&both).unwrap().unwrap().0, 32);
        // The a.out fields must fit in the window.
        let mut cut = alloc::vec![0u8; SEARCH_LEN];
        cut[SEARCH_LEN - 16..].copy_from_slice(&header(flags::AOUT_KLUDGE, [0; 5])[..16]);
        assert_eq!(find_header(&cut), Err(Mb1Error::HeaderTruncated { offset: SEARCH_LEN - 16 }));
    }

    #[test]
    fn aout_kludge_plan() {
        let img = aout(0x40, 0x40_0000, 0x3000, 0x50_0000, 0x40_0080);
        let mods = [BootModule { bytes: b"module one", cmdline: "m1 arg" }];
        let p = plan(&img, 64 * MIB, "k a=b", &mods).unwrap().unwrap();
        assert_eq!(p.entry, 0x40_0080);
        assert_eq!(p.kernel.len(), 1);
        assert_eq!((p.kernel[0].gpa, p.kernel[0].bytes.len(), p.kernel[0].mem_len), (0x40_0000, 0x3000, 0x10_0000));
        // The module goes to the lowest free page from 1 MiB.
        assert_eq!(p.modules, [(0x10_0000, &b"module one"[..])]);
        // The boot information sits low, above its stack.
        assert_eq!((p.stack_top, p.info_gpa), (0x2000, 0x2000));
        let b = &p.info;
        let flags = u32_at(b, 0);
        assert_eq!(
            flags,
            info_flags::MEMORY
                | info_flags::CMDLINE
                | info_flags::MODS
                | info_flags::MMAP
                | info_flags::BOOT_LOADER_NAME
        );
        assert_eq!((u32_at(b, 4), u32_at(b, 8)), (639, 63 * 1024));
        let s = |addr: u32| {
            let o = (addr as u64 - p.info_gpa) as usize;
            let end = b[o..].iter().position(|c| *c == 0).unwrap();
            core::str::from_utf8(&b[o..o + end]).unwrap()
        };
        assert_eq!(s(u32_at(b, 16)), "k a=b");
        assert_eq!(s(u32_at(b, 64)), "Vireo");
        assert_eq!(u32_at(b, 20), 1);
        let m = (u32_at(b, 24) as u64 - p.info_gpa) as usize;
        assert_eq!((u32_at(b, m), u32_at(b, m + 4)), (0x10_0000, 0x10_000A));
        assert_eq!(s(u32_at(b, m + 8)), "m1 arg");
        // The memory map: three entries of 24 bytes (size 20 each).
        assert_eq!(u32_at(b, 44), 72);
        let mm = (u32_at(b, 48) as u64 - p.info_gpa) as usize;
        assert_eq!(u32_at(b, mm), 20);
        assert_eq!(u32_at(b, mm + 24 * 2 + 4), 0x10_0000);
        assert_eq!(u32_at(b, mm + 24 * 2 + 12), (63 * MIB) as u32);
        assert_eq!(u32_at(b, mm + 24 * 2 + 20), MEMORY_AVAILABLE);
        assert_eq!(u32_at(b, mm + 24 + 20), MEMORY_RESERVED);
        // The GDT: flat code at 0x10, data at 0x18.
        let g = (p.gdt.0 - p.info_gpa) as usize;
        assert_eq!(&b[g + 16..g + 24], &GDT[2].to_le_bytes());
        assert_eq!(p.gdt.1, 39);
    }

    #[test]
    fn elf32_plan_and_load() {
        let img = elf32(&[(0x10_0000, 0x200, 0x1000), (0x10_1000, 0x100, 0x100)], 0xC010_0010, 0xC000_0000);
        let p = plan(&img, 2 * MIB, "", &[]).unwrap().unwrap();
        assert_eq!(p.entry, 0x10_0010, "a virtual entry is translated through its segment");
        assert_eq!(p.kernel.len(), 2);
        assert_eq!(u32_at(&p.info, 0) & info_flags::MODS, 0);
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        // Stale bytes where the BSS goes: the load zeroes them.
        mem.write(0x10_0300, &[0xAA; 16]).unwrap();
        write(&p, &mem).unwrap();
        let mut got = [0u8; 16];
        mem.read(0x10_0000, &mut got[..12]).unwrap();
        assert_eq!(u32_at(&got, 0), HEADER_MAGIC);
        mem.read(0x10_0300, &mut got).unwrap();
        assert_eq!(got, [0; 16]);
        mem.read(p.info_gpa, &mut got[..4]).unwrap();
        assert_eq!(u32_at(&got, 0), u32_at(&p.info, 0));
    }

    #[test]
    fn bad_kernels_are_refused_by_name() {
        let ram = 16 * MIB;
        // Segments outside RAM, overlapping each other, or in the BIOS area.
        let e = plan(&elf32(&[(0x100_0000, 0x100, 0x100)], 0x100_0000, 0), ram, "", &[]).unwrap_err();
        assert!(matches!(e, Mb1Error::OutsideRam { part: Part::Segment(0), .. }), "{e:?}");
        assert!(e.to_string().contains("outside the VM's RAM"), "{e}");
        let e = plan(&elf32(&[(0x10_0000, 0x100, 0x2000), (0x10_1000, 0x100, 0x100)], 0x10_0000, 0), ram, "", &[])
            .unwrap_err();
        assert!(matches!(e, Mb1Error::Overlap { a: Part::Segment(1), b: Part::Segment(0), .. }), "{e:?}");
        assert_eq!(e.to_string(), "ELF segment 1 at 0x101000-0x1010ff overlaps ELF segment 0");
        let e = plan(&elf32(&[(0xF_0000, 0x100, 0x100)], 0xF_0000, 0), ram, "", &[]).unwrap_err();
        assert!(matches!(e, Mb1Error::Overlap { b: Part::BiosArea, .. }), "{e:?}");
        // Segment wrapping the address space.
        let e = plan(&aout(0, 0xFFFF_F000, 0x2000, 0, 0xFFFF_F000), ram, "", &[]).unwrap_err();
        assert!(matches!(e, Mb1Error::OutsideRam { .. }), "{e:?}");
        // Entry outside RAM.
        let e = plan(&aout(0, 0x20_0000, 0x1000, 0, 0x4000_0000), ram, "", &[]).unwrap_err();
        assert_eq!(e, Mb1Error::BadEntry { entry: 0x4000_0000 });
        // Contradicting a.out fields.
        let mut img = aout(0x40, 0x20_0000, 0x1000, 0, 0x20_0000);
        let h = header(flags::AOUT_KLUDGE, [0x20_0040, 0x20_0000, 0x20_2000, 0, 0x20_0000]);
        img[0x40..0x40 + 32].copy_from_slice(&h);
        assert!(matches!(plan(&img, ram, "", &[]), Err(Mb1Error::BadAddresses(_))));
        let h = header(flags::AOUT_KLUDGE, [0x20_0000, 0x10_0000, 0, 0, 0x20_0000]);
        img[0x40..0x40 + 32].copy_from_slice(&h);
        assert!(matches!(plan(&img, ram, "", &[]), Err(Mb1Error::BadAddresses(_))));
        // Unknown required flags; no address fields and not ELF.
        let e = plan(&header(1 << 5, [0; 5]), ram, "", &[]).unwrap_err();
        assert_eq!(e, Mb1Error::UnsupportedFlags { flags: 1 << 5 });
        assert_eq!(plan(&header(0, [0; 5]), ram, "", &[]).unwrap_err(), Mb1Error::NotElf);
        // A module that does not fit.
        let big = alloc::vec![0u8; 15 * MIB as usize];
        let mods = [BootModule { bytes: &big, cmdline: "" }];
        let e = plan(&aout(0, 0x20_0000, 0x1000, 0, 0x20_0000), ram, "", &mods).unwrap_err();
        assert_eq!(e, Mb1Error::NoRoom { part: Part::Module(0), len: 15 * MIB });
        // Garbage never panics.
        for len in [0usize, 3, 12, 40, 100] {
            let mut g = alloc::vec![0xFFu8; len];
            if len >= 12 {
                g[..12].copy_from_slice(&header(flags::AOUT_KLUDGE, [0; 5])[..12]);
            }
            let _ = plan(&g, ram, "", &[]);
        }
    }

    /// Random headers (valid checksums, random flags and addresses) and random corruptions
    /// of a good ELF32 kernel: the plan refuses or accepts, never panics, and what it accepts
    /// lies in RAM without overlaps.
    #[test]
    fn random_images_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let ram = 16 * MIB;
        let good = elf32(&[(0x10_0000, 0x200, 0x1000), (0x20_0000, 0x100, 0x100)], 0x10_0000, 0);
        let module = [BootModule { bytes: b"m", cmdline: "c" }];
        let mut accepted = 0;
        for i in 0..20_000 {
            let img = if i % 2 == 0 {
                let flags = (next() as u32) & (flags::AOUT_KLUDGE | 0x7);
                let addrs = [0u32; 5].map(|_| match next() % 4 {
                    0 => 0,
                    1 => (next() % (32 * MIB)) as u32,
                    2 => 0x10_0000 + (next() % 0x1000) as u32,
                    _ => next() as u32,
                });
                let mut img = alloc::vec![0u8; (next() % 0x3000) as usize + 32];
                let off = ((next() as usize) % (img.len() - 31)) & !3;
                img[off..off + 32].copy_from_slice(&header(flags, addrs));
                img
            } else {
                let mut img = good.clone();
                for _ in 0..(next() % 8) {
                    let at = (next() as usize) % img.len();
                    img[at] = next() as u8;
                }
                img
            };
            if let Ok(Some(p)) = plan(&img, ram, "cmd", &module) {
                let mut ranges: Vec<(u64, u64)> = p.kernel.iter().map(|l| (l.gpa, l.end())).collect();
                ranges.extend(p.modules.iter().map(|(g, b)| (*g, g + b.len().max(1) as u64)));
                ranges.push((p.stack_top - STACK, p.info_gpa + p.info.len() as u64));
                for (k, a) in ranges.iter().enumerate() {
                    assert!(a.1 <= ram, "{a:x?}");
                    assert!(!(a.0 < BIOS_AREA.1 && BIOS_AREA.0 < a.1), "{a:x?}");
                    for b in &ranges[k + 1..] {
                        assert!(!(a.0 < b.1 && b.0 < a.1), "{a:x?} overlaps {b:x?}");
                    }
                }
                assert!((p.entry as u64) < ram);
                accepted += 1;
            }
        }
        assert!(accepted > 1000, "only {accepted} random images were loadable: the test tests little");
    }

    #[test]
    fn low_kernel_pushes_the_boot_information_up() {
        // A kernel over all of lower memory: the block goes above 1 MiB, after the kernel.
        let img = aout(0x40, 0, 0x2000, LOWER_END as u32, 0x100);
        let p = plan(&img, 8 * MIB, "x", &[]).unwrap().unwrap();
        assert_eq!(p.stack_top, 0x10_1000);
        assert_eq!(p.info_gpa, 0x10_1000);
        assert_eq!(first_fit(&[(0x1000, 0x3000)], 0x1000, 0x10000, 0x1000, 0x1000), Some(0x3000));
        assert_eq!(first_fit(&[], 0x1000, 0x1800, 0x1000, 0x1000), None);
    }
}
