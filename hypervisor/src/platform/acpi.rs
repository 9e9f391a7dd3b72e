//! The host's ACPI tables, as far as Vireo needs them: the CPUs the MADT lists.
//!
//! A small hand parser (RSDP -> XSDT or RSDT -> MADT, every checksum verified) over byte
//! slices that a `mem` callback hands out, so it runs on the host in unit tests and never
//! reads outside a table's stated length. (The `acpi` crate was considered: its 5.x MADT
//! iterator loops forever on a zero-length entry and subtracts an entry's length from the
//! bytes left without a check, and its default features need a nightly compiler; firmware
//! tables are input Vireo must survive, so every length here is checked.)
//!
//! Section numbers cite the ACPI Specification 6.5: §5.2.5.3 RSDP, §5.2.6 table header,
//! §5.2.7 RSDT, §5.2.8 XSDT, §5.2.12 MADT (§5.2.12.2 Processor Local APIC, §5.2.12.8 Local
//! APIC Address Override, §5.2.12.12 Processor Local x2APIC).

use core::fmt;

/// Most enabled CPUs kept from the MADT (the rest are counted in [`MadtCpus::dropped`]).
pub const MAX_LISTED: usize = 512;
/// Longest table Vireo reads (a MADT of thousands of CPUs still fits).
const MAX_TABLE_LEN: u32 = 1 << 20;
const HEADER_LEN: usize = 36;

/// Local APIC flags: bit 0 Enabled, bit 1 Online Capable (§5.2.12.2, Table 5.47).
const LAPIC_ENABLED: u32 = 1 << 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// `mem` could not give these bytes (address 0, outside mapped memory, overflow).
    Unreachable {
        what: &'static str,
        addr: u64,
    },
    BadSignature {
        what: &'static str,
        addr: u64,
    },
    BadChecksum {
        what: &'static str,
        addr: u64,
    },
    BadLength {
        what: &'static str,
        addr: u64,
        len: u32,
    },
    NoMadt,
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::Unreachable { what, addr } => write!(f, "{what} at {addr:#x} is outside mapped memory"),
            AcpiError::BadSignature { what, addr } => write!(f, "{what} at {addr:#x} has a wrong signature"),
            AcpiError::BadChecksum { what, addr } => write!(f, "{what} at {addr:#x} has a bad checksum"),
            AcpiError::BadLength { what, addr, len } => write!(f, "{what} at {addr:#x} has a bad length {len}"),
            AcpiError::NoMadt => f.write_str("no valid MADT (APIC) table in the RSDT/XSDT"),
        }
    }
}

/// The enabled CPUs the MADT lists, in table order, without duplicates.
#[derive(Clone, Debug)]
pub struct MadtCpus {
    ids: [u32; MAX_LISTED],
    len: usize,
    /// Physical address of the local APICs (the 32-bit field, or the 64-bit override).
    pub lapic_addr: u64,
    /// Entries that are not enabled (absent or only online-capable CPUs).
    pub disabled: usize,
    /// Enabled entries beyond [`MAX_LISTED`], or repeating an APIC ID already listed.
    pub dropped: usize,
    /// The entry list ended in a malformed entry (length 0, or past the table): what came
    /// before it is kept.
    pub truncated: bool,
}

impl MadtCpus {
    fn new(lapic_addr: u64) -> Self {
        Self { ids: [0; MAX_LISTED], len: 0, lapic_addr, disabled: 0, dropped: 0, truncated: false }
    }

    /// APIC IDs of the enabled CPUs.
    pub fn apic_ids(&self) -> &[u32] {
        &self.ids[..self.len]
    }

    fn push(&mut self, id: u32) {
        if self.apic_ids().contains(&id) || self.len == MAX_LISTED {
            self.dropped += 1;
        } else {
            self.ids[self.len] = id;
            self.len += 1;
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    (u32_at(b, off) as u64) | ((u32_at(b, off + 4) as u64) << 32)
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x)) == 0
}

/// Reads the system description table at `addr` whose signature must be `sig`: header,
/// length bounds, whole-table checksum.
fn table<'a>(
    mem: &impl Fn(u64, usize) -> Option<&'a [u8]>,
    addr: u64,
    sig: &[u8; 4],
    what: &'static str,
) -> Result<&'a [u8], AcpiError> {
    let header = mem(addr, HEADER_LEN).ok_or(AcpiError::Unreachable { what, addr })?;
    if &header[..4] != sig {
        return Err(AcpiError::BadSignature { what, addr });
    }
    let len = u32_at(header, 4);
    if (len as usize) < HEADER_LEN || len > MAX_TABLE_LEN {
        return Err(AcpiError::BadLength { what, addr, len });
    }
    let bytes = mem(addr, len as usize).ok_or(AcpiError::Unreachable { what, addr })?;
    if bytes.len() != len as usize {
        return Err(AcpiError::Unreachable { what, addr });
    }
    if !checksum_ok(bytes) {
        return Err(AcpiError::BadChecksum { what, addr });
    }
    Ok(bytes)
}

