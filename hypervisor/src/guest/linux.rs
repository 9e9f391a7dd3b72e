//! Loads a Linux bzImage for the 64-bit boot protocol (Documentation/x86/boot.rst,
//! "64-bit Boot Protocol"; the zero page is Documentation/x86/zero-page.rst).
//!
//! [`parse`] validates the setup header (every field of a module is untrusted input) and
//! returns a [`BzImage`] view; [`load`] copies the protected-mode code into guest RAM, fills
//! the zero page (`struct boot_params`), the command line, the initramfs and the e820 map,
//! and returns where everything went. The caller then starts the vCPU in long mode at
//! [`Loaded::entry`] with RSI = [`Loaded::boot_params`], paging on with an identity map
//! covering [`Loaded::kernel`], the zero page and the command line (boot64's 4 GiB map does),
//! CS = 0x10 and DS/ES/SS = 0x18 flat, interrupts off (boot.rst, "64-bit Boot Protocol").
//!
//! Guest-physical layout written here:
//!
//! | range                              | contents                                          |
//! |------------------------------------|---------------------------------------------------|
//! | [`BOOT_PARAMS_GPA`] 0x20000-0x20FFF | zero page                                         |
//! | [`CMDLINE_GPA`] 0x21000-0x2FFFF     | command line, NUL-terminated                      |
//! | `max(pref_address, 16 MiB)` aligned | protected-mode code; `init_size` bytes reserved   |
//! | top of RAM below `initrd_addr_max`  | initramfs, 4 KiB aligned                          |
//!
//! Vireo's own boot structures (boot64: 0x1000-0xFFFF) and whatever the caller lists in
//! [`LinuxLayout::reserved`] are left alone; the caller's ranges also go into the e820 map.

use super::le::PutLe;
use alloc::vec::Vec;
use core::fmt;

use crate::vmm::guest_mem::{GuestMemError, GuestMemory};

/// Offsets of setup header fields (boot.rst, "The Real-Mode Kernel Header"). They are the same
/// in the image and in the zero page, whose `hdr` member sits at 0x1F1 too.
pub mod hdr {
    /// Start of the setup header (and of the part copied into the zero page).
    pub const START: usize = 0x1F1;
    /// u8: size of the setup in 512-byte sectors; 0 means 4.
    pub const SETUP_SECTS: usize = 0x1F1;
    /// u32: size of the protected-mode code in 16-byte paragraphs (2.04+).
    pub const SYSSIZE: usize = 0x1F4;
    /// u8: the second byte of the 2-byte jump at 0x200; the header ends at 0x202 + this.
    pub const JUMP_OFFSET: usize = 0x201;
    /// u32: the magic "HdrS".
    pub const HEADER: usize = 0x202;
    /// u16: boot protocol version (major << 8 | minor).
    pub const VERSION: usize = 0x206;
    /// u8: boot loader identifier (write).
    pub const TYPE_OF_LOADER: usize = 0x210;
    /// u8: boot protocol option flags (modify).
    pub const LOADFLAGS: usize = 0x211;
    /// u32: 32-bit entry of the 16-bit path (modify, unused by the 64-bit entry).
    pub const CODE32_START: usize = 0x214;
    /// u32: initrd load address, low half (write).
    pub const RAMDISK_IMAGE: usize = 0x218;
    /// u32: initrd size, low half (write).
    pub const RAMDISK_SIZE: usize = 0x21C;
    /// u16: end of the real-mode heap (write; only for the 16-bit setup code).
    pub const HEAP_END_PTR: usize = 0x224;
    /// u8: extended boot loader version (write).
    pub const EXT_LOADER_VER: usize = 0x226;
    /// u8: extended boot loader type (write).
    pub const EXT_LOADER_TYPE: usize = 0x227;
    /// u32: command line address, low half (write).
    pub const CMD_LINE_PTR: usize = 0x228;
    /// u32: highest address the initrd may occupy (read).
    pub const INITRD_ADDR_MAX: usize = 0x22C;
    /// u32: physical alignment the kernel needs (read/modify).
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    /// u8: whether the protected-mode code is relocatable (read).
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    /// u16: XLF_* flags (read).
    pub const XLOADFLAGS: usize = 0x236;
    /// u32: maximum command line length without the terminating NUL (read).
    pub const CMDLINE_SIZE: usize = 0x238;
    /// u32: hardware subarchitecture (write; 0 = PC).
    pub const HARDWARE_SUBARCH: usize = 0x23C;
    /// u64: subarchitecture-specific data (write).
    pub const HARDWARE_SUBARCH_DATA: usize = 0x240;
    /// u64: physical pointer to a linked list of `struct setup_data` (write).
    pub const SETUP_DATA: usize = 0x250;
    /// u64: preferred load address (read).
    pub const PREF_ADDRESS: usize = 0x258;
    /// u32: linear memory the kernel needs from its load address until it is up (read).
    pub const INIT_SIZE: usize = 0x260;
    /// Smallest header end for protocol 2.12: `handover_offset` (0x264, u32) is the last field
    /// up to 2.14; 2.15 adds `kernel_info_offset` and ends at 0x26C.
    pub const MIN_END: usize = 0x268;
    /// Largest possible header end: `edd_mbr_sig_buffer` follows at 0x290 in the zero page.
    pub const MAX_END: usize = 0x290;

    /// `loadflags` bit 0: the protected-mode code is loaded at 0x100000 (a bzImage).
    pub const LOADED_HIGH: u8 = 1 << 0;
    /// `loadflags` bit 6: obsolete (removed from the protocol); cleared.
    pub const KEEP_SEGMENTS: u8 = 1 << 6;
    /// `loadflags` bit 7: `heap_end_ptr` is valid; cleared (there is no 16-bit setup).
    pub const CAN_USE_HEAP: u8 = 1 << 7;
    /// `xloadflags` bit 0: the kernel has the legacy 64-bit entry point at +0x200.
    pub const XLF_KERNEL_64: u16 = 1 << 0;
    /// `xloadflags` bit 1: kernel, zero page, command line and initrd may be above 4 GiB.
    pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;

    /// The magic at [`HEADER`].
    pub const MAGIC: [u8; 4] = *b"HdrS";
    /// `type_of_loader` for a loader without an assigned ID (boot.rst: 0xFF = undefined).
    pub const LOADER_UNDEFINED: u8 = 0xFF;
}

/// Offsets in the zero page outside the setup header (zero-page.rst).
pub mod zp {
    /// Size of the zero page.
    pub const SIZE: usize = 0x1000;
    /// u64: physical address of the ACPI RSDP.
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    /// u32: high half of `ramdisk_image`.
    pub const EXT_RAMDISK_IMAGE: usize = 0x0C0;
    /// u32: high half of `ramdisk_size`.
    pub const EXT_RAMDISK_SIZE: usize = 0x0C4;
    /// u32: high half of `cmd_line_ptr`.
    pub const EXT_CMD_LINE_PTR: usize = 0x0C8;
    /// u8: number of entries in [`E820_TABLE`].
    pub const E820_ENTRIES: usize = 0x1E8;
    /// u8: must be 0; a loader that copied garbage over the header region leaves it non-zero.
    pub const SENTINEL: usize = 0x1EF;
    /// `struct boot_e820_entry[E820_MAX]`: packed `{u64 addr, u64 size, u32 type}`.
    pub const E820_TABLE: usize = 0x2D0;
    /// Capacity of [`E820_TABLE`] (E820_MAX_ENTRIES_ZEROPAGE).
    pub const E820_MAX: usize = 128;
    /// Size of one packed e820 entry.
    pub const E820_ENTRY_SIZE: usize = 20;
}

/// Guest-physical address of the zero page (below 1 MiB, clear of boot64's 0x0-0xFFFF).
pub const BOOT_PARAMS_GPA: u64 = 0x20000;
/// Guest-physical address of the command line, right after the zero page.
pub const CMDLINE_GPA: u64 = BOOT_PARAMS_GPA + zp::SIZE as u64;
/// End of the command line area: at most `CMDLINE_END - CMDLINE_GPA - 1` bytes plus the NUL.
pub const CMDLINE_END: u64 = 0x30000;
/// End of the conventional RAM below 1 MiB (start of the EBDA by convention).
pub const LOW_RAM_END: u64 = 0x9F000;
/// Start of RAM above the BIOS hole.
pub const HIGH_RAM_START: u64 = 0x100000;
/// A relocatable kernel is never loaded below this (and not below its `pref_address`).
pub const MIN_KERNEL_LOAD: u64 = 0x100_0000;
/// The kernel's `init_size` region must end at or below this (boot64 identity-maps 4 GiB and
/// `code32_start` is 32 bits wide).
pub const KERNEL_LIMIT: u64 = 1 << 32;
/// The initramfs is placed at or above this.
pub const MIN_INITRD: u64 = HIGH_RAM_START;
/// Offset of the 64-bit entry point from the load address (boot.rst, "64-bit Boot Protocol").
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Oldest boot protocol accepted: 2.12 (`xloadflags`, 64-bit entry flags, `init_size` etc.).
pub const MIN_PROTOCOL: u16 = 0x020C;

const PAGE: u64 = 0x1000;

