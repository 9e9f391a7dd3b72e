//! Reading guest-physical memory through the VM's EPT tables (SDM Vol. 3C §29.3.2), for the
//! few things VMX makes the backend fetch itself: the four PAE PDPTEs a VM entry loads from
//! the VMCS when the guest uses PAE paging (SDM Vol. 3C §27.3.2.4).
//!
//! The walk is pure over a `read` function (host-physical address -> u64), so it is tested
//! on the host; on the hardware `read` is a load through Vireo's identity map.

/// EPT entry bits 2:0 (read, write, execute): any set = present.
const EPT_RWX: u64 = 0b111;
/// Bit 7 in a PDPTE/PDE: maps a 1 GiB / 2 MiB page.
const EPT_LARGE: u64 = 1 << 7;
/// Bits 51:12: the next table or the page frame.
const EPT_ADDR: u64 = 0x000F_FFFF_FFFF_F000;

/// The host-physical address of guest-physical `gpa` under the EPT at `root` (the PML4
/// frame), or `None` if not mapped readable.
pub fn translate(root: u64, gpa: u64, read: &impl Fn(u64) -> u64) -> Option<u64> {
    let mut table = root & EPT_ADDR;
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (gpa >> shift) & 0x1FF;
        let entry = read(table + index * 8);
        if entry & EPT_RWX == 0 {
            return None;
        }
        if level == 1 || ((level == 2 || level == 3) && entry & EPT_LARGE != 0) {
            if entry & 1 == 0 {
                return None; // not readable
            }
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & EPT_ADDR & !page_mask) | (gpa & page_mask));
        }
        table = entry & EPT_ADDR;
    }
    None
}

/// The four PDPTEs at guest CR3 (bits 31:5 locate the 32-byte table; SDM Vol. 3A §4.4.1).
pub fn pdptes(root: u64, cr3: u64, read: &impl Fn(u64) -> u64) -> Option<[u64; 4]> {
    let base = cr3 & 0xFFFF_FFE0;
    // The 32-byte-aligned table never crosses a page.
    let host = translate(root, base, read)?;
    Some([read(host), read(host + 8), read(host + 16), read(host + 24)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn walks_4k_2m_and_1g_mappings() {
        let mut mem: HashMap<u64, u64> = HashMap::new();
        // PML4 at 0x1000 -> PDPT at 0x2000.
        mem.insert(0x1000, 0x2000 | 7);
        // PDPT[0] -> PD at 0x3000; PDPT[1] = 1 GiB page at host 0x8000_0000.
        mem.insert(0x2000, 0x3000 | 7);
        mem.insert(0x2008, 0x8000_0000 | EPT_LARGE | 7);
        // PD[0] -> PT at 0x4000; PD[1] = 2 MiB page at host 0x60_0000.
        mem.insert(0x3000, 0x4000 | 7);
        mem.insert(0x3008, 0x60_0000 | EPT_LARGE | 7);
        // PT[5] = 4 KiB page at host 0x9000; PT[6] execute-only.
        mem.insert(0x4028, 0x9000 | 7);
        mem.insert(0x4030, 0xA000 | 4);
        let read = |a: u64| mem.get(&a).copied().unwrap_or(0);
        assert_eq!(translate(0x1000, 0x5123, &read), Some(0x9123));
        assert_eq!(translate(0x1000, 0x6000, &read), None);
        assert_eq!(translate(0x1000, 0x7000, &read), None);
        assert_eq!(translate(0x1000, 0x20_1234, &read), Some(0x60_1234));
        assert_eq!(translate(0x1000, 0x4000_0010, &read), Some(0x8000_0010));
        assert_eq!(translate(0x1000, 0x8000_0000, &read), None);
    }

    #[test]
    fn reads_pdptes() {
        let mut mem: HashMap<u64, u64> = HashMap::new();
        mem.insert(0x1000, 0x2000 | 7);
        mem.insert(0x2000, 0x3000 | 7);
        mem.insert(0x3000, 0x4000 | 7);
        mem.insert(0x4000, 0x7000 | 7); // gpa 0x0000 -> host 0x7000
        for i in 0..4 {
            mem.insert(0x7020 + i * 8, 0x10_0001 + i * 0x1000);
        }
        let read = |a: u64| mem.get(&a).copied().unwrap_or(0);
        assert_eq!(pdptes(0x1000, 0x20, &read), Some([0x10_0001, 0x10_1001, 0x10_2001, 0x10_3001]));
    }
}
