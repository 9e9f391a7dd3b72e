//! Guest page-table walks: guest-virtual to guest-physical, as the guest's own MMU would
//! translate (SDM Vol. 3A §4.5, 4-level paging; §4.4 PAE; §4.3 32-bit paging), for
//! instruction fetches and operands the core must emulate.

/// Reads guest-physical memory for the walker (8-byte aligned entries).
pub trait PhysRead {
    fn read_phys_u64(&self, gpa: u64) -> Option<u64>;
}

/// The guest's paging controls at the moment of the walk.
#[derive(Clone, Copy, Debug)]
pub struct GuestPaging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Why a walk failed: the guest should see a #PF with this error code, or the tables point
/// outside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// Not present at some level (#PF error code bit 0 clear).
    NotPresent,
    /// A paging-structure entry lies outside guest RAM.
    TableOutsideRam { gpa: u64 },
    /// A paging mode Vireo does not walk yet.
    Unsupported(&'static str),
}

const PRESENT: u64 = 1 << 0;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_PSE: u64 = 1 << 4;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// Translates `gva` to a guest-physical address.
pub fn translate(mem: &impl PhysRead, paging: GuestPaging, gva: u64) -> Result<u64, WalkError> {
    if paging.cr0 & CR0_PG == 0 {
        return Ok(if paging.efer & EFER_LMA != 0 { gva } else { gva & 0xFFFF_FFFF });
    }
    let read = |gpa: u64| mem.read_phys_u64(gpa).ok_or(WalkError::TableOutsideRam { gpa });
    if paging.efer & EFER_LMA != 0 {
        if paging.cr4 & CR4_LA57 != 0 {
            return Err(WalkError::Unsupported("5-level paging"));
        }
        // PML4 -> PDPT -> PD -> PT; PS at PDPT (1 GiB) and PD (2 MiB).
        let mut table = paging.cr3 & ADDR;
        for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] {
            let entry = read(table + ((gva >> shift) & 0x1FF) * 8)?;
            if entry & PRESENT == 0 {
                return Err(WalkError::NotPresent);
            }
            if level == 1 || (level <= 3 && entry & PS != 0) {
                let page_mask = (1u64 << shift) - 1;
                return Ok((entry & ADDR & !page_mask) | (gva & page_mask));
            }
            table = entry & ADDR;
        }
        unreachable!("the level-1 entry always returns");
    } else if paging.cr4 & CR4_PAE != 0 {
        // PAE: 4 PDPTEs at CR3[31:5], then PD and PT with 8-byte entries.
        let gva = gva & 0xFFFF_FFFF;
        let pdpte = read((paging.cr3 & 0xFFFF_FFE0) + ((gva >> 30) & 3) * 8)?;
        if pdpte & PRESENT == 0 {
            return Err(WalkError::NotPresent);
        }
        let pde = read((pdpte & ADDR) + ((gva >> 21) & 0x1FF) * 8)?;
        if pde & PRESENT == 0 {
            return Err(WalkError::NotPresent);
        }
        if pde & PS != 0 {
            return Ok((pde & ADDR & !0x1F_FFFF) | (gva & 0x1F_FFFF));
        }
        let pte = read((pde & ADDR) + ((gva >> 12) & 0x1FF) * 8)?;
        if pte & PRESENT == 0 {
            return Err(WalkError::NotPresent);
        }
        Ok((pte & ADDR) | (gva & 0xFFF))
    } else {
        // 32-bit paging: 4-byte entries; read the aligned u64 holding the entry.
        let gva = gva & 0xFFFF_FFFF;
        let read32 = |gpa: u64| read(gpa & !7).map(|q| if gpa & 4 != 0 { q >> 32 } else { q & 0xFFFF_FFFF });
        let pde = read32((paging.cr3 & 0xFFFF_F000) + ((gva >> 22) & 0x3FF) * 4)?;
        if pde & PRESENT == 0 {
            return Err(WalkError::NotPresent);
        }
        if pde & PS != 0 && paging.cr4 & CR4_PSE != 0 {
            return Ok((pde & 0xFFC0_0000) | ((pde & 0x1FE000) << 19) | (gva & 0x3F_FFFF));
        }
        let pte = read32((pde & 0xFFFF_F000) + ((gva >> 12) & 0x3FF) * 4)?;
        if pte & PRESENT == 0 {
            return Err(WalkError::NotPresent);
        }
        Ok((pte & 0xFFFF_F000) | (gva & 0xFFF))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Mem(HashMap<u64, u64>);
    impl PhysRead for Mem {
        fn read_phys_u64(&self, gpa: u64) -> Option<u64> {
            if gpa >= 0x100_0000 {
                return None;
            }
            Some(*self.0.get(&gpa).unwrap_or(&0))
        }
    }

    const LONG: GuestPaging = GuestPaging { cr0: CR0_PG | 1, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LMA | (1 << 8) };

    #[test]
    fn long_mode_4k_2m_1g() {
        let mut m = HashMap::new();
        m.insert(0x1000, 0x2000 | 3); // PML4[0]
        m.insert(0x2000, 0x3000 | 3); // PDPT[0] -> PD
        m.insert(0x2008, 0x4000_0000 | 0x83); // PDPT[1]: 1 GiB page at 1 GiB
        m.insert(0x3000, 0x4000 | 3); // PD[0] -> PT
        m.insert(0x3008, 0x60_0000 | 0x83); // PD[1]: 2 MiB page at 6 MiB
        m.insert(0x4000 + 5 * 8, 0x9000 | 3); // PT[5]
        let mem = Mem(m);
        assert_eq!(translate(&mem, LONG, 0x5123), Ok(0x9123));
        assert_eq!(translate(&mem, LONG, 0x20_0000 + 0x1234), Ok(0x60_1234));
        assert_eq!(translate(&mem, LONG, 0x4000_0000 + 0x12_3456), Ok(0x4012_3456));
        assert_eq!(translate(&mem, LONG, 0x6000), Err(WalkError::NotPresent));
        assert_eq!(translate(&mem, LONG, 0x80_0000_0000), Err(WalkError::NotPresent));
    }

    #[test]
    fn tables_outside_ram_are_reported() {
        let mut m = HashMap::new();
        m.insert(0x1000, 0x200_0000 | 3);
        assert_eq!(translate(&Mem(m), LONG, 0), Err(WalkError::TableOutsideRam { gpa: 0x200_0000 }));
    }

    #[test]
    fn paging_off_and_pae_and_legacy() {
        let mem = Mem(HashMap::new());
        let off = GuestPaging { cr0: 1, cr3: 0, cr4: 0, efer: 0 };
        assert_eq!(translate(&mem, off, 0x1_2345_6789), Ok(0x2345_6789));
        let mut m = HashMap::new();
        m.insert(0x1000, 0x5000 | 1); // PDPTE 0
        m.insert(0x5000 + 8, 0x40_0000 | 0x83); // PDE 1 -> 2 MiB at 4 MiB
        let pae = GuestPaging { cr0: CR0_PG | 1, cr3: 0x1000, cr4: CR4_PAE, efer: 0 };
        assert_eq!(translate(&Mem(m), pae, 0x20_0010), Ok(0x40_0010));
        let mut m = HashMap::new();
        m.insert(0x1000, (0x6000 | 1) << 32); // PDE 1 (upper half of the u64 at 0x1000)
        m.insert(0x6000, 0x7000 | 1); // PTE 0 of that table (lower half)
        let legacy = GuestPaging { cr0: CR0_PG | 1, cr3: 0x1000, cr4: 0, efer: 0 };
        assert_eq!(translate(&Mem(m), legacy, 0x40_0abc), Ok(0x7abc));
    }
}