/// Why a bzImage cannot be parsed or loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxError {
    /// The image ends before the setup header does.
    TooSmall { len: usize },
    /// No "HdrS" at 0x202.
    NoHeader,
    /// Boot protocol older than [`MIN_PROTOCOL`].
    OldProtocol { version: u16 },
    /// `xloadflags` lacks XLF_KERNEL_64.
    No64BitEntry,
    /// `loadflags` lacks LOADED_HIGH: a zImage.
    NotBzImage,
    /// 0x202 + byte[0x201] is outside `[hdr::MIN_END, hdr::MAX_END]`.
    BadHeaderEnd { end: usize },
    /// The protected-mode code would start at or past the end of the file.
    SetupPastEnd { setup_sects: u8, offset: usize, len: usize },
    /// `syssize` is 0.
    EmptyPayload,
    /// The file holds fewer bytes of protected-mode code than `syssize` says.
    Truncated { expected: u64, actual: u64 },
    /// `kernel_alignment` is not a power of two.
    BadAlignment { align: u32 },
    /// `init_size` is smaller than the protected-mode code.
    InitSizeTooSmall { init_size: u32, payload: u64 },
    /// `pref_address` is unusable for this kernel.
    BadPrefAddress { pref_address: u64, why: &'static str },
    /// The layout describes more RAM than guest memory has.
    RamTooLarge { ram: u64, mem: u64 },
    /// The kernel's `init_size` region does not fit below `limit`.
    KernelDoesNotFit { start: u64, end: u64, limit: u64 },
    /// A range in [`LinuxLayout::reserved`] is empty, inverted, or overlaps another.
    BadReserved { start: u64, end: u64 },
    /// Something the loader writes overlaps a range the caller reserved.
    Collision { what: &'static str, start: u64, end: u64, reserved: (u64, u64) },
    /// The command line exceeds the kernel's `cmdline_size` or the area Vireo gives it.
    CmdlineTooLong { len: usize, max: u64 },
    /// The command line contains a NUL byte (the kernel would silently cut it there).
    CmdlineNul,
    /// No free, 4 KiB aligned range of this size lies in `[MIN_INITRD, limit)`.
    InitrdDoesNotFit { size: u64, limit: u64 },
    /// The e820 map would have more entries than the zero page holds.
    TooManyE820 { count: usize },
    /// A write to guest memory failed.
    Memory(GuestMemError),
}

impl fmt::Display for LinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinuxError::TooSmall { len } => {
                write!(
                    f,
                    "image of {len} bytes is too small for a bzImage (the setup header needs {} bytes)",
                    hdr::MIN_END
                )
            }
            LinuxError::NoHeader => f.write_str("no Linux setup header (\"HdrS\" at 0x202): not a bzImage"),
            LinuxError::OldProtocol { version } => {
                write!(f, "kernel boot protocol {}.{:02} is older than 2.12", version >> 8, version & 0xFF)
            }
            LinuxError::No64BitEntry => {
                f.write_str("no 64-bit entry point (xloadflags bit 0, XLF_KERNEL_64, is clear)")
            }
            LinuxError::NotBzImage => f.write_str("loadflags bit 0 (LOADED_HIGH) is clear: a zImage, not a bzImage"),
            LinuxError::BadHeaderEnd { end } => write!(
                f,
                "setup header ends at {end:#x} (0x202 + byte at 0x201), outside {:#x}..={:#x}",
                hdr::MIN_END,
                hdr::MAX_END
            ),
            LinuxError::SetupPastEnd { setup_sects, offset, len } => write!(
                f,
                "setup_sects {setup_sects} puts the protected-mode code at offset {offset:#x}, past the end of the \
                 {len}-byte image"
            ),
            LinuxError::EmptyPayload => f.write_str("syssize is 0: the image has no protected-mode code"),
            LinuxError::Truncated { expected, actual } => write!(
                f,
                "image is truncated: syssize says {expected} bytes of protected-mode code, the file has {actual}"
            ),
            LinuxError::BadAlignment { align } => write!(f, "kernel_alignment {align:#x} is not a power of two"),
            LinuxError::InitSizeTooSmall { init_size, payload } => {
                write!(f, "init_size {init_size:#x} is smaller than the {payload:#x}-byte protected-mode code")
            }
            LinuxError::BadPrefAddress { pref_address, why } => write!(f, "pref_address {pref_address:#x} {why}"),
            LinuxError::RamTooLarge { ram, mem } => {
                write!(f, "layout RAM size {ram:#x} exceeds the guest memory of {mem:#x} bytes")
            }
            LinuxError::KernelDoesNotFit { start, end, limit } => write!(
                f,
                "kernel needs {start:#x}-{end:#x} (its init_size from the load address) but must end below {limit:#x}"
            ),
            LinuxError::BadReserved { start, end } => {
                write!(f, "reserved range {start:#x}-{end:#x} is empty, inverted or overlaps another")
            }
            LinuxError::Collision { what, start, end, reserved: (rs, re) } => {
                write!(f, "{what} at {start:#x}-{end:#x} overlaps reserved range {rs:#x}-{re:#x}")
            }
            LinuxError::CmdlineTooLong { len, max } => {
                write!(f, "command line of {len} bytes exceeds the limit of {max} bytes")
            }
            LinuxError::CmdlineNul => f.write_str("command line contains a NUL byte"),
            LinuxError::InitrdDoesNotFit { size, limit } => {
                write!(f, "initramfs of {size} bytes does not fit in free RAM between {MIN_INITRD:#x} and {limit:#x}")
            }
            LinuxError::TooManyE820 { count } => {
                write!(f, "memory map needs {count} e820 entries; the zero page holds {}", zp::E820_MAX)
            }
            LinuxError::Memory(e) => write!(f, "guest memory: {e}"),
        }
    }
}

impl From<GuestMemError> for LinuxError {
    fn from(e: GuestMemError) -> Self {
        LinuxError::Memory(e)
    }
}

/// The setup header fields the loader reads, validated by [`parse`] (boot.rst, "The
/// Real-Mode Kernel Header" and "Details of Header Fields").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    /// Setup sectors, with 0 already replaced by 4.
    pub setup_sects: u8,
    /// Protected-mode code size in 16-byte paragraphs.
    pub syssize: u32,
    /// Boot protocol version (0x020F for Linux 6.1).
    pub version: u16,
    pub loadflags: u8,
    pub initrd_addr_max: u32,
    /// A power of two.
    pub kernel_alignment: u32,
    pub relocatable_kernel: bool,
    pub xloadflags: u16,
    /// Maximum command line length without the NUL.
    pub cmdline_size: u32,
    pub pref_address: u64,
    pub init_size: u32,
    /// 0x202 + byte[0x201]: where the header ends.
    pub header_end: usize,
}

/// A parsed, validated bzImage.
#[derive(Clone, Copy, Debug)]
pub struct BzImage<'a> {
    pub header: SetupHeader,
    /// Image bytes `[0x1F1, header_end)`, copied verbatim into the zero page.
    raw_header: &'a [u8],
    /// The protected-mode code: `syssize * 16` bytes from `(setup_sects + 1) * 512`.
    payload: &'a [u8],
}

impl<'a> BzImage<'a> {
    /// The protected-mode code (what is loaded at [`BzImage::load_address`]).
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The setup header as found in the image, `[0x1F1, header_end)`.
    pub fn raw_header(&self) -> &'a [u8] {
        self.raw_header
    }

    /// Where [`load`] puts the protected-mode code: `pref_address` for a non-relocatable kernel,
    /// else `max(pref_address, 16 MiB)` rounded up to `kernel_alignment`. The kernel's 64-bit
    /// entry decompresses to `max(align_up(load address), LOAD_PHYSICAL_ADDR = pref_address)`
    /// (arch/x86/boot/compressed/head_64.S), so this keeps the decompressed kernel inside
    /// `[load address, load address + init_size)`. `None` on overflow.
    pub fn load_address(&self) -> Option<u64> {
        let h = &self.header;
        if !h.relocatable_kernel {
            return Some(h.pref_address);
        }
        align_up(h.pref_address.max(MIN_KERNEL_LOAD), u64::from(h.kernel_alignment))
    }
}

