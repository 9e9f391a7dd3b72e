//! Loads a static x86-64 ELF executable (Vireo's test guests) into guest memory.
//!
//! Parsing uses the `elf` crate (zero-copy, no allocation, bounds-checked): every header
//! field of a module is untrusted input. Each PT_LOAD segment is copied to its physical
//! address (`p_paddr`) and the rest of its memory size is zeroed.

use core::fmt;

use elf::{abi, endian::LittleEndian, ElfBytes};

use crate::vmm::guest_mem::GuestMemory;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    Parse(&'static str),
    NotX86_64,
    NotExecutable,
    NoSegments,
    /// A segment's file range lies outside the module, or memsz < filesz.
    BadSegment {
        index: usize,
    },
    /// A segment does not fit guest RAM or overlaps what Vireo sets up there.
    SegmentOutsideRam {
        index: usize,
        start: u64,
        end: u64,
    },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfError::Parse(why) => write!(f, "not a valid ELF file: {why}"),
            ElfError::NotX86_64 => f.write_str("ELF is not a 64-bit little-endian x86-64 image"),
            ElfError::NotExecutable => f.write_str("ELF is not an executable (ET_EXEC)"),
            ElfError::NoSegments => f.write_str("ELF has no loadable segment"),
            ElfError::BadSegment { index } => write!(f, "ELF segment {index} is malformed"),
            ElfError::SegmentOutsideRam { index, start, end } => {
                write!(f, "ELF segment {index} at {start:#x}-{end:#x} does not fit the guest's usable RAM")
            }
        }
    }
}

/// Whether `bytes` look like an ELF file (magic only).
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

/// Loads `image`; segments must lie in `[low_limit, mem.size())`. Returns the entry point.
pub fn load(image: &[u8], mem: &GuestMemory, low_limit: u64) -> Result<u64, ElfError> {
    let file = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(|e| ElfError::Parse(parse_error(&e)))?;
    let hdr = &file.ehdr;
    if hdr.class != elf::file::Class::ELF64 || hdr.e_machine != abi::EM_X86_64 {
        return Err(ElfError::NotX86_64);
    }
    if hdr.e_type != abi::ET_EXEC {
        return Err(ElfError::NotExecutable);
    }
    let segments = file.segments().ok_or(ElfError::NoSegments)?;
    let mut loaded = 0;
    for (index, ph) in segments.iter().enumerate() {
        if ph.p_type != abi::PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        let file_end = ph.p_offset.checked_add(ph.p_filesz).ok_or(ElfError::BadSegment { index })?;
        if file_end > image.len() as u64 || ph.p_memsz < ph.p_filesz {
            return Err(ElfError::BadSegment { index });
        }
        let start = ph.p_paddr;
        let end = start.checked_add(ph.p_memsz).ok_or(ElfError::BadSegment { index })?;
        if start < low_limit || !mem.contains(start, ph.p_memsz) {
            return Err(ElfError::SegmentOutsideRam { index, start, end });
        }
        let data = &image[ph.p_offset as usize..file_end as usize];
        mem.write(start, data).map_err(|_| ElfError::SegmentOutsideRam { index, start, end })?;
        mem.zero(start + ph.p_filesz, ph.p_memsz - ph.p_filesz).map_err(|_| ElfError::SegmentOutsideRam {
            index,
            start,
            end,
        })?;
        loaded += 1;
    }
    if loaded == 0 {
        return Err(ElfError::NoSegments);
    }
    Ok(hdr.e_entry)
}

fn parse_error(e: &elf::ParseError) -> &'static str {
    match e {
        elf::ParseError::BadMagic(_) => "bad magic",
        elf::ParseError::UnsupportedElfClass(_) => "unsupported class",
        elf::ParseError::UnsupportedElfEndianness(_) => "unsupported endianness",
        elf::ParseError::UnsupportedVersion(_) => "unsupported version",
        elf::ParseError::SliceReadError(_) | elf::ParseError::TryFromSliceError(_) => "truncated",
        elf::ParseError::IntegerOverflow => "integer overflow in a header field",
        _ => "malformed headers",
    }
}