/// Finds the MADT from the RSDP at `rsdp_addr` and lists its enabled CPUs. `mem(addr, len)`
/// returns the `len` bytes at physical `addr`, or `None` if they cannot be read.
pub fn find_cpus<'a>(rsdp_addr: u64, mem: impl Fn(u64, usize) -> Option<&'a [u8]>) -> Result<MadtCpus, AcpiError> {
    let madt = find_madt(rsdp_addr, &mem)?;
    Ok(parse_madt(madt))
}

fn find_madt<'a>(rsdp_addr: u64, mem: &impl Fn(u64, usize) -> Option<&'a [u8]>) -> Result<&'a [u8], AcpiError> {
    const RSDP: &str = "RSDP";
    let v1 = mem(rsdp_addr, 20).ok_or(AcpiError::Unreachable { what: RSDP, addr: rsdp_addr })?;
    if &v1[..8] != b"RSD PTR " {
        return Err(AcpiError::BadSignature { what: RSDP, addr: rsdp_addr });
    }
    if !checksum_ok(v1) {
        return Err(AcpiError::BadChecksum { what: RSDP, addr: rsdp_addr });
    }
    let revision = v1[15];
    let rsdt = u32_at(v1, 16) as u64;
    // ACPI 2.0+: the 36-byte RSDP with the XSDT address and an extended checksum.
    let mut xsdt = 0;
    if revision >= 2 {
        let v2 = mem(rsdp_addr, 36).ok_or(AcpiError::Unreachable { what: RSDP, addr: rsdp_addr })?;
        let len = u32_at(v2, 20);
        if len < 36 {
            return Err(AcpiError::BadLength { what: RSDP, addr: rsdp_addr, len });
        }
        if !checksum_ok(v2) {
            return Err(AcpiError::BadChecksum { what: RSDP, addr: rsdp_addr });
        }
        xsdt = u64_at(v2, 24);
    }
    let (root, entry_size) =
        if xsdt != 0 { (table(mem, xsdt, b"XSDT", "XSDT")?, 8) } else { (table(mem, rsdt, b"RSDT", "RSDT")?, 4) };
    let mut first_error = None;
    for entry in root[HEADER_LEN..].chunks_exact(entry_size) {
        let addr = if entry_size == 8 { u64_at(entry, 0) } else { u32_at(entry, 0) as u64 };
        // Peek at the signature only; other tables are none of Vireo's business.
        match mem(addr, 4) {
            Some(sig) if sig == b"APIC" => match table(mem, addr, b"APIC", "MADT") {
                Ok(t) if t.len() >= HEADER_LEN + 8 => return Ok(t),
                Ok(t) => first_error = Some(AcpiError::BadLength { what: "MADT", addr, len: t.len() as u32 }),
                Err(e) => first_error = first_error.or(Some(e)),
            },
            _ => {}
        }
    }
    Err(first_error.unwrap_or(AcpiError::NoMadt))
}