/// Parses and validates `image` as a bzImage with a 64-bit entry point (boot.rst, "The
/// Real-Mode Kernel Header", "Loading the Rest of the Kernel", "64-bit Boot Protocol").
pub fn parse(image: &[u8]) -> Result<BzImage<'_>, LinuxError> {
    if image.len() < hdr::MIN_END {
        return Err(LinuxError::TooSmall { len: image.len() });
    }
    let too_small = LinuxError::TooSmall { len: image.len() };
    let u8_at = |off: usize| image.get(off).copied().ok_or(too_small);
    let u16_at = |off: usize| read::<2>(image, off).map(u16::from_le_bytes).ok_or(too_small);
    let u32_at = |off: usize| read::<4>(image, off).map(u32::from_le_bytes).ok_or(too_small);
    let u64_at = |off: usize| read::<8>(image, off).map(u64::from_le_bytes).ok_or(too_small);

    if read::<4>(image, hdr::HEADER) != Some(hdr::MAGIC) {
        return Err(LinuxError::NoHeader);
    }
    let version = u16_at(hdr::VERSION)?;
    if version < MIN_PROTOCOL {
        return Err(LinuxError::OldProtocol { version });
    }
    let xloadflags = u16_at(hdr::XLOADFLAGS)?;
    if xloadflags & hdr::XLF_KERNEL_64 == 0 {
        return Err(LinuxError::No64BitEntry);
    }
    let loadflags = u8_at(hdr::LOADFLAGS)?;
    if loadflags & hdr::LOADED_HIGH == 0 {
        return Err(LinuxError::NotBzImage);
    }
    let header_end = hdr::HEADER + usize::from(u8_at(hdr::JUMP_OFFSET)?);
    if !(hdr::MIN_END..=hdr::MAX_END).contains(&header_end) {
        return Err(LinuxError::BadHeaderEnd { end: header_end });
    }
    let raw_header = image.get(hdr::START..header_end).ok_or(too_small)?;

    let setup_sects = match u8_at(hdr::SETUP_SECTS)? {
        0 => 4,
        n => n,
    };
    let offset = (usize::from(setup_sects) + 1) * 512;
    if offset >= image.len() {
        return Err(LinuxError::SetupPastEnd { setup_sects, offset, len: image.len() });
    }
    let syssize = u32_at(hdr::SYSSIZE)?;
    if syssize == 0 {
        return Err(LinuxError::EmptyPayload);
    }
    let expected = u64::from(syssize) * 16;
    let available = (image.len() - offset) as u64;
    if expected > available {
        return Err(LinuxError::Truncated { expected, actual: available });
    }
    // `expected <= available <= usize::MAX`, so the cast is lossless.
    let payload = image.get(offset..offset + expected as usize).ok_or(too_small)?;

    let kernel_alignment = u32_at(hdr::KERNEL_ALIGNMENT)?;
    if !kernel_alignment.is_power_of_two() {
        return Err(LinuxError::BadAlignment { align: kernel_alignment });
    }
    let init_size = u32_at(hdr::INIT_SIZE)?;
    if u64::from(init_size) < expected {
        return Err(LinuxError::InitSizeTooSmall { init_size, payload: expected });
    }
    let pref_address = u64_at(hdr::PREF_ADDRESS)?;
    let relocatable_kernel = u8_at(hdr::RELOCATABLE_KERNEL)? != 0;
    let bad_pref = |why| Err(LinuxError::BadPrefAddress { pref_address, why });
    if pref_address.checked_add(u64::from(init_size)).is_none() {
        return bad_pref("plus init_size overflows");
    }
    if !relocatable_kernel {
        // A non-relocatable kernel runs only at pref_address (LOAD_PHYSICAL_ADDR).
        if pref_address < HIGH_RAM_START {
            return bad_pref("of a non-relocatable kernel is below 1 MiB");
        }
        if !pref_address.is_multiple_of(u64::from(kernel_alignment)) {
            return bad_pref("of a non-relocatable kernel is not a multiple of kernel_alignment");
        }
    }

    let header = SetupHeader {
        setup_sects,
        syssize,
        version,
        loadflags,
        initrd_addr_max: u32_at(hdr::INITRD_ADDR_MAX)?,
        kernel_alignment,
        relocatable_kernel,
        xloadflags,
        cmdline_size: u32_at(hdr::CMDLINE_SIZE)?,
        pref_address,
        init_size,
        header_end,
    };
    Ok(BzImage { header, raw_header, payload })
}

/// e820 range types (zero-page.rst `e820_table`; Linux arch/x86/include/asm/e820/types.h, the
/// ACPI specification's address range types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
    /// ACPI tables; reclaimable once parsed.
    Acpi = 3,
    /// ACPI non-volatile storage.
    Nvs = 4,
}

/// One `struct boot_e820_entry`: `[addr, addr + size)` of type `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

impl E820Entry {
    /// End of the range (exclusive).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }

    /// The packed 20-byte form stored in the zero page.
    pub fn to_bytes(&self) -> [u8; zp::E820_ENTRY_SIZE] {
        let mut b = [0; zp::E820_ENTRY_SIZE];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..20].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b
    }
}

/// A guest-physical range `[start, end)` that Vireo uses itself (page tables, GDT, ACPI
/// tables...). The loader writes nothing there and lists it in the e820 map as `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservedRange {
    pub start: u64,
    pub end: u64,
    pub kind: E820Type,
}

impl ReservedRange {
    /// A range the guest must leave alone (e820 type 2).
    pub const fn reserved(start: u64, end: u64) -> Self {
        Self { start, end, kind: E820Type::Reserved }
    }

    /// ACPI tables (e820 type 3).
    pub const fn acpi(start: u64, end: u64) -> Self {
        Self { start, end, kind: E820Type::Acpi }
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

/// What the caller decides about the guest.
#[derive(Clone, Copy, Debug)]
pub struct LinuxLayout<'a> {
    /// Guest RAM in bytes, `[0, ram)`; at most the guest memory's size.
    pub ram: u64,
    /// The kernel command line (without NUL).
    pub cmdline: &'a str,
    /// The initramfs; an empty one is treated as none.
    pub initrd: Option<&'a [u8]>,
    /// Guest-physical address of the ACPI RSDP, stored in `acpi_rsdp_addr`.
    pub rsdp: Option<u64>,
    /// Ranges Vireo uses itself; must not overlap each other.
    pub reserved: &'a [ReservedRange],
}

/// Where [`load`] put things.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The 64-bit entry point: load address + 0x200.
    pub entry: u64,
    /// The zero page; pass in RSI.
    pub boot_params: u64,
    /// The command line (NUL-terminated).
    pub cmdline: u64,
    /// `[load address, load address + init_size)`.
    pub kernel: (u64, u64),
    /// `[start, end)` of the initramfs, if any.
    pub initrd: Option<(u64, u64)>,
    /// The map written to the zero page: sorted, non-overlapping, adjacent equal types merged.
    pub e820: Vec<E820Entry>,
}

/// The guest-memory operations [`load`] needs. Implemented by [`GuestMemory`]; the unit tests
/// use a plain buffer.
pub trait GuestWrite {
    /// Bytes of guest-physical memory, `[0, size)`.
    fn size(&self) -> u64;
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestMemError>;
    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), GuestMemError>;
}

impl GuestWrite for GuestMemory {
    fn size(&self) -> u64 {
        GuestMemory::size(self)
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        GuestMemory::write(self, gpa, data)
    }

    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), GuestMemError> {
        GuestMemory::zero(self, gpa, len)
    }
}

/// The zero page under construction (zero-page.rst), written to the guest in one piece.
struct ZeroPage([u8; zp::SIZE]);

impl PutLe for ZeroPage {
    fn put(&mut self, off: usize, bytes: &[u8]) {
        if let Some(dst) = self.0.get_mut(off..off + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
}

impl ZeroPage {
    fn get_u8(&self, off: usize) -> u8 {
        self.0.get(off).copied().unwrap_or(0)
    }

    /// Stores a 64-bit address or size split into a low half at `lo` and a high half at `hi`.
    fn put_split(&mut self, lo: usize, hi: usize, v: u64) {
        self.put_u32(lo, v as u32);
        self.put_u32(hi, (v >> 32) as u32);
    }
}

/// Loads `image` into `mem` as `layout` describes (boot.rst, "64-bit Boot Protocol" and
/// "Details of Header Fields" for what a loader writes; zero-page.rst for the rest).
pub fn load<M: GuestWrite + ?Sized>(
    image: &BzImage<'_>,
    mem: &mut M,
    layout: &LinuxLayout<'_>,
) -> Result<Loaded, LinuxError> {
    let h = &image.header;
    let ram = layout.ram;
    if ram > mem.size() {
        return Err(LinuxError::RamTooLarge { ram, mem: mem.size() });
    }
    check_reserved(layout.reserved)?;

    // The kernel and the memory it needs until it runs.
    let kernel_limit = ram.min(KERNEL_LIMIT);
    let load_addr = image.load_address();
    let kernel_end = load_addr.and_then(|a| a.checked_add(u64::from(h.init_size)));
    let (kstart, kend) = match (load_addr, kernel_end) {
        (Some(s), Some(e)) if e <= kernel_limit => (s, e),
        _ => {
            let start = load_addr.unwrap_or(u64::MAX);
            let end = kernel_end.unwrap_or(u64::MAX);
            return Err(LinuxError::KernelDoesNotFit { start, end, limit: kernel_limit });
        }
    };
    check_collision(layout.reserved, "kernel", kstart, kend)?;

    // The command line.
    let cmdline = layout.cmdline.as_bytes();
    if cmdline.contains(&0) {
        return Err(LinuxError::CmdlineNul);
    }
    let max = u64::from(h.cmdline_size).min(CMDLINE_END - CMDLINE_GPA - 1);
    if cmdline.len() as u64 > max {
        return Err(LinuxError::CmdlineTooLong { len: cmdline.len(), max });
    }
    let cmdline_end = CMDLINE_GPA + cmdline.len() as u64 + 1;
    check_collision(layout.reserved, "zero page and command line", BOOT_PARAMS_GPA, cmdline_end)?;

    // The initramfs: as high as possible below min(RAM, initrd_addr_max + 1).
    let initrd = match layout.initrd {
        Some(data) if !data.is_empty() => {
            let size = data.len() as u64;
            let limit = ram.min(u64::from(h.initrd_addr_max) + 1);
            let mut blockers: Vec<(u64, u64)> = layout.reserved.iter().map(|r| (r.start, r.end)).collect();
            blockers.push((kstart, kend));
            let start = place_initrd(size, limit, &blockers).ok_or(LinuxError::InitrdDoesNotFit { size, limit })?;
            Some((start, start + size, data))
        }
        _ => None,
    };

    let e820 = build_e820(ram, layout.reserved)?;

    // The zero page: zeroed, the image's setup header, then the loader's fields.
    let mut zp = ZeroPage([0; zp::SIZE]);
    zp.put(hdr::START, image.raw_header);
    zp.put_u8(hdr::TYPE_OF_LOADER, hdr::LOADER_UNDEFINED);
    zp.put_u8(hdr::EXT_LOADER_VER, 0);
    zp.put_u8(hdr::EXT_LOADER_TYPE, 0);
    let loadflags = zp.get_u8(hdr::LOADFLAGS) & !(hdr::KEEP_SEGMENTS | hdr::CAN_USE_HEAP);
    zp.put_u8(hdr::LOADFLAGS, loadflags);
    zp.put_u16(hdr::HEAP_END_PTR, 0);
    // Only the 16-bit entry reads code32_start; keep it truthful anyway (kstart < 4 GiB).
    zp.put_u32(hdr::CODE32_START, kstart as u32);
    zp.put_split(hdr::CMD_LINE_PTR, zp::EXT_CMD_LINE_PTR, CMDLINE_GPA);
    let (rd_start, rd_size) = initrd.map_or((0, 0), |(s, e, _)| (s, e - s));
    zp.put_split(hdr::RAMDISK_IMAGE, zp::EXT_RAMDISK_IMAGE, rd_start);
    zp.put_split(hdr::RAMDISK_SIZE, zp::EXT_RAMDISK_SIZE, rd_size);
    // Loader-owned fields an image could carry garbage in: a non-zero setup_data would make
    // the kernel walk a list that does not exist.
    zp.put_u32(hdr::HARDWARE_SUBARCH, 0);
    zp.put_u64(hdr::HARDWARE_SUBARCH_DATA, 0);
    zp.put_u64(hdr::SETUP_DATA, 0);
    zp.put_u64(zp::ACPI_RSDP_ADDR, layout.rsdp.unwrap_or(0));
    zp.put_u8(zp::SENTINEL, 0);
    // build_e820 guarantees at most E820_MAX (128) entries.
    zp.put_u8(zp::E820_ENTRIES, e820.len() as u8);
    for (i, entry) in e820.iter().enumerate() {
        zp.put(zp::E820_TABLE + i * zp::E820_ENTRY_SIZE, &entry.to_bytes());
    }

    mem.write(BOOT_PARAMS_GPA, &zp.0)?;
    mem.write(CMDLINE_GPA, cmdline)?;
    mem.zero(CMDLINE_GPA + cmdline.len() as u64, 1)?;
    mem.write(kstart, image.payload)?;
    if let Some((start, _, data)) = initrd {
        mem.write(start, data)?;
    }

    Ok(Loaded {
        entry: kstart + ENTRY_64_OFFSET,
        boot_params: BOOT_PARAMS_GPA,
        cmdline: CMDLINE_GPA,
        kernel: (kstart, kend),
        initrd: initrd.map(|(s, e, _)| (s, e)),
        e820,
    })
}

/// Builds the e820 map for `[0, ram)`: RAM `[0, 0x9F000)`, reserved `[0x9F000, 0x100000)`
/// (EBDA, VGA, option and BIOS ROMs), RAM `[0x100000, ram)`, with each of `reserved` laid
/// over it as its own type. Linux needs RAM below 1 MiB for its real-mode trampoline
/// (arch/x86/realmode/init.c). The result is sorted and non-overlapping, with adjacent
/// ranges of one type merged.
pub fn build_e820(ram: u64, reserved: &[ReservedRange]) -> Result<Vec<E820Entry>, LinuxError> {
    check_reserved(reserved)?;
    let base = [
        (0, ram.min(LOW_RAM_END), E820Type::Ram),
        (LOW_RAM_END, HIGH_RAM_START, E820Type::Reserved),
        (HIGH_RAM_START, ram, E820Type::Ram),
    ];
    let mut points: Vec<u64> = Vec::with_capacity(6 + 2 * reserved.len());
    for &(s, e, _) in &base {
        if s < e {
            points.extend([s, e]);
        }
    }
    for r in reserved {
        points.extend([r.start, r.end]);
    }
    points.sort_unstable();
    points.dedup();

    let mut map: Vec<E820Entry> = Vec::new();
    for w in points.windows(2) {
        let (a, b) = (w[0], w[1]);
        let kind = reserved
            .iter()
            .find(|r| r.start <= a && b <= r.end)
            .map(|r| r.kind)
            .or_else(|| base.iter().find(|&&(s, e, _)| s <= a && b <= e).map(|&(_, _, k)| k));
        let Some(kind) = kind else { continue };
        match map.last_mut() {
            Some(last) if last.end() == a && last.kind == kind => last.size += b - a,
            _ => map.push(E820Entry { addr: a, size: b - a, kind }),
        }
    }
    if map.len() > zp::E820_MAX {
        return Err(LinuxError::TooManyE820 { count: map.len() });
    }
    Ok(map)
}

/// Every range non-empty and disjoint from the others.
fn check_reserved(reserved: &[ReservedRange]) -> Result<(), LinuxError> {
    for (i, r) in reserved.iter().enumerate() {
        if r.start >= r.end || reserved[..i].iter().any(|o| o.overlaps(r.start, r.end)) {
            return Err(LinuxError::BadReserved { start: r.start, end: r.end });
        }
    }
    Ok(())
}

fn check_collision(reserved: &[ReservedRange], what: &'static str, start: u64, end: u64) -> Result<(), LinuxError> {
    match reserved.iter().find(|r| r.overlaps(start, end)) {
        Some(r) => Err(LinuxError::Collision { what, start, end, reserved: (r.start, r.end) }),
        None => Ok(()),
    }
}

/// The highest 4 KiB aligned start in `[MIN_INITRD, limit - size]` whose range misses every
/// blocker.
fn place_initrd(size: u64, limit: u64, blockers: &[(u64, u64)]) -> Option<u64> {
    let mut top = limit;
    loop {
        let start = top.checked_sub(size)? & !(PAGE - 1);
        if start < MIN_INITRD {
            return None;
        }
        let end = start + size;
        match blockers.iter().find(|&&(bs, be)| bs < end && start < be) {
            None => return Some(start),
            // `bs < end <= top`: each step lowers `top` below one more blocker.
            Some(&(bs, _)) => top = bs,
        }
    }
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(v.checked_add(align - 1)? & !(align - 1))
}

fn read<const N: usize>(bytes: &[u8], off: usize) -> Option<[u8; N]> {
    bytes.get(off..off.checked_add(N)?)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    const MIB: u64 = 1 << 20;

    /// A synthetic bzImage: a setup header with chosen fields and a patterned payload.
    #[derive(Clone)]
    struct Img {
        setup_sects: u8,
        version: u16,
        loadflags: u8,
        xloadflags: u16,
        header_end: u8,
        kernel_alignment: u32,
        relocatable: u8,
        pref_address: u64,
        init_size: u32,
        cmdline_size: u32,
        initrd_addr_max: u32,
        payload_len: usize,
        syssize: Option<u32>,
        /// Extra bytes after the protected-mode code (e.g. a signature).
        trailer: usize,
    }

    impl Default for Img {
        fn default() -> Self {
            Self {
                setup_sects: 2,
                version: 0x020F,
                loadflags: hdr::LOADED_HIGH | 0x20,
                xloadflags: hdr::XLF_KERNEL_64 | hdr::XLF_CAN_BE_LOADED_ABOVE_4G,
                header_end: 0x6A,
                kernel_alignment: 2 * MIB as u32,
                relocatable: 1,
                pref_address: 16 * MIB,
                init_size: 4 * MIB as u32,
                cmdline_size: 2047,
                initrd_addr_max: 0x7FFF_FFFF,
                payload_len: 0x3000,
                syssize: None,
                trailer: 0,
            }
        }
    }

    fn payload_byte(i: usize) -> u8 {
        (i as u8) ^ 0x5A ^ ((i >> 8) as u8)
    }

    impl Img {
        fn build(&self) -> Vec<u8> {
            let sects = if self.setup_sects == 0 { 4 } else { self.setup_sects as usize };
            let off = (sects + 1) * 512;
            let mut v = vec![0u8; off + self.payload_len + self.trailer];
            let mut put = |o: usize, b: &[u8]| {
                if let Some(d) = v.get_mut(o..o + b.len()) {
                    d.copy_from_slice(b)
                }
            };
            put(hdr::SETUP_SECTS, &[self.setup_sects]);
            put(0x1F2, &1u16.to_le_bytes()); // root_flags
            let syssize = self.syssize.unwrap_or(self.payload_len.div_ceil(16) as u32);
            put(hdr::SYSSIZE, &syssize.to_le_bytes());
            put(0x1FA, &0xFFFFu16.to_le_bytes()); // vid_mode
            put(0x1FE, &0xAA55u16.to_le_bytes()); // boot_flag
            put(0x200, &[0xEB, self.header_end]);
            put(hdr::HEADER, b"HdrS");
            put(hdr::VERSION, &self.version.to_le_bytes());
            put(hdr::LOADFLAGS, &[self.loadflags | hdr::CAN_USE_HEAP]);
            put(hdr::CODE32_START, &0x100000u32.to_le_bytes());
            put(hdr::HEAP_END_PTR, &0x1234u16.to_le_bytes());
            put(hdr::INITRD_ADDR_MAX, &self.initrd_addr_max.to_le_bytes());
            put(hdr::KERNEL_ALIGNMENT, &self.kernel_alignment.to_le_bytes());
            put(hdr::RELOCATABLE_KERNEL, &[self.relocatable]);
            put(0x235, &[21]); // min_alignment
            put(hdr::XLOADFLAGS, &self.xloadflags.to_le_bytes());
            put(hdr::CMDLINE_SIZE, &self.cmdline_size.to_le_bytes());
            put(hdr::HARDWARE_SUBARCH, &7u32.to_le_bytes()); // garbage the loader must clear
            put(hdr::SETUP_DATA, &0xDEAD_BEEFu64.to_le_bytes()); // likewise
            put(hdr::PREF_ADDRESS, &self.pref_address.to_le_bytes());
            put(hdr::INIT_SIZE, &self.init_size.to_le_bytes());
            put(0x264, &0x190u32.to_le_bytes()); // handover_offset

            // Bytes after the header (setup code) must not be copied into the zero page.
            let end = 0x202 + self.header_end as usize;
            for o in end..end + 8 {
                put(o, &[0xCC]);
            }
            for i in 0..self.payload_len {
                put(off + i, &[payload_byte(i)]);
            }
            for i in 0..self.trailer {
                put(off + self.payload_len + i, &[0xEE]);
            }
            v
        }
    }

    /// Guest memory as a plain buffer.
    struct FakeMem(Vec<u8>);

    impl FakeMem {
        fn new(size: u64) -> Self {
            Self(vec![0; size as usize])
        }

        fn bytes(&self, gpa: u64, len: usize) -> &[u8] {
            &self.0[gpa as usize..gpa as usize + len]
        }

        fn u8(&self, gpa: u64) -> u8 {
            self.0[gpa as usize]
        }

        fn u16(&self, gpa: u64) -> u16 {
            u16::from_le_bytes(self.bytes(gpa, 2).try_into().unwrap())
        }

        fn u32(&self, gpa: u64) -> u32 {
            u32::from_le_bytes(self.bytes(gpa, 4).try_into().unwrap())
        }

        fn u64(&self, gpa: u64) -> u64 {
            u64::from_le_bytes(self.bytes(gpa, 8).try_into().unwrap())
        }

        fn range(&self, gpa: u64, len: u64) -> Result<core::ops::Range<usize>, GuestMemError> {
            match gpa.checked_add(len) {
                Some(end) if end <= self.0.len() as u64 => Ok(gpa as usize..end as usize),
                _ => Err(GuestMemError::OutOfRange { gpa, len }),
            }
        }
    }

    impl GuestWrite for FakeMem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }

        fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestMemError> {
            let r = self.range(gpa, data.len() as u64)?;
            self.0[r].copy_from_slice(data);
            Ok(())
        }

        fn zero(&mut self, gpa: u64, len: u64) -> Result<(), GuestMemError> {
            let r = self.range(gpa, len)?;
            self.0[r].fill(0);
            Ok(())
        }
    }