/// Lists the enabled CPUs of a checked MADT (header, then the 32-bit local APIC address
/// and the flags, then the interrupt controller structures).
pub fn parse_madt(madt: &[u8]) -> MadtCpus {
    let mut cpus = MadtCpus::new(u32_at(madt, HEADER_LEN) as u64);
    let mut off = HEADER_LEN + 8;
    while off < madt.len() {
        if off + 2 > madt.len() {
            cpus.truncated = true;
            break;
        }
        let (kind, len) = (madt[off], madt[off + 1] as usize);
        let Some(entry) = madt.get(off..off + len).filter(|_| len >= 2) else {
            cpus.truncated = true;
            break;
        };
        match kind {
            // Processor Local APIC: UID, APIC ID, flags.
            0 if len >= 8 => {
                if u32_at(entry, 4) & LAPIC_ENABLED != 0 {
                    cpus.push(entry[3] as u32);
                } else {
                    cpus.disabled += 1;
                }
            }
            // Local APIC Address Override: the 64-bit address.
            5 if len >= 12 => cpus.lapic_addr = u64_at(entry, 4),
            // Processor Local x2APIC: reserved, x2APIC ID, flags, UID.
            9 if len >= 16 => {
                if u32_at(entry, 8) & LAPIC_ENABLED != 0 {
                    cpus.push(u32_at(entry, 4));
                } else {
                    cpus.disabled += 1;
                }
            }
            _ => {}
        }
        off += len;
    }
    cpus
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::acpi::{build, AcpiConfig, MAX_LEN};

    const BASE: u64 = 0xE_0000;

    /// Tables built by Vireo's own guest ACPI builder, read back through `mem`.
    fn tables(cpus: u32, x2apic: bool) -> (Vec<u8>, u64) {
        let mut buf = vec![0u8; MAX_LEN];
        let config = AcpiConfig { x2apic, ..AcpiConfig::pc(cpus) };
        let (rsdp, used) = build(&config, BASE, &mut buf).unwrap();
        buf.truncate(used);
        (buf, rsdp)
    }

    fn reader<'a>(buf: &'a [u8]) -> impl Fn(u64, usize) -> Option<&'a [u8]> + 'a {
        move |addr, len| {
            let off = addr.checked_sub(BASE)? as usize;
            buf.get(off..off.checked_add(len)?)
        }
    }

    fn find(buf: &[u8], rsdp: u64) -> Result<MadtCpus, AcpiError> {
        find_cpus(rsdp, reader(buf))
    }

    fn madt_offset(buf: &[u8]) -> usize {
        buf.windows(4).position(|w| w == b"APIC").unwrap()
    }

    fn fix_checksum(buf: &mut [u8], table: usize) {
        let len = u32_at(buf, table + 4) as usize;
        buf[table + 9] = 0;
        let sum = buf[table..table + len].iter().fold(0u8, |s, &x| s.wrapping_add(x));
        buf[table + 9] = 0u8.wrapping_sub(sum);
    }

    #[test]
    fn lists_local_apics_and_x2apics() {
        for x2apic in [false, true] {
            let (buf, rsdp) = tables(4, x2apic);
            let cpus = find(&buf, rsdp).unwrap();
            assert_eq!(cpus.apic_ids(), &[0, 1, 2, 3], "x2apic={x2apic}");
            assert_eq!(cpus.lapic_addr, 0xFEE0_0000);
            assert_eq!((cpus.disabled, cpus.dropped, cpus.truncated), (0, 0, false));
        }
    }

    #[test]
    fn rsdt_only_rsdp_v1() {
        let (mut buf, rsdp) = tables(2, false);
        // Turn the RSDP into revision 0 (ACPI 1.0): only the RSDT is used.
        let r = (rsdp - BASE) as usize;
        buf[r + 15] = 0;
        buf[r + 8] = 0;
        let sum = buf[r..r + 20].iter().fold(0u8, |s, &x| s.wrapping_add(x));
        buf[r + 8] = 0u8.wrapping_sub(sum);
        assert_eq!(find(&buf, rsdp).unwrap().apic_ids(), &[0, 1]);
    }

    #[test]
    fn disabled_and_duplicate_entries() {
        let (mut buf, rsdp) = tables(3, false);
        let m = madt_offset(&buf);
        // Entries start at 44; each Processor Local APIC is 8 bytes: clear CPU 1's enable bit,
        // give CPU 2 CPU 0's ID.
        buf[m + 44 + 8 + 4] = 0;
        buf[m + 44 + 16 + 3] = 0;
        fix_checksum(&mut buf, m);
        let cpus = find(&buf, rsdp).unwrap();
        assert_eq!(cpus.apic_ids(), &[0]);
        assert_eq!((cpus.disabled, cpus.dropped), (1, 1));
    }

    #[test]
    fn bad_tables_are_errors_not_panics() {
        let (buf, rsdp) = tables(2, false);
        // Wrong RSDP address, bad RSDP checksum, bad MADT checksum.
        assert!(matches!(find(&buf, rsdp + 16), Err(AcpiError::BadSignature { .. } | AcpiError::Unreachable { .. })));
        let mut b = buf.clone();
        b[(rsdp - BASE) as usize + 9] ^= 0x55;
        assert!(matches!(find(&b, rsdp), Err(AcpiError::BadChecksum { what: "RSDP", .. })));
        let mut b = buf.clone();
        let m = madt_offset(&b);
        b[m + 40] ^= 1;
        assert!(matches!(find(&b, rsdp), Err(AcpiError::BadChecksum { what: "MADT", .. })));
        // A MADT whose length runs past readable memory.
        let mut b = buf.clone();
        b[m + 4..m + 8].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert!(find(&b, rsdp).is_err());
        // Nothing readable at all.
        assert!(matches!(find_cpus(0x1000, |_, _| None), Err(AcpiError::Unreachable { .. })));
    }

    #[test]
    fn malformed_entries_truncate() {
        let (mut buf, rsdp) = tables(3, false);
        let m = madt_offset(&buf);
        // CPU 1's entry claims length 0: parsing stops there, CPU 0 is kept.
        buf[m + 44 + 8 + 1] = 0;
        fix_checksum(&mut buf, m);
        let cpus = find(&buf, rsdp).unwrap();
        assert_eq!(cpus.apic_ids(), &[0]);
        assert!(cpus.truncated);
        // An entry longer than what is left of the table.
        let (mut buf, rsdp) = tables(1, false);
        let m = madt_offset(&buf);
        buf[m + 44 + 1] = 0xFF;
        fix_checksum(&mut buf, m);
        let cpus = find(&buf, rsdp).unwrap();
        assert!(cpus.truncated && cpus.apic_ids().is_empty());
    }

    #[test]
    fn arbitrary_madt_bytes_never_panic() {
        let mut state = 0x9E37_79B9_u32;
        for round in 0..3000 {
            let len = HEADER_LEN + 8 + (round % 97);
            let mut t = vec![0u8; len];
            for b in t.iter_mut().skip(HEADER_LEN) {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                *b = (state % 7) as u8 * if state & 0x100 != 0 { 1 } else { 37 };
            }
            let cpus = parse_madt(&t);
            assert!(cpus.apic_ids().len() <= MAX_LISTED);
        }
    }
}