    fn layout<'a>(ram: u64, cmdline: &'a str, initrd: Option<&'a [u8]>) -> LinuxLayout<'a> {
        LinuxLayout { ram, cmdline, initrd, rsdp: None, reserved: &[] }
    }

    fn parse_err(img: &Img) -> LinuxError {
        parse(&img.build()).unwrap_err()
    }

    fn load_err(img: &Img, layout: &LinuxLayout<'_>) -> LinuxError {
        let bytes = img.build();
        let image = parse(&bytes).unwrap();
        let mut mem = FakeMem::new(layout.ram);
        load(&image, &mut mem, layout).unwrap_err()
    }

    fn e(addr: u64, end: u64, kind: E820Type) -> E820Entry {
        E820Entry { addr, size: end - addr, kind }
    }

    /// Sorted, non-empty, non-overlapping, adjacent equal types merged.
    fn assert_well_formed(map: &[E820Entry]) {
        for w in map.windows(2) {
            assert!(w[0].size > 0 && w[1].size > 0, "{map:?}");
            assert!(w[0].end() <= w[1].addr, "unsorted or overlapping: {map:?}");
            assert!(!(w[0].end() == w[1].addr && w[0].kind == w[1].kind), "unmerged: {map:?}");
        }
    }

    #[test]
    fn parses_a_good_image() {
        let img = Img { trailer: 100, ..Img::default() };
        let bytes = img.build();
        let image = parse(&bytes).unwrap();
        let h = image.header;
        assert_eq!(h.setup_sects, 2);
        assert_eq!(h.version, 0x020F);
        assert_eq!(h.header_end, 0x26C);
        assert_eq!(h.kernel_alignment, 2 * MIB as u32);
        assert!(h.relocatable_kernel);
        assert_eq!(h.pref_address, 16 * MIB);
        assert_eq!(h.init_size, 4 * MIB as u32);
        assert_eq!(h.cmdline_size, 2047);
        assert_eq!(image.raw_header(), &bytes[0x1F1..0x26C]);
        // The payload is syssize * 16 bytes; the trailer (a signature, say) is not loaded.
        assert_eq!(image.payload().len(), 0x3000);
        assert_eq!(image.payload(), &bytes[3 * 512..3 * 512 + 0x3000]);
        assert_eq!(image.load_address(), Some(16 * MIB));
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let bytes = Img { setup_sects: 0, ..Img::default() }.build();
        let image = parse(&bytes).unwrap();
        assert_eq!(image.header.setup_sects, 4);
        assert_eq!(image.payload(), &bytes[5 * 512..5 * 512 + 0x3000]);
    }

    #[test]
    fn rejects_too_small() {
        for len in [0, 1, 0x202, hdr::MIN_END - 1] {
            let err = parse(&vec![0; len]).unwrap_err();
            assert_eq!(err, LinuxError::TooSmall { len });
        }
        assert_eq!(
            LinuxError::TooSmall { len: 10 }.to_string(),
            "image of 10 bytes is too small for a bzImage (the setup header needs 616 bytes)"
        );
    }

    #[test]
    fn rejects_missing_magic() {
        let mut bytes = Img::default().build();
        bytes[0x202..0x206].copy_from_slice(b"HdrT");
        assert_eq!(parse(&bytes).unwrap_err(), LinuxError::NoHeader);
        assert_eq!(parse(&[0u8; 4096]).unwrap_err(), LinuxError::NoHeader);
        assert!(LinuxError::NoHeader.to_string().contains("\"HdrS\" at 0x202"));
    }

    #[test]
    fn rejects_old_protocol() {
        let err = parse_err(&Img { version: 0x020B, ..Img::default() });
        assert_eq!(err, LinuxError::OldProtocol { version: 0x020B });
        assert_eq!(err.to_string(), "kernel boot protocol 2.11 is older than 2.12");
        assert_eq!(
            parse_err(&Img { version: 0x0109, ..Img::default() }).to_string(),
            "kernel boot protocol 1.09 is older than 2.12"
        );
        assert!(parse(&Img { version: MIN_PROTOCOL, ..Img::default() }.build()).is_ok());
    }

    #[test]
    fn rejects_no_64bit_entry() {
        let err = parse_err(&Img { xloadflags: hdr::XLF_CAN_BE_LOADED_ABOVE_4G, ..Img::default() });
        assert_eq!(err, LinuxError::No64BitEntry);
        assert!(err.to_string().starts_with("no 64-bit entry point"));
    }

    #[test]
    fn rejects_zimage() {
        let err = parse_err(&Img { loadflags: 0, ..Img::default() });
        assert_eq!(err, LinuxError::NotBzImage);
        assert!(err.to_string().contains("LOADED_HIGH"));
    }

    #[test]
    fn rejects_bad_header_end() {
        assert_eq!(parse_err(&Img { header_end: 0x65, ..Img::default() }), LinuxError::BadHeaderEnd { end: 0x267 });
        assert_eq!(parse_err(&Img { header_end: 0x8F, ..Img::default() }), LinuxError::BadHeaderEnd { end: 0x291 });
        assert_eq!(parse_err(&Img { header_end: 0xFF, ..Img::default() }), LinuxError::BadHeaderEnd { end: 0x301 });
        // Both limits are accepted.
        assert!(parse(&Img { header_end: 0x66, ..Img::default() }.build()).is_ok());
        assert!(parse(&Img { header_end: 0x8E, ..Img::default() }.build()).is_ok());
        assert_eq!(
            LinuxError::BadHeaderEnd { end: 0x301 }.to_string(),
            "setup header ends at 0x301 (0x202 + byte at 0x201), outside 0x268..=0x290"
        );
    }

    #[test]
    fn rejects_setup_sects_past_end() {
        let mut bytes = Img::default().build();
        bytes[hdr::SETUP_SECTS] = 200;
        let len = bytes.len();
        let err = parse(&bytes).unwrap_err();
        assert_eq!(err, LinuxError::SetupPastEnd { setup_sects: 200, offset: 201 * 512, len });
        assert_eq!(
            err.to_string(),
            alloc::format!(
                "setup_sects 200 puts the protected-mode code at offset 0x19200, past the end of the {len}-byte image"
            )
        );
        // Exactly at the end: no protected-mode code at all.
        let bytes = Img { payload_len: 0, ..Img::default() }.build();
        assert!(matches!(parse(&bytes).unwrap_err(), LinuxError::SetupPastEnd { offset: 0x600, .. }));
        // setup_sects 0 means 4: a file with 3 setup sectors and a small payload is too short.
        let mut bytes = Img { setup_sects: 3, payload_len: 0x200, ..Img::default() }.build();
        bytes[hdr::SETUP_SECTS] = 0;
        assert!(matches!(parse(&bytes).unwrap_err(), LinuxError::SetupPastEnd { setup_sects: 4, .. }));
    }

    #[test]
    fn rejects_bad_syssize() {
        assert_eq!(parse_err(&Img { syssize: Some(0), ..Img::default() }), LinuxError::EmptyPayload);
        let err = parse_err(&Img { syssize: Some(0x301), ..Img::default() });
        assert_eq!(err, LinuxError::Truncated { expected: 0x3010, actual: 0x3000 });
        assert_eq!(
            err.to_string(),
            "image is truncated: syssize says 12304 bytes of protected-mode code, the file has 12288"
        );
        let err = parse_err(&Img { syssize: Some(u32::MAX), ..Img::default() });
        assert!(matches!(err, LinuxError::Truncated { .. }));
    }

    #[test]
    fn rejects_bad_alignment() {
        for align in [0, 3, 0x30_0000, u32::MAX] {
            let err = parse_err(&Img { kernel_alignment: align, ..Img::default() });
            assert_eq!(err, LinuxError::BadAlignment { align });
        }
        assert_eq!(
            LinuxError::BadAlignment { align: 0x300000 }.to_string(),
            "kernel_alignment 0x300000 is not a power of two"
        );
    }

    #[test]
    fn rejects_small_init_size() {
        let err = parse_err(&Img { init_size: 0x2FFF, ..Img::default() });
        assert_eq!(err, LinuxError::InitSizeTooSmall { init_size: 0x2FFF, payload: 0x3000 });
        assert_eq!(err.to_string(), "init_size 0x2fff is smaller than the 0x3000-byte protected-mode code");
        assert_eq!(
            parse_err(&Img { init_size: 0, ..Img::default() }),
            LinuxError::InitSizeTooSmall { init_size: 0, payload: 0x3000 }
        );
        assert!(parse(&Img { init_size: 0x3000, ..Img::default() }.build()).is_ok());
    }

    #[test]
    fn rejects_bad_pref_address() {
        let err = parse_err(&Img { pref_address: u64::MAX - 10, ..Img::default() });
        assert!(matches!(err, LinuxError::BadPrefAddress { why: "plus init_size overflows", .. }));
        let err = parse_err(&Img { relocatable: 0, pref_address: 0x8000, ..Img::default() });
        assert_eq!(err.to_string(), "pref_address 0x8000 of a non-relocatable kernel is below 1 MiB");
        let err = parse_err(&Img { relocatable: 0, pref_address: 17 * MIB, ..Img::default() });
        assert_eq!(
            err.to_string(),
            "pref_address 0x1100000 of a non-relocatable kernel is not a multiple of kernel_alignment"
        );
        // A relocatable kernel is moved anyway.
        let bytes = Img { pref_address: 0x8000, ..Img::default() }.build();
        assert_eq!(parse(&bytes).unwrap().load_address(), Some(16 * MIB));
    }

    #[test]
    fn load_address_rules() {
        let at = |img: Img| parse(&img.build()).unwrap().load_address();
        assert_eq!(at(Img { pref_address: 2 * MIB, ..Img::default() }), Some(16 * MIB));
        assert_eq!(at(Img { pref_address: 17 * MIB, ..Img::default() }), Some(18 * MIB));
        assert_eq!(at(Img { pref_address: 17 * MIB, kernel_alignment: 0x1000, ..Img::default() }), Some(17 * MIB));
        assert_eq!(at(Img { pref_address: 16 * MIB, kernel_alignment: 1 << 31, ..Img::default() }), Some(1 << 31));
        assert_eq!(at(Img { relocatable: 0, pref_address: 2 * MIB, ..Img::default() }), Some(2 * MIB));
    }

    #[test]
    fn loads_a_good_image() {
        let bytes = Img::default().build();
        let image = parse(&bytes).unwrap();
        let ram = 64 * MIB;
        let initrd: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let reserved = [ReservedRange::reserved(0x1000, 0x8000), ReservedRange::acpi(0xE0000, 0xE2000)];
        let cmdline = "console=ttyS0 root=/dev/vda";
        let layout = LinuxLayout { ram, cmdline, initrd: Some(&initrd), rsdp: Some(0xE0000), reserved: &reserved };
        let mut mem = FakeMem::new(ram);
        mem.0[0x20000..0x30000].fill(0xAB); // the zero page must come out zeroed
        let loaded = load(&image, &mut mem, &layout).unwrap();

        assert_eq!(loaded.entry, 16 * MIB + 0x200);
        assert_eq!(loaded.boot_params, 0x20000);
        assert_eq!(loaded.cmdline, 0x21000);
        assert_eq!(loaded.kernel, (16 * MIB, 20 * MIB));
        let rd_start = (ram - 10_000) & !0xFFF;
        assert_eq!(loaded.initrd, Some((rd_start, rd_start + 10_000)));

        // Kernel and initramfs contents.
        assert_eq!(mem.bytes(16 * MIB, 0x3000), image.payload());
        assert_eq!(mem.bytes(rd_start, 10_000), &initrd[..]);
        // The command line, NUL-terminated.
        assert_eq!(mem.bytes(0x21000, cmdline.len()), cmdline.as_bytes());
        assert_eq!(mem.u8(0x21000 + cmdline.len() as u64), 0);

        let bp = 0x20000u64;
        // The setup header, copied, with the loader's fields patched.
        assert_eq!(mem.u8(bp + 0x1F1), 2);
        assert_eq!(mem.u32(bp + 0x1F4), 0x300);
        assert_eq!(mem.u16(bp + 0x1FA), 0xFFFF);
        assert_eq!(mem.u16(bp + 0x1FE), 0xAA55);
        assert_eq!(mem.bytes(bp + 0x202, 4), b"HdrS");
        assert_eq!(mem.u16(bp + 0x206), 0x020F);
        assert_eq!(mem.u8(bp + 0x210), 0xFF); // type_of_loader
        assert_eq!(mem.u8(bp + 0x211), hdr::LOADED_HIGH | 0x20); // CAN_USE_HEAP cleared, QUIET kept
        assert_eq!(mem.u32(bp + 0x214), 16 * MIB as u32); // code32_start
        assert_eq!(mem.u32(bp + 0x218), rd_start as u32);
        assert_eq!(mem.u32(bp + 0x21C), 10_000);
        assert_eq!(mem.u16(bp + 0x224), 0); // heap_end_ptr
        assert_eq!(mem.u32(bp + 0x228), 0x21000);
        assert_eq!(mem.u32(bp + 0x230), 2 * MIB as u32);
        assert_eq!(mem.u16(bp + 0x236), 3);
        assert_eq!(mem.u32(bp + 0x23C), 0); // hardware_subarch cleared
        assert_eq!(mem.u64(bp + 0x250), 0); // setup_data cleared
        assert_eq!(mem.u64(bp + 0x258), 16 * MIB);
        assert_eq!(mem.u32(bp + 0x260), 4 * MIB as u32);
        assert_eq!(mem.u32(bp + 0x264), 0x190);
        // Nothing past the header end (the image has 0xCC there) and the sentinel is 0.
        assert_eq!(mem.bytes(bp + 0x26C, 8), &[0; 8]);
        assert_eq!(mem.u8(bp + 0x1EF), 0);
        assert_eq!(mem.bytes(bp, 0x70), &[0; 0x70]);
        // High halves.
        assert_eq!(mem.u32(bp + 0x0C0), 0);
        assert_eq!(mem.u32(bp + 0x0C4), 0);
        assert_eq!(mem.u32(bp + 0x0C8), 0);
        // RSDP.
        assert_eq!(mem.u64(bp + 0x070), 0xE0000);
        // e820.
        let expect = [
            e(0, 0x1000, E820Type::Ram),
            e(0x1000, 0x8000, E820Type::Reserved),
            e(0x8000, 0x9F000, E820Type::Ram),
            e(0x9F000, 0xE0000, E820Type::Reserved),
            e(0xE0000, 0xE2000, E820Type::Acpi),
            e(0xE2000, 0x100000, E820Type::Reserved),
            e(0x100000, ram, E820Type::Ram),
        ];
        assert_eq!(loaded.e820, expect);
        assert_eq!(mem.u8(bp + 0x1E8), 7);
        for (i, want) in expect.iter().enumerate() {
            let at = bp + 0x2D0 + 20 * i as u64;
            assert_eq!(mem.u64(at), want.addr);
            assert_eq!(mem.u64(at + 8), want.size);
            assert_eq!(mem.u32(at + 16), want.kind as u32);
        }
        assert_eq!(mem.bytes(bp + 0x2D0 + 20 * 7, 20), &[0; 20]);
        // Everything else in the zero page stays zero.
        assert_eq!(mem.bytes(bp + 0xD00, 0x300), &[0; 0x300][..]);
    }

    #[test]
    fn loads_without_initrd_or_rsdp() {
        for initrd in [None, Some(&[][..])] {
            let bytes = Img::default().build();
            let image = parse(&bytes).unwrap();
            let mut mem = FakeMem::new(32 * MIB);
            let loaded = load(&image, &mut mem, &layout(32 * MIB, "", initrd)).unwrap();
            assert_eq!(loaded.initrd, None);
            assert_eq!(mem.u32(0x20218), 0);
            assert_eq!(mem.u32(0x2021C), 0);
            assert_eq!(mem.u64(0x20070), 0);
            assert_eq!(mem.u8(0x21000), 0);
            assert_eq!(mem.u8(0x201E8), 3);
        }
    }

    #[test]
    fn ram_smaller_than_memory_is_respected() {
        let bytes = Img::default().build();
        let image = parse(&bytes).unwrap();
        let mut mem = FakeMem::new(64 * MIB);
        let loaded = load(&image, &mut mem, &layout(48 * MIB, "", Some(&[1; 100]))).unwrap();
        assert_eq!(loaded.initrd, Some((48 * MIB - 0x1000, 48 * MIB - 0x1000 + 100)));
        assert_eq!(loaded.e820.last(), Some(&e(0x100000, 48 * MIB, E820Type::Ram)));
        let err = load(&image, &mut mem, &layout(65 * MIB, "", None)).unwrap_err();
        assert_eq!(err, LinuxError::RamTooLarge { ram: 65 * MIB, mem: 64 * MIB });
    }

    #[test]
    fn kernel_must_fit() {
        // init_size 4 MiB at 16 MiB needs 20 MiB of RAM.
        let err = load_err(&Img::default(), &layout(20 * MIB - 1, "", None));
        assert_eq!(err, LinuxError::KernelDoesNotFit { start: 16 * MIB, end: 20 * MIB, limit: 20 * MIB - 1 });
        assert_eq!(
            err.to_string(),
            "kernel needs 0x1000000-0x1400000 (its init_size from the load address) but must end below 0x13fffff"
        );
        let bytes = Img::default().build();
        let mut mem = FakeMem::new(20 * MIB);
        assert!(load(&parse(&bytes).unwrap(), &mut mem, &layout(20 * MIB, "", None)).is_ok());
        // Never above 4 GiB, whatever the RAM (8 GiB that refuses writes: the check comes first).
        struct Huge;
        impl GuestWrite for Huge {
            fn size(&self) -> u64 {
                8 << 30
            }
            fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestMemError> {
                Err(GuestMemError::OutOfRange { gpa, len: data.len() as u64 })
            }
            fn zero(&mut self, gpa: u64, len: u64) -> Result<(), GuestMemError> {
                Err(GuestMemError::OutOfRange { gpa, len })
            }
        }
        let big = layout(8 << 30, "", None);
        let img = Img { pref_address: 0xFFE0_0000, ..Img::default() };
        let bytes = img.build();
        let err = load(&parse(&bytes).unwrap(), &mut Huge, &big).unwrap_err();
        assert_eq!(err, LinuxError::KernelDoesNotFit { start: 0xFFE0_0000, end: 0x1_0020_0000, limit: 1 << 32 });
        // Alignment overflow.
        let img = Img { pref_address: u64::MAX - (8 << 20), kernel_alignment: 1 << 31, ..Img::default() };
        let bytes = img.build();
        let image = parse(&bytes).unwrap();
        assert_eq!(image.load_address(), None);
        let err = load(&image, &mut Huge, &big).unwrap_err();
        assert_eq!(err, LinuxError::KernelDoesNotFit { start: u64::MAX, end: u64::MAX, limit: 1 << 32 });
    }

    #[test]
    fn initrd_placement() {
        let bytes = Img::default().build();
        let image = parse(&bytes).unwrap();
        let ram = 64 * MIB;
        let place = |initrd: &[u8], max: Option<u32>, reserved: &[ReservedRange]| {
            let mut img = image;
            if let Some(m) = max {
                img.header.initrd_addr_max = m;
            }
            let mut mem = FakeMem::new(ram);
            let l = LinuxLayout { reserved, ..layout(ram, "", Some(initrd)) };
            load(&img, &mut mem, &l).map(|l| l.initrd.unwrap())
        };
        // Top of RAM, page aligned.
        assert_eq!(place(&[1; 0x1000], None, &[]), Ok((ram - 0x1000, ram)));
        assert_eq!(place(&[1; 0x1001], None, &[]), Ok((ram - 0x2000, ram - 0x1000 + 1)));
        // Below initrd_addr_max + 1.
        assert_eq!(place(&[1; 0x1000], Some(0x200_0FFF), &[]), Ok((0x200_0000, 0x200_1000)));
        // Skips a reserved range at the top of RAM.
        let top = [ReservedRange::acpi(ram - 0x3000, ram)];
        assert_eq!(place(&[1; 0x2000], None, &top), Ok((ram - 0x5000, ram - 0x3000)));
        // Cannot overlap the kernel's init_size region [16 MiB, 20 MiB): goes below it.
        assert_eq!(place(&[1; 0x1000], Some(20 * MIB as u32 - 1), &[]), Ok((16 * MIB - 0x1000, 16 * MIB)));
        // Too big for [1 MiB, 16 MiB) and for [20 MiB, 24 MiB).
        let err = place(&vec![1; 15 * MIB as usize + 1], Some(24 * MIB as u32 - 1), &[]).unwrap_err();
        assert_eq!(err, LinuxError::InitrdDoesNotFit { size: 15 * MIB + 1, limit: 24 * MIB });
        assert_eq!(
            err.to_string(),
            "initramfs of 15728641 bytes does not fit in free RAM between 0x100000 and 0x1800000"
        );
        // Bigger than RAM.
        let err = place(&vec![1; ram as usize + 1], None, &[]).unwrap_err();
        assert_eq!(err, LinuxError::InitrdDoesNotFit { size: ram + 1, limit: ram });
        // initrd_addr_max 0.
        assert!(matches!(place(&[1; 10], Some(0), &[]), Err(LinuxError::InitrdDoesNotFit { limit: 1, .. })));
    }

    #[test]
    fn initrd_above_4g_uses_high_halves() {
        // Only the fields: place_initrd with a limit above 4 GiB and the split writer.
        assert_eq!(place_initrd(0x1000, 5 << 30, &[]), Some((5 << 30) - 0x1000));
        let mut zp = ZeroPage([0; zp::SIZE]);
        zp.put_split(hdr::RAMDISK_IMAGE, zp::EXT_RAMDISK_IMAGE, 0x1_2345_6000);
        assert_eq!(&zp.0[0x218..0x21C], &0x2345_6000u32.to_le_bytes());
        assert_eq!(&zp.0[0x0C0..0x0C4], &1u32.to_le_bytes());
    }

    #[test]
    fn command_line_limits() {
        let long = "x".repeat(2048);
        let err = load_err(&Img::default(), &layout(32 * MIB, &long, None));
        assert_eq!(err, LinuxError::CmdlineTooLong { len: 2048, max: 2047 });
        assert_eq!(err.to_string(), "command line of 2048 bytes exceeds the limit of 2047 bytes");
        // Exactly cmdline_size is fine.
        let bytes = Img::default().build();
        let mut mem = FakeMem::new(32 * MIB);
        load(&parse(&bytes).unwrap(), &mut mem, &layout(32 * MIB, &long[..2047], None)).unwrap();
        assert_eq!(mem.u8(0x21000 + 2046), b'x');
        assert_eq!(mem.u8(0x21000 + 2047), 0);
        // A huge cmdline_size is capped by the area Vireo gives the command line.
        let huge = "y".repeat(0xF000);
        let err = load_err(&Img { cmdline_size: u32::MAX, ..Img::default() }, &layout(32 * MIB, &huge, None));
        assert_eq!(err, LinuxError::CmdlineTooLong { len: 0xF000, max: 0xEFFF });
        // NUL.
        let err = load_err(&Img::default(), &layout(32 * MIB, "a\0b", None));
        assert_eq!(err, LinuxError::CmdlineNul);
        assert_eq!(err.to_string(), "command line contains a NUL byte");
    }

    #[test]
    fn collisions_with_reserved_ranges() {
        let img = Img::default();
        let reserved = [ReservedRange::reserved(0x20800, 0x20900)];
        let err = load_err(&img, &LinuxLayout { reserved: &reserved, ..layout(32 * MIB, "abc", None) });
        assert_eq!(
            err,
            LinuxError::Collision {
                what: "zero page and command line",
                start: 0x20000,
                end: 0x21004,
                reserved: (0x20800, 0x20900)
            }
        );
        assert_eq!(
            err.to_string(),
            "zero page and command line at 0x20000-0x21004 overlaps reserved range 0x20800-0x20900"
        );
        let reserved = [ReservedRange::acpi(19 * MIB, 19 * MIB + 0x1000)];
        let err = load_err(&img, &LinuxLayout { reserved: &reserved, ..layout(32 * MIB, "", None) });
        assert!(matches!(err, LinuxError::Collision { what: "kernel", start: 0x100_0000, end: 0x140_0000, .. }));
        // Just outside both is fine.
        let reserved = [ReservedRange::reserved(0x1000, 0x20000), ReservedRange::reserved(0x21004, 0x22000)];
        let bytes = img.build();
        let mut mem = FakeMem::new(32 * MIB);
        let l = LinuxLayout { reserved: &reserved, ..layout(32 * MIB, "abc", None) };
        assert!(load(&parse(&bytes).unwrap(), &mut mem, &l).is_ok());
    }

    #[test]
    fn bad_reserved_ranges() {
        for bad in [
            [ReservedRange::reserved(0x1000, 0x1000), ReservedRange::reserved(0x3000, 0x4000)],
            [ReservedRange::reserved(0x2000, 0x1000), ReservedRange::reserved(0x3000, 0x4000)],
            [ReservedRange::reserved(0x1000, 0x3001), ReservedRange::acpi(0x3000, 0x4000)],
            [ReservedRange::reserved(0x3000, 0x4000), ReservedRange::acpi(0x1000, 0x5000)],
        ] {
            let err = build_e820(32 * MIB, &bad).unwrap_err();
            assert!(matches!(err, LinuxError::BadReserved { .. }), "{bad:?}");
            let err = load_err(&Img::default(), &LinuxLayout { reserved: &bad, ..layout(32 * MIB, "", None) });
            assert!(matches!(err, LinuxError::BadReserved { .. }));
        }
        assert_eq!(
            LinuxError::BadReserved { start: 0x2000, end: 0x1000 }.to_string(),
            "reserved range 0x2000-0x1000 is empty, inverted or overlaps another"
        );
    }

    #[test]
    fn e820_default() {
        let map = build_e820(128 * MIB, &[]).unwrap();
        assert_eq!(
            map,
            [
                e(0, 0x9F000, E820Type::Ram),
                e(0x9F000, 0x100000, E820Type::Reserved),
                e(0x100000, 128 * MIB, E820Type::Ram)
            ]
        );
        assert_well_formed(&map);
    }

    #[test]
    fn e820_reserved_ranges() {
        let ram = 256 * MIB;
        // Unsorted input, adjacent ranges of one type merged, ACPI in the hole and at the top of
        // RAM, a range touching the hole's edge, one above RAM (an MMIO window).
        let reserved = [
            ReservedRange::acpi(ram - 0x10000, ram),
            ReservedRange::reserved(0x7000, 0x8000),
            ReservedRange::reserved(0x1000, 0x7000),
            ReservedRange::acpi(0xF0000, 0x100000),
            ReservedRange::reserved(0x9E000, 0x9F000),
            ReservedRange::reserved(0xFEC0_0000, 0xFEC0_1000),
        ];
        let map = build_e820(ram, &reserved).unwrap();
        assert_eq!(
            map,
            [
                e(0, 0x1000, E820Type::Ram),
                e(0x1000, 0x8000, E820Type::Reserved),
                e(0x8000, 0x9E000, E820Type::Ram),
                e(0x9E000, 0xF0000, E820Type::Reserved),
                e(0xF0000, 0x100000, E820Type::Acpi),
                e(0x100000, ram - 0x10000, E820Type::Ram),
                e(ram - 0x10000, ram, E820Type::Acpi),
                e(0xFEC0_0000, 0xFEC0_1000, E820Type::Reserved),
            ]
        );
        assert_well_formed(&map);
        // A range straddling the 1 MiB boundary.
        let map = build_e820(ram, &[ReservedRange::acpi(0xFF000, 0x101000)]).unwrap();
        assert_eq!(
            map,
            [
                e(0, 0x9F000, E820Type::Ram),
                e(0x9F000, 0xFF000, E820Type::Reserved),
                e(0xFF000, 0x101000, E820Type::Acpi),
                e(0x101000, ram, E820Type::Ram),
            ]
        );
        assert_well_formed(&map);
    }

    #[test]
    fn e820_entry_limit() {
        // 64 ranges split RAM into 129 pieces (plus the hole).
        let reserved: Vec<ReservedRange> =
            (0..64).map(|i| ReservedRange::acpi(0x200000 + i * 0x2000, 0x201000 + i * 0x2000)).collect();
        let err = build_e820(64 * MIB, &reserved).unwrap_err();
        assert_eq!(err, LinuxError::TooManyE820 { count: 131 });
        assert_eq!(err.to_string(), "memory map needs 131 e820 entries; the zero page holds 128");
        let map = build_e820(64 * MIB, &reserved[..62]).unwrap();
        assert_eq!(map.len(), 127);
        assert_well_formed(&map);
    }

    #[test]
    fn e820_tiny_ram() {
        assert_eq!(
            build_e820(0x50000, &[]).unwrap(),
            [e(0, 0x50000, E820Type::Ram), e(0x9F000, 0x100000, E820Type::Reserved)]
        );
        assert_eq!(build_e820(0, &[]).unwrap(), [e(0x9F000, 0x100000, E820Type::Reserved)]);
    }

    #[test]
    fn memory_errors_propagate() {
        // A memory that claims more size than it accepts writes for.
        struct Refusing;
        impl GuestWrite for Refusing {
            fn size(&self) -> u64 {
                1 << 30
            }
            fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestMemError> {
                Err(GuestMemError::OutOfRange { gpa, len: data.len() as u64 })
            }
            fn zero(&mut self, gpa: u64, len: u64) -> Result<(), GuestMemError> {
                Err(GuestMemError::OutOfRange { gpa, len })
            }
        }
        let bytes = Img::default().build();
        let err = load(&parse(&bytes).unwrap(), &mut Refusing, &layout(32 * MIB, "", None)).unwrap_err();
        assert_eq!(err, LinuxError::Memory(GuestMemError::OutOfRange { gpa: 0x20000, len: 0x1000 }));
        assert!(err.to_string().starts_with("guest memory: "));
    }

    /// Every single-byte corruption of the header and a stream of random ones: parse and load
    /// return errors or succeed, never panic, and whatever loads stays inside RAM.
    #[test]
    fn hostile_headers_do_not_panic() {
        let good = Img { payload_len: 0x400, init_size: 0x10000, ..Img::default() }.build();
        let ram = 24 * MIB;
        let mut mem = FakeMem::new(ram);
        let try_one = |bytes: &[u8], mem: &mut FakeMem| {
            if let Ok(image) = parse(bytes) {
                let l = layout(ram, "console=ttyS0", Some(&[0x11; 0x3000]));
                if let Ok(loaded) = load(&image, mem, &l) {
                    assert!(loaded.kernel.1 <= ram);
                    assert!(loaded.initrd.is_some_and(|(_, e)| e <= ram));
                }
            }
        };
        for off in 0x1F1..0x270 {
            for v in [0x00, 0x01, 0x7F, 0x80, 0xFF] {
                let mut b = good.clone();
                b[off] = v;
                try_one(&b, &mut mem);
            }
        }
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..1 + rand() % 6 {
                let off = 0x1F1 + (rand() % 0x80) as usize;
                b[off] = rand() as u8;
            }
            let cut = (rand() % (b.len() as u64 + 1)) as usize;
            if rand() % 4 == 0 {
                b.truncate(cut);
            }
            try_one(&b, &mut mem);
        }
    }

    /// Debian's cloud kernel, when someone has put it at build/linux/vmlinuz.
    #[test]
    fn parses_real_vmlinuz_if_present() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../build/linux/vmlinuz");
        let Ok(bytes) = std::fs::read(path) else {
            std::println!("note: {path} is absent; skipping the real-kernel check");
            return;
        };
        let image = parse(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
        let h = image.header;
        assert!(h.version >= MIN_PROTOCOL);
        assert!(h.xloadflags & hdr::XLF_KERNEL_64 != 0);
        assert!(h.relocatable_kernel);
        std::println!(
            "{path}: protocol {}.{:02}, xloadflags {:#x}, setup_sects {}, payload {:#x}, init_size {:#x}, \
             kernel_alignment {:#x}, pref_address {:#x}, cmdline_size {}, initrd_addr_max {:#x}, header end {:#x}",
            h.version >> 8,
            h.version & 0xFF,
            h.xloadflags,
            h.setup_sects,
            image.payload().len(),
            h.init_size,
            h.kernel_alignment,
            h.pref_address,
            h.cmdline_size,
            h.initrd_addr_max,
            h.header_end
        );
        let ram = 256 * MIB;
        let mut mem = FakeMem::new(ram);
        let reserved = [ReservedRange::reserved(0x1000, 0x10000), ReservedRange::acpi(0xE0000, 0xE1000)];
        let l = LinuxLayout {
            ram,
            cmdline: "console=ttyS0",
            initrd: Some(&[0; 4096]),
            rsdp: Some(0xE0000),
            reserved: &reserved,
        };
        let loaded = load(&image, &mut mem, &l).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(loaded.entry, loaded.kernel.0 + 0x200);
        assert_eq!(mem.bytes(0x20202, 4), b"HdrS");
    }
}
