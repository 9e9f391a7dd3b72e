//! The ACPI tables Vireo gives a VM, so that an unmodified Linux finds its platform: the CPUs
//! and the I/O APIC (MADT), the fixed-hardware power-management registers, the reset register
//! and the SCI (FADT), soft-off (`\_S5` in the DSDT) and the PCI root bridge (`\_SB.PCI0`
//! in the DSDT).
//!
//! [`build`] writes, into one buffer that the caller copies to guest memory:
//!
//! | table | size in bytes (n = CPUs)                 | guest-physical alignment |
//! |-------|------------------------------------------|--------------------------|
//! | RSDP  | 36                                       | 16                       |
//! | FACS  | 64                                       | 64                       |
//! | XSDT  | 36 + 2 * 8 = 52                          | 16                       |
//! | FADT  | 276 (revision 6)                         | 16                       |
//! | MADT  | 44 + n * 8 + 12 + 2 * 10 + 6 (xAPIC)     | 16                       |
//! |       | 44 + n * 16 + 12 + 2 * 10 + 12 (x2APIC)  |                          |
//! | DSDT  | 36 + 26 (AML), + 1739 with the PCI root  | 16                       |
//! | RSDT  | 36 + 2 * 4 = 44, only below 4 GiB        | 16                       |
//!
//! in that order, with zero padding between them; all of it fits [`MAX_LEN`]. The RSDP points
//! at the XSDT (and at the RSDT when every table lies below 4 GiB); the XSDT lists the FADT
//! and the MADT; the FADT points at the FACS and the DSDT.
//!
//! The platform described is a PC without SMM: SMI_CMD is 0, so ACPI mode is always on (the
//! OS never hands over from legacy mode, and the PM1 control register's SCI_EN bit must read 1),
//! with one PM1a event block, one PM1a control block, a 24-bit PM timer, no GPE blocks, no
//! fixed power or sleep button, a reset register in system I/O space, and a dual 8259. No
//! 8042 keyboard controller is declared (IAPC_BOOT_ARCH bit 1 clear): the VMM's ports
//! 0x60/0x64 only carry the reset line, and an 8042 declared but unable to answer costs a
//! Linux guest its i8042 probe's timeout (about 0.5 s: "Can't read CTR while initializing
//! i8042"). The module only builds bytes; emulating those registers is the caller's.
//!
//! What the VMM must provide for Linux to use these tables (checked by booting Debian's Linux
//! 6.1 cloud kernel in QEMU q35 on them; see the dump test):
//! - boot_params.acpi_rsdp_addr = the returned RSDP address, and the buffer's range reported
//!   as E820 ACPI (type 3) or NVS (type 4) memory.
//! - PM1a control (`pm1a_cnt`, 16 bits): SCI_EN reads 1; a write with SLP_EN set and SLP_TYP
//!   = [`SLP_TYP_S5`] powers off ([`sleep_request`] decodes it).
//! - PM1a status/enable (`pm1a_evt`, two 16-bit registers): status is write-1-to-clear,
//!   enable is plain read/write. ACPICA enables GBL_EN and rtc-cmos toggles RTC_EN and reads
//!   them back; bits that do not stick give "Could not enable GlobalLock event" and similar
//!   errors.
//! - PM timer (`pm_tmr`, 32-bit reads): a free-running 24-bit count at [`PM_TIMER_HZ`].
//! - The SCI: I/O APIC pin `sci_irq`, level-triggered, active-high, asserted while
//!   PM1 status & enable is non-zero. IRQ 0 (the 8254) is I/O APIC pin 2.
//! - `reset_value` written to `reset_port` (one byte) resets the VM.
//! - With [`AcpiConfig::pci`] the DSDT declares the PCI root bridge `\_SB.PCI0` ([`PciRoot`]):
//!   configuration mechanism #1 at 0xCF8/0xCFC, nothing mapped in its MMIO window, and the
//!   I/O APIC pins of its `_PRT` (GSIs 16-19) level-triggered, active-low, idle high. Without
//!   it ACPI-mode Linux scans no PCI bus at all.
//! - The DSDT declares no processor objects (`Processor`/`Device (ACPI0007)`): Linux counts
//!   and starts CPUs from the MADT alone (arch/x86/kernel/acpi/boot.c); processor objects
//!   only serve the ACPI processor driver (idle states, performance states, throttling),
//!   which then stays unbound. Every vCPU is an enabled type-0 entry (APIC ID = UID = index),
//!   up to the VM line's 16 vCPUs; type-9 x2APIC entries only with `x2apic`.
//!
//! Section numbers cite the ACPI Specification 6.3, whose FADT (6.3) and MADT (5) revisions
//! are written here; the AML encodings are from its chapter 20.

use super::le::PutLe;
use acpi_tables::{aml, Aml};
use alloc::vec::Vec;
use core::fmt;

/// What [`build`] describes. [`AcpiConfig::pc`] gives the conventional PC values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs, 1..=255; vCPU `i` has APIC ID `i` and ACPI processor UID `i`.
    pub cpus: u32,
    /// Describe the CPUs with Processor Local x2APIC structures (MADT type 9) instead of
    /// Processor Local APIC structures (type 0).
    pub x2apic: bool,
    /// I/O APIC MMIO base; below 4 GiB, 4 KiB-aligned (conventionally 0xFEC0_0000).
    pub ioapic_addr: u64,
    /// The I/O APIC's ID.
    pub ioapic_id: u8,
    /// Local APIC MMIO base; below 4 GiB, 4 KiB-aligned (conventionally 0xFEE0_0000).
    pub lapic_addr: u64,
    /// I/O port of the PM1a event block (4 bytes: PM1 status, then PM1 enable); non-zero,
    /// 4-byte aligned.
    pub pm1a_evt: u16,
    /// I/O port of the PM1a control block (2 bytes); non-zero, 4-byte aligned.
    pub pm1a_cnt: u16,
    /// I/O port of the 24-bit PM timer (4 bytes), 4-byte aligned; 0 = no PM timer.
    pub pm_tmr: u16,
    /// ISA IRQ of the SCI (1..=15, not 2); it is routed to the same GSI, level-triggered,
    /// active-high.
    pub sci_irq: u8,
    /// I/O port of the reset register (one byte); 0 = no reset register.
    pub reset_port: u16,
    /// Value the OS writes to `reset_port` to reset the machine.
    pub reset_value: u8,
    /// Declare a PCI host bridge `\_SB.PCI0` in the DSDT (see [`PciRoot`]); `None`: no PCI
    /// bus in the namespace (Linux then scans none).
    pub pci: Option<PciRoot>,
}

/// The PCI root bridge the DSDT declares: `\_SB.PCI0`, `_HID` PNP0A03 (a PCI host bridge,
/// PCI Firmware Specification 3.2 §4.1.1), segment 0, bus 0, reached through configuration
/// mechanism #1 (`devices::pci`).
///
/// Its `_CRS` (ACPI 6.3 §6.2.2, §6.4.3.5) hands the bridge, as a producer, the bus numbers
/// 0-255, the I/O ports outside the configuration mechanism's 0xCF8-0xCFF ([`PCI_IO_WINDOWS`]),
/// which it also consumes, and `mmio32` for BARs; its `_PRT` (ACPI 6.3 §6.2.13) routes pin
/// INTA-INTD of every device 0-31 straight to an I/O APIC GSI (no link devices), with the
/// classic swizzle [`pci_intx_gsi`]. Linux takes such GSIs as level-triggered, active-low
/// (drivers/acpi/pci_irq.c: `acpi_pci_irq_enable` for a _PRT entry without a source), as PCI
/// INTx is, so the MADT needs no overrides for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciRoot {
    /// The 32-bit memory window for BARs; `None` when RAM leaves no room below the I/O APIC.
    pub mmio32: Option<MmioWindow>,
}

/// An inclusive range of guest-physical addresses below 4 GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioWindow {
    pub base: u32,
    /// The last byte (inclusive), as `_CRS` address descriptors write it.
    pub last: u32,
}

/// The PCI 32-bit memory window starts at 3 GiB or above RAM, whichever is higher.
pub const PCI_MMIO32_FLOOR: u64 = 0xC000_0000;
/// The window ends below the I/O APIC page (0xFEC0_0000) and the local APICs.
pub const PCI_MMIO32_LAST: u32 = 0xFEBF_FFFF;
/// The I/O windows of the root bridge: every port but CONFIG_ADDRESS/CONFIG_DATA (0xCF8-0xCFF).
pub const PCI_IO_WINDOWS: [(u16, u16); 2] = [(0x0000, 0x0CF7), (0x0D00, 0xFFFF)];
/// The first of the four GSIs PCI INTx lines are routed to (I/O APIC pins 16-19: the ISA
/// IRQs keep 0-15).
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// Devices 0-31 of bus 0 are described in `_PRT`.
pub const PCI_DEVICES: u8 = 32;

/// The GSI that pin `pin` (0 = INTA .. 3 = INTD) of device `device` on bus 0 raises: the
/// swizzle of PCI-to-PCI Bridge Architecture 1.2 §9.1, (device + pin) mod 4, from GSI 16.
pub const fn pci_intx_gsi(device: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + ((device as u32 + pin as u32) % 4)
}

/// The 32-bit MMIO window for a VM whose RAM is `[0, ram_top)`: from the higher of 3 GiB and
/// `ram_top` (rounded up to 1 MiB) to [`PCI_MMIO32_LAST`]; `None` if RAM reaches that far.
/// Nothing else may be mapped there: the guest's BARs go into it.
pub fn pci_mmio32_window(ram_top: u64) -> Option<MmioWindow> {
    let base = ram_top.checked_next_multiple_of(1 << 20)?.max(PCI_MMIO32_FLOOR);
    let base = u32::try_from(base).ok().filter(|b| *b < PCI_MMIO32_LAST)?;
    Some(MmioWindow { base, last: PCI_MMIO32_LAST })
}

impl AcpiConfig {
    /// `cpus` xAPIC vCPUs on the conventional PC layout: I/O APIC ID 0 at 0xFEC0_0000, local
    /// APICs at 0xFEE0_0000, PM registers at 0x600 (event), 0x604 (control), 0x608 (timer),
    /// SCI on IRQ 9, reset by writing 0x06 to port 0xCF9 (the PIIX/ICH reset control register).
    pub const fn pc(cpus: u32) -> Self {
        AcpiConfig {
            cpus,
            x2apic: false,
            ioapic_addr: 0xFEC0_0000,
            ioapic_id: 0,
            lapic_addr: 0xFEE0_0000,
            pm1a_evt: 0x600,
            pm1a_cnt: 0x604,
            pm_tmr: 0x608,
            sci_irq: 9,
            reset_port: 0xCF9,
            reset_value: 0x06,
            pci: None,
        }
    }

    /// [`AcpiConfig::pc`] with the PCI root bridge of a VM whose RAM is `[0, ram_top)`.
    pub fn pc_with_pci(cpus: u32, ram_top: u64) -> Self {
        AcpiConfig { pci: Some(PciRoot { mmio32: pci_mmio32_window(ram_top) }), ..Self::pc(cpus) }
    }

    fn validate(&self) -> Result<(), AcpiError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(AcpiError::BadCpuCount(self.cpus));
        }
        let mmio_ok = |addr: u64| addr != 0 && addr <= u64::from(u32::MAX) && addr.is_multiple_of(0x1000);
        if !mmio_ok(self.ioapic_addr) {
            return Err(AcpiError::BadConfig("ioapic_addr must be non-zero, below 4 GiB and 4 KiB-aligned"));
        }
        if !mmio_ok(self.lapic_addr) {
            return Err(AcpiError::BadConfig("lapic_addr must be non-zero, below 4 GiB and 4 KiB-aligned"));
        }
        // ACPI 6.3 §4.8.3.1, §4.8.3.2: register groupings sit at 32-bit aligned addresses.
        if self.pm1a_evt == 0 || !self.pm1a_evt.is_multiple_of(4) {
            return Err(AcpiError::BadConfig("pm1a_evt must be non-zero and 4-byte aligned"));
        }
        if self.pm1a_cnt == 0 || !self.pm1a_cnt.is_multiple_of(4) {
            return Err(AcpiError::BadConfig("pm1a_cnt must be non-zero and 4-byte aligned"));
        }
        if !self.pm_tmr.is_multiple_of(4) {
            return Err(AcpiError::BadConfig("pm_tmr must be 4-byte aligned"));
        }
        // IRQ 0 is the timer (overridden to GSI 2) and IRQ 2 the 8259 cascade.
        if self.sci_irq == 0 || self.sci_irq == 2 || self.sci_irq > 15 {
            return Err(AcpiError::BadConfig("sci_irq must be an ISA IRQ other than 0 and 2"));
        }
        if let Some(w) = self.pci.and_then(|p| p.mmio32) {
            let below = |addr: u64| u64::from(w.last) < addr;
            if w.base > w.last || !below(self.ioapic_addr) || !below(self.lapic_addr) {
                return Err(AcpiError::BadConfig("the PCI MMIO window must be non-empty and below the APICs"));
            }
        }
        Ok(())
    }
}

/// Why [`build`] wrote nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// `cpus` is outside 1..=255.
    BadCpuCount(u32),
    /// A configuration field is out of range; the text says which and why.
    BadConfig(&'static str),
    /// The tables need `needed` bytes from the start of the buffer; it has `have`.
    BufferTooSmall { needed: usize, have: usize },
    /// The tables would run past the end of the 64-bit guest-physical address space.
    AddressOverflow,
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::BadCpuCount(n) => write!(f, "ACPI tables: {n} CPUs (1..={MAX_CPUS} supported)"),
            AcpiError::BadConfig(why) => write!(f, "ACPI tables: {why}"),
            AcpiError::BufferTooSmall { needed, have } => {
                write!(f, "ACPI tables need {needed} bytes, the buffer has {have}")
            }
            AcpiError::AddressOverflow => f.write_str("ACPI tables would end beyond the guest-physical address space"),
        }
    }
}

/// The most CPUs the tables describe: APIC IDs 0..=254 (xAPIC ID 0xFF is the broadcast ID).
pub const MAX_CPUS: u32 = 255;

/// An upper bound of the bytes [`build`] uses, for any valid configuration and any `base`.
pub const MAX_LEN: usize = 0x2000;

/// OEM ID in the RSDP and in every table header (6 bytes, space-padded).
pub const OEM_ID: [u8; 6] = *b"VIREO ";
/// OEM Table ID in every table header (8 bytes).
const OEM_TABLE_ID: [u8; 8] = *b"VIREOVM ";
const OEM_REVISION: u32 = 1;
/// Creator ID: the vendor ID of the tool that built the table (4 bytes).
const CREATOR_ID: [u8; 4] = *b"VIRO";
const CREATOR_REVISION: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Fixed-hardware registers, for the device model that emulates them.

/// The PM timer counts at 3.579545 MHz (ACPI 6.3 §4.8.2.1).
pub const PM_TIMER_HZ: u32 = 3_579_545;
/// The PM timer is 24 bits wide (FADT TMR_VAL_EXT = 0): it reads `ticks & PM_TIMER_MASK`, and
/// TMR_STS is set whenever bit 23 changes.
pub const PM_TIMER_MASK: u32 = if FADT_FIXED_FLAGS & fadt::TMR_VAL_EXT != 0 { u32::MAX } else { 0x00FF_FFFF };

/// FADT Fixed Feature Flags (ACPI 6.3 §5.2.9) whatever the configuration:
/// - WBINVD: WBINVD works (flushes and invalidates all caches); PROC_C1: HLT on every CPU.
/// - PWR_BUTTON, SLP_BUTTON: no fixed-hardware buttons, so the OS installs no handler for
///   PWRBTN_STS/SLPBTN_STS and no button device appears.
/// - FIX_RTC: no RTC wake status in PM1 (no wake from sleep states at all).
/// - TMR_VAL_EXT clear: the PM timer is 24 bits.
/// - FORCE_APIC_PHYSICAL_DESTINATION_MODE: Linux then picks physflat (xAPIC) or x2apic_phys,
///   so the local APICs never need logical destinations.
///
/// RESET_REG_SUP is added when there is a reset register.
const FADT_FIXED_FLAGS: u32 = fadt::WBINVD
    | fadt::PROC_C1
    | fadt::PWR_BUTTON
    | fadt::SLP_BUTTON
    | fadt::FIX_RTC
    | fadt::FORCE_APIC_PHYSICAL_DESTINATION_MODE;

/// PM1 event block length: a 16-bit status register, then a 16-bit enable register
/// (ACPI 6.3 §4.8.3.1).
pub const PM1_EVT_LEN: u8 = 4;
/// PM1 control block length (ACPI 6.3 §4.8.3.2).
pub const PM1_CNT_LEN: u8 = 2;
/// PM timer block length (ACPI 6.3 §4.8.3.3).
pub const PM_TMR_LEN: u8 = 4;

/// PM1 status bits (ACPI 6.3 §4.8.3.1.1): write 1 to clear. The SCI is asserted (level) while
/// `status & enable` is non-zero.
pub const PM1_STS_TMR: u16 = 1 << 0;
pub const PM1_STS_BM: u16 = 1 << 4;
pub const PM1_STS_GBL: u16 = 1 << 5;
pub const PM1_STS_PWRBTN: u16 = 1 << 8;
pub const PM1_STS_SLPBTN: u16 = 1 << 9;
pub const PM1_STS_RTC: u16 = 1 << 10;
pub const PM1_STS_WAK: u16 = 1 << 15;
/// PM1 enable bits (ACPI 6.3 §4.8.3.1.2), at the same positions as their status bits.
pub const PM1_EN_TMR: u16 = 1 << 0;
pub const PM1_EN_GBL: u16 = 1 << 5;
pub const PM1_EN_PWRBTN: u16 = 1 << 8;
pub const PM1_EN_SLPBTN: u16 = 1 << 9;
pub const PM1_EN_RTC: u16 = 1 << 10;

/// PM1 control bits (ACPI 6.3 §4.8.3.2.1). SCI_EN must always read 1 here: SMI_CMD is 0, so
/// there is no legacy mode.
pub const PM1_CNT_SCI_EN: u16 = 1 << 0;
pub const PM1_CNT_BM_RLD: u16 = 1 << 1;
pub const PM1_CNT_GBL_RLS: u16 = 1 << 2;
pub const PM1_CNT_SLP_TYP_SHIFT: u32 = 10;
pub const PM1_CNT_SLP_TYP_MASK: u16 = 0b111 << PM1_CNT_SLP_TYP_SHIFT;
/// Write-only: enter the sleep state selected by SLP_TYP; always reads 0.
pub const PM1_CNT_SLP_EN: u16 = 1 << 13;

/// SLP_TYP of the S0 (working) state, as `\_S0` in the DSDT says.
pub const SLP_TYP_S0: u8 = 0;
/// SLP_TYP of the S5 (soft-off) state, as `\_S5` in the DSDT says.
pub const SLP_TYP_S5: u8 = 5;

/// The SLP_TYP a write of `value` to PM1a control asks to enter, if it sets SLP_EN.
/// `Some(SLP_TYP_S5)` means power off.
pub fn sleep_request(value: u16) -> Option<u8> {
    if value & PM1_CNT_SLP_EN == 0 {
        return None;
    }
    Some(((value & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT) as u8)
}

// ---------------------------------------------------------------------------------------------
// Table formats: byte offsets of the fields written.

/// Root System Description Pointer, ACPI 6.3 §5.2.5.3.
mod rsdp {
    pub const SIGNATURE: usize = 0; // "RSD PTR "
    pub const CHECKSUM: usize = 8; // over the first 20 bytes (the ACPI 1.0 structure)
    pub const OEM_ID: usize = 9;
    pub const REVISION: usize = 15; // 2 for ACPI 2.0 and later
    pub const RSDT_ADDRESS: usize = 16;
    pub const LENGTH: usize = 20;
    pub const XSDT_ADDRESS: usize = 24;
    pub const EXTENDED_CHECKSUM: usize = 32; // over all 36 bytes
    pub const V1_LEN: usize = 20;
    pub const LEN: usize = 36;
    pub const REVISION_2: u8 = 2;
}

/// System Description Table Header, ACPI 6.3 §5.2.6: the first 36 bytes of every table
/// except the RSDP and the FACS.
mod sdt {
    pub const SIGNATURE: usize = 0;
    pub const LENGTH: usize = 4;
    pub const REVISION: usize = 8;
    pub const CHECKSUM: usize = 9; // the whole table sums to 0 (mod 256)
    pub const OEM_ID: usize = 10;
    pub const OEM_TABLE_ID: usize = 16;
    pub const OEM_REVISION: usize = 24;
    pub const CREATOR_ID: usize = 28;
    pub const CREATOR_REVISION: usize = 32;
    pub const HEADER_LEN: usize = 36;
}

/// Extended System Description Table, ACPI 6.3 §5.2.8: the header, then 64-bit addresses.
mod xsdt {
    pub const REVISION: u8 = 1;
    pub const ENTRY_LEN: usize = 8;
}

/// Root System Description Table, ACPI 6.3 §5.2.7: the header, then 32-bit addresses.
mod rsdt {
    pub const REVISION: u8 = 1;
    pub const ENTRY_LEN: usize = 4;
}

/// Fixed ACPI Description Table, ACPI 6.3 §5.2.9: its field table gives these byte offsets.
mod fadt {
    pub const REVISION: u8 = 6;
    pub const MINOR_REVISION: u8 = 3;
    pub const LEN: usize = 276;

    pub const FIRMWARE_CTRL: usize = 36; // 32-bit FACS address
    pub const DSDT: usize = 40;
    pub const PREFERRED_PM_PROFILE: usize = 45;
    pub const SCI_INT: usize = 46;
    pub const SMI_CMD: usize = 48;
    pub const PM1A_EVT_BLK: usize = 56;
    pub const PM1A_CNT_BLK: usize = 64;
    pub const PM_TMR_BLK: usize = 76;
    pub const PM1_EVT_LEN: usize = 88;
    pub const PM1_CNT_LEN: usize = 89;
    pub const PM_TMR_LEN: usize = 91;
    pub const P_LVL2_LAT: usize = 96;
    pub const P_LVL3_LAT: usize = 98;
    pub const CENTURY: usize = 108;
    pub const IAPC_BOOT_ARCH: usize = 109;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const FADT_MINOR_VERSION: usize = 131;
    pub const X_FIRMWARE_CTRL: usize = 132;
    pub const X_DSDT: usize = 140;
    pub const X_PM1A_EVT_BLK: usize = 148;
    pub const X_PM1A_CNT_BLK: usize = 172;
    pub const X_PM_TMR_BLK: usize = 208;
    pub const HYPERVISOR_VENDOR_IDENTITY: usize = 268;

    /// Fixed Feature Flags (§5.2.9).
    pub const WBINVD: u32 = 1 << 0; // WBINVD flushes all caches
    pub const PROC_C1: u32 = 1 << 2; // C1 (HLT) on all processors
    pub const PWR_BUTTON: u32 = 1 << 4; // 1: no fixed-hardware power button
    pub const SLP_BUTTON: u32 = 1 << 5; // 1: no fixed-hardware sleep button
    pub const FIX_RTC: u32 = 1 << 6; // 1: no RTC wake status in fixed register space
    pub const TMR_VAL_EXT: u32 = 1 << 8; // 1: 32-bit PM timer; 0: 24-bit
    pub const RESET_REG_SUP: u32 = 1 << 10;
    pub const FORCE_APIC_PHYSICAL_DESTINATION_MODE: u32 = 1 << 19;

    /// IA-PC Boot Architecture Flags, §5.2.9.3.
    pub const LEGACY_DEVICES: u16 = 1 << 0; // ISA-style devices not enumerated in ACPI
    #[allow(dead_code)] // never declared: the VMM's 0x60/0x64 are a reset line, not an 8042
    pub const I8042: u16 = 1 << 1; // an 8042 keyboard controller at ports 0x60/0x64

    /// Preferred_PM_Profile 0: unspecified.
    pub const PM_PROFILE_UNSPECIFIED: u8 = 0;
    /// Worst-case C2/C3 latencies above 100 / 1000 microseconds mean "not supported".
    pub const C2_NOT_SUPPORTED: u16 = 101;
    pub const C3_NOT_SUPPORTED: u16 = 1001;
}

/// Firmware ACPI Control Structure, ACPI 6.3 §5.2.10 (no header checksum).
mod facs {
    pub const SIGNATURE: usize = 0;
    pub const LENGTH: usize = 4;
    pub const VERSION: usize = 32;
    pub const LEN: usize = 64;
    pub const VERSION_2: u8 = 2;
    /// The FACS must be 64-byte aligned.
    pub const ALIGN: u64 = 64;
}

/// Multiple APIC Description Table, ACPI 6.3 §5.2.12.
mod madt {
    pub const REVISION: u8 = 5;
    pub const LOCAL_APIC_ADDRESS: usize = 36;
    pub const FLAGS: usize = 40;
    pub const HEADER_LEN: usize = 44;
    /// Flags: a dual 8259 is present as well (its vectors must be masked to use the APICs).
    pub const PCAT_COMPAT: u32 = 1 << 0;

    /// Interrupt controller structure types and lengths.
    pub const TYPE_LOCAL_APIC: u8 = 0; // §5.2.12.2
    pub const LOCAL_APIC_LEN: usize = 8;
    pub const TYPE_IO_APIC: u8 = 1; // §5.2.12.3
    pub const IO_APIC_LEN: usize = 12;
    pub const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2; // §5.2.12.5
    pub const INTERRUPT_SOURCE_OVERRIDE_LEN: usize = 10;
    pub const TYPE_LOCAL_APIC_NMI: u8 = 4; // §5.2.12.7
    pub const LOCAL_APIC_NMI_LEN: usize = 6;
    pub const TYPE_LOCAL_X2APIC: u8 = 9; // §5.2.12.12
    pub const LOCAL_X2APIC_LEN: usize = 16;
    pub const TYPE_LOCAL_X2APIC_NMI: u8 = 0x0A; // §5.2.12.13
    pub const LOCAL_X2APIC_NMI_LEN: usize = 12;

    /// Local APIC / x2APIC flags: the processor is usable.
    pub const ENABLED: u32 = 1 << 0;
    /// MPS INTI flags (§5.2.12.5): polarity in bits 1:0, trigger mode in bits 3:2.
    pub const INTI_CONFORMS: u16 = 0;
    pub const INTI_ACTIVE_HIGH: u16 = 0b01;
    pub const INTI_EDGE: u16 = 0b01 << 2;
    pub const INTI_LEVEL: u16 = 0b11 << 2;
    /// Bus 0: ISA, the only bus an override may name.
    pub const BUS_ISA: u8 = 0;
    /// ACPI Processor UID meaning "all processors".
    pub const ALL_PROCESSORS: u8 = 0xFF;
    pub const ALL_X2APIC_PROCESSORS: u32 = 0xFFFF_FFFF;
    /// The local APIC input the NMI is wired to.
    pub const LINT1: u8 = 1;
}

/// Generic Address Structure, ACPI 6.3 §5.2.3.2 (12 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Gas {
    space_id: u8,
    bit_width: u8,
    bit_offset: u8,
    access_size: u8,
    address: u64,
}

impl Gas {
    const LEN: usize = 12;
    const SPACE_SYSTEM_IO: u8 = 1;
    const ACCESS_BYTE: u8 = 1;
    const ACCESS_WORD: u8 = 2;
    const ACCESS_DWORD: u8 = 3;
    const NONE: Gas = Gas { space_id: 0, bit_width: 0, bit_offset: 0, access_size: 0, address: 0 };

    /// `len` bytes of system I/O space at `port`, accessed `access_size` at a time.
    fn io(port: u16, len: u8, access_size: u8) -> Gas {
        Gas { space_id: Self::SPACE_SYSTEM_IO, bit_width: len * 8, bit_offset: 0, access_size, address: port.into() }
    }

    fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[0] = self.space_id;
        b[1] = self.bit_width;
        b[2] = self.bit_offset;
        b[3] = self.access_size;
        b[4..].copy_from_slice(&self.address.to_le_bytes());
        b
    }
}

// ---------------------------------------------------------------------------------------------
// DSDT: AML (ACPI 6.3 chapter 20), generated with the `acpi_tables` crate (rust-vmm's AML
// builder, `no_std` + `alloc`, the one Cloud Hypervisor builds its DSDT with): it computes
// every PkgLength and integer encoding, which by hand is where AML goes wrong. The crate
// asserts on malformed name strings and EISA IDs and computes `max - min + 1` for address
// ranges: everything handed to it here is a constant or validated (`MmioWindow` base <= last
// < the I/O APIC), nothing comes from a guest.

/// The DSDT's definition block:
/// - the system sleep states Linux needs to power off (ACPI 6.3 §7.4.2, `\_Sx`: Package
///   { SLP_TYPa, SLP_TYPb, reserved, reserved }): `\_S0` and `\_S5`;
/// - with `config.pci`, the PCI root bridge `\_SB.PCI0` ([`PciRoot`], [`pci_root`]).
fn dsdt_aml(config: &AcpiConfig) -> Vec<u8> {
    let mut out = Vec::new();
    let (zero, s5) = (0u8, SLP_TYP_S5);
    aml::Name::new("_S0_".into(), &aml::Package::new(alloc::vec![&zero, &zero, &zero, &zero])).to_aml_bytes(&mut out);
    // SLP_TYPb is the same: there is no PM1b control block.
    aml::Name::new("_S5_".into(), &aml::Package::new(alloc::vec![&s5, &s5, &zero, &zero])).to_aml_bytes(&mut out);
    if let Some(pci) = &config.pci {
        out.extend_from_slice(&aml::Scope::raw("\\_SB_".into(), pci_root(pci)));
    }
    out
}

/// `_PRT` entry fields (ACPI 6.3 §6.2.13, Table 6-220): Address (device in bits 31:16,
/// 0xFFFF = any function), Pin (0 = INTA), Source (0: the fourth field is a GSI), Source Index.
const PRT_ANY_FUNCTION: u32 = 0xFFFF;
const PRT_SOURCE_GSI: u8 = 0;

/// The AML of `Device (PCI0) { _HID, _UID, _SEG, _BBN, _CRS, _PRT }` (see [`PciRoot`]).
fn pci_root(pci: &PciRoot) -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0A03");
    let zero = 0u8;
    let bus_max = 0xFFu16;

    // _CRS: ResourceTemplate { WordBusNumber, IO (CF8, 8), WordIO x2, DWordMemory }.
    let buses = aml::AddressSpace::new_bus_number(0u16, bus_max);
    let config_ports = aml::IO::new(0x0CF8, 0x0CF8, 1, 8);
    let io_low = aml::AddressSpace::new_io(PCI_IO_WINDOWS[0].0, PCI_IO_WINDOWS[0].1, None);
    let io_high = aml::AddressSpace::new_io(PCI_IO_WINDOWS[1].0, PCI_IO_WINDOWS[1].1, None);
    let mmio = pci
        .mmio32
        .map(|w| aml::AddressSpace::new_memory(aml::AddressSpaceCacheable::NotCacheable, true, w.base, w.last, None));
    let mut resources: Vec<&dyn Aml> = alloc::vec![&buses, &config_ports, &io_low, &io_high];
    if let Some(m) = &mmio {
        resources.push(m);
    }
    let crs = aml::ResourceTemplate::new(resources);

    // _PRT: Package { Package { Address, Pin, Source, Source Index } ... }.
    let mut prt = aml::PackageBuilder::new();
    for device in 0..PCI_DEVICES {
        for pin in 0..4u8 {
            let address = (u32::from(device) << 16) | PRT_ANY_FUNCTION;
            let gsi = pci_intx_gsi(device, pin);
            prt.add_element(&aml::Package::new(alloc::vec![&address, &pin, &PRT_SOURCE_GSI, &gsi]));
        }
    }

    let mut out = Vec::new();
    aml::Device::new(
        "PCI0".into(),
        alloc::vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &zero),
            &aml::Name::new("_SEG".into(), &zero),
            &aml::Name::new("_BBN".into(), &zero),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Name::new("_PRT".into(), &prt),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;

// ---------------------------------------------------------------------------------------------
// Building.

/// A table under construction: fields are written at named offsets, and the buffer grows to
/// cover whatever is written.
struct Bytes(Vec<u8>);

impl PutLe for Bytes {
    fn put(&mut self, off: usize, bytes: &[u8]) {
        let end = off.saturating_add(bytes.len());
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        if let Some(dst) = self.0.get_mut(off..end) {
            dst.copy_from_slice(bytes);
        }
    }
}

impl Bytes {
    fn zeroed(len: usize) -> Bytes {
        Bytes(alloc::vec![0; len])
    }

    fn append(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// Starts a table with a System Description Table Header (§5.2.6); [`Bytes::finish_sdt`]
    /// fills in its length and checksum.
    fn sdt(signature: &[u8; 4], revision: u8, len: usize) -> Bytes {
        let mut t = Bytes::zeroed(len.max(sdt::HEADER_LEN));
        t.put(sdt::SIGNATURE, signature);
        t.put_u8(sdt::REVISION, revision);
        t.put(sdt::OEM_ID, &OEM_ID);
        t.put(sdt::OEM_TABLE_ID, &OEM_TABLE_ID);
        t.put_u32(sdt::OEM_REVISION, OEM_REVISION);
        t.put(sdt::CREATOR_ID, &CREATOR_ID);
        t.put_u32(sdt::CREATOR_REVISION, CREATOR_REVISION);
        t
    }

    fn finish_sdt(mut self) -> Vec<u8> {
        // Tables are at most a few KiB (MAX_LEN), so the length fits 32 bits.
        let len = u32::try_from(self.0.len()).unwrap_or(u32::MAX);
        self.put_u32(sdt::LENGTH, len);
        self.put_u8(sdt::CHECKSUM, 0);
        let sum = checksum(&self.0);
        self.put_u8(sdt::CHECKSUM, sum);
        self.0
    }
}

/// The byte that makes `bytes` (which hold 0 where it goes) sum to 0 mod 256 (§5.2.6).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

fn rsdp(rsdt_addr: u32, xsdt_addr: u64) -> Vec<u8> {
    let mut t = Bytes::zeroed(rsdp::LEN);
    t.put(rsdp::SIGNATURE, b"RSD PTR ");
    t.put(rsdp::OEM_ID, &OEM_ID);
    t.put_u8(rsdp::REVISION, rsdp::REVISION_2);
    t.put_u32(rsdp::RSDT_ADDRESS, rsdt_addr);
    t.put_u32(rsdp::LENGTH, rsdp::LEN as u32);
    t.put_u64(rsdp::XSDT_ADDRESS, xsdt_addr);
    let v1 = checksum(t.0.get(..rsdp::V1_LEN).unwrap_or_default());
    t.put_u8(rsdp::CHECKSUM, v1);
    let all = checksum(&t.0);
    t.put_u8(rsdp::EXTENDED_CHECKSUM, all);
    t.0
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Bytes::sdt(b"XSDT", xsdt::REVISION, xsdt_len(entries.len()));
    for (i, e) in entries.iter().enumerate() {
        t.put_u64(sdt::HEADER_LEN + i * xsdt::ENTRY_LEN, *e);
    }
    t.finish_sdt()
}

fn rsdt(entries: &[u32]) -> Vec<u8> {
    let mut t = Bytes::sdt(b"RSDT", rsdt::REVISION, rsdt_len(entries.len()));
    for (i, e) in entries.iter().enumerate() {
        t.put_u32(sdt::HEADER_LEN + i * rsdt::ENTRY_LEN, *e);
    }
    t.finish_sdt()
}

fn xsdt_len(entries: usize) -> usize {
    sdt::HEADER_LEN + entries * xsdt::ENTRY_LEN
}

fn rsdt_len(entries: usize) -> usize {
    sdt::HEADER_LEN + entries * rsdt::ENTRY_LEN
}

/// The 32-bit form of a table address, or 0 if it lies above 4 GiB.
fn addr32(gpa: u64) -> u32 {
    u32::try_from(gpa).unwrap_or(0)
}

fn fadt_flags(config: &AcpiConfig) -> u32 {
    if config.reset_port != 0 {
        FADT_FIXED_FLAGS | fadt::RESET_REG_SUP
    } else {
        FADT_FIXED_FLAGS
    }
}

fn fadt(config: &AcpiConfig, facs_addr: u64, dsdt_addr: u64) -> Vec<u8> {
    let mut t = Bytes::sdt(b"FACP", fadt::REVISION, fadt::LEN);
    // §5.2.9: X_FIRMWARE_CTRL must be 0 when FIRMWARE_CTRL is used; X_DSDT, when non-zero,
    // takes precedence over DSDT, so both carry the address when it fits 32 bits.
    let facs32 = addr32(facs_addr);
    t.put_u32(fadt::FIRMWARE_CTRL, facs32);
    t.put_u64(fadt::X_FIRMWARE_CTRL, if facs32 == 0 { facs_addr } else { 0 });
    t.put_u32(fadt::DSDT, addr32(dsdt_addr));
    t.put_u64(fadt::X_DSDT, dsdt_addr);

    t.put_u8(fadt::PREFERRED_PM_PROFILE, fadt::PM_PROFILE_UNSPECIFIED);
    t.put_u16(fadt::SCI_INT, config.sci_irq.into());
    // SMI_CMD, ACPI_ENABLE, ACPI_DISABLE stay 0: no SMM, the system is always in ACPI mode.
    t.put_u32(fadt::SMI_CMD, 0);

    t.put_u32(fadt::PM1A_EVT_BLK, config.pm1a_evt.into());
    t.put_u8(fadt::PM1_EVT_LEN, PM1_EVT_LEN);
    t.put(fadt::X_PM1A_EVT_BLK, &Gas::io(config.pm1a_evt, PM1_EVT_LEN, Gas::ACCESS_WORD).to_bytes());
    t.put_u32(fadt::PM1A_CNT_BLK, config.pm1a_cnt.into());
    t.put_u8(fadt::PM1_CNT_LEN, PM1_CNT_LEN);
    t.put(fadt::X_PM1A_CNT_BLK, &Gas::io(config.pm1a_cnt, PM1_CNT_LEN, Gas::ACCESS_WORD).to_bytes());
    if config.pm_tmr != 0 {
        t.put_u32(fadt::PM_TMR_BLK, config.pm_tmr.into());
        t.put_u8(fadt::PM_TMR_LEN, PM_TMR_LEN);
        t.put(fadt::X_PM_TMR_BLK, &Gas::io(config.pm_tmr, PM_TMR_LEN, Gas::ACCESS_DWORD).to_bytes());
    }

    t.put_u16(fadt::P_LVL2_LAT, fadt::C2_NOT_SUPPORTED);
    t.put_u16(fadt::P_LVL3_LAT, fadt::C3_NOT_SUPPORTED);
    // CENTURY 0: no century byte in CMOS; Linux then takes years 00-69 as 20xx.
    t.put_u8(fadt::CENTURY, 0);
    // No 8042: ports 0x60/0x64 carry only the reset line (devices/pm.rs). With bit 1 clear
    // (FADT revision 2 or later) Linux marks the i8042 absent and does not probe it; with it
    // set and no PNP0303 device it probes the ports directly and waits 0.5 s for a
    // controller configuration byte that never comes.
    t.put_u16(fadt::IAPC_BOOT_ARCH, fadt::LEGACY_DEVICES);
    t.put_u32(fadt::FLAGS, fadt_flags(config));

    let reset = if config.reset_port != 0 { Gas::io(config.reset_port, 1, Gas::ACCESS_BYTE) } else { Gas::NONE };
    t.put(fadt::RESET_REG, &reset.to_bytes());
    t.put_u8(fadt::RESET_VALUE, if config.reset_port != 0 { config.reset_value } else { 0 });

    t.put_u8(fadt::FADT_MINOR_VERSION, fadt::MINOR_REVISION);
    t.put(fadt::HYPERVISOR_VENDOR_IDENTITY, b"VIREO   ");
    t.finish_sdt()
}

fn facs() -> Vec<u8> {
    // Hardware signature, waking vectors, global lock and flags all 0: no S4BIOS, no
    // 64-bit wake, nothing owns the global lock.
    let mut t = Bytes::zeroed(facs::LEN);
    t.put(facs::SIGNATURE, b"FACS");
    t.put_u32(facs::LENGTH, facs::LEN as u32);
    t.put_u8(facs::VERSION, facs::VERSION_2);
    t.0
}

fn madt_len(config: &AcpiConfig) -> usize {
    let (cpu, nmi) = if config.x2apic {
        (madt::LOCAL_X2APIC_LEN, madt::LOCAL_X2APIC_NMI_LEN)
    } else {
        (madt::LOCAL_APIC_LEN, madt::LOCAL_APIC_NMI_LEN)
    };
    madt::HEADER_LEN + config.cpus as usize * cpu + madt::IO_APIC_LEN + 2 * madt::INTERRUPT_SOURCE_OVERRIDE_LEN + nmi
}

/// Interrupt Source Override (§5.2.12.5): ISA `irq` arrives at `gsi` with `flags` (MPS INTI).
fn interrupt_source_override(irq: u8, gsi: u32, flags: u16) -> [u8; madt::INTERRUPT_SOURCE_OVERRIDE_LEN] {
    let g = gsi.to_le_bytes();
    let f = flags.to_le_bytes();
    [
        madt::TYPE_INTERRUPT_SOURCE_OVERRIDE,
        madt::INTERRUPT_SOURCE_OVERRIDE_LEN as u8,
        madt::BUS_ISA,
        irq,  // Source
        g[0], // Global System Interrupt
        g[1],
        g[2],
        g[3],
        f[0], // Flags
        f[1],
    ]
}

fn madt(config: &AcpiConfig) -> Vec<u8> {
    let mut t = Bytes::sdt(b"APIC", madt::REVISION, madt::HEADER_LEN);
    // Validated to fit 32 bits.
    t.put_u32(madt::LOCAL_APIC_ADDRESS, addr32(config.lapic_addr));
    t.put_u32(madt::FLAGS, madt::PCAT_COMPAT);

    for cpu in 0..config.cpus.min(MAX_CPUS) {
        if config.x2apic {
            // Processor Local x2APIC (§5.2.12.12).
            let id = cpu.to_le_bytes();
            let flags = madt::ENABLED.to_le_bytes();
            t.append(&[madt::TYPE_LOCAL_X2APIC, madt::LOCAL_X2APIC_LEN as u8, 0, 0]); // type, length, reserved
            t.append(&id); // X2APIC ID
            t.append(&flags); // Flags
            t.append(&id); // ACPI Processor UID
        } else {
            // Processor Local APIC (§5.2.12.2); cpu < 255.
            let id = cpu as u8;
            t.append(&[madt::TYPE_LOCAL_APIC, madt::LOCAL_APIC_LEN as u8, id, id]); // type, length, UID, APIC ID
            t.append(&madt::ENABLED.to_le_bytes()); // Flags
        }
    }

    // I/O APIC (§5.2.12.3): type, length, I/O APIC ID, reserved, address, GSI base 0.
    t.append(&[madt::TYPE_IO_APIC, madt::IO_APIC_LEN as u8, config.ioapic_id, 0]);
    t.append(&addr32(config.ioapic_addr).to_le_bytes());
    t.append(&0u32.to_le_bytes());

    // The 8254 timer (ISA IRQ 0) is wired to I/O APIC pin 2, edge/high as ISA.
    t.append(&interrupt_source_override(0, 2, madt::INTI_EDGE | madt::INTI_ACTIVE_HIGH));
    // The SCI is level-triggered; active-high here (the ACPI default for an SCI without an
    // override would be active-low).
    let sci = config.sci_irq;
    t.append(&interrupt_source_override(sci, sci.into(), madt::INTI_LEVEL | madt::INTI_ACTIVE_HIGH));

    // NMI on LINT1 of every processor, polarity and trigger as the bus (edge/high).
    let nmi_flags = madt::INTI_CONFORMS.to_le_bytes();
    if config.x2apic {
        // Local x2APIC NMI (§5.2.12.13): type, length, flags, UID, LINT#, reserved.
        t.append(&[madt::TYPE_LOCAL_X2APIC_NMI, madt::LOCAL_X2APIC_NMI_LEN as u8, nmi_flags[0], nmi_flags[1]]);
        t.append(&madt::ALL_X2APIC_PROCESSORS.to_le_bytes());
        t.append(&[madt::LINT1, 0, 0, 0]);
    } else {
        // Local APIC NMI (§5.2.12.7): type, length, UID, flags, LINT#.
        t.append(&[
            madt::TYPE_LOCAL_APIC_NMI,
            madt::LOCAL_APIC_NMI_LEN as u8,
            madt::ALL_PROCESSORS,
            nmi_flags[0],
            nmi_flags[1],
            madt::LINT1,
        ]);
    }
    t.finish_sdt()
}

fn dsdt(aml: &[u8]) -> Vec<u8> {
    let mut t = Bytes::sdt(b"DSDT", DSDT_REVISION, sdt::HEADER_LEN);
    t.append(aml);
    t.finish_sdt()
}

/// Where each table goes: byte offsets into the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    rsdp: usize,
    facs: usize,
    xsdt: usize,
    fadt: usize,
    madt: usize,
    dsdt: usize,
    /// Only when every table lies below 4 GiB.
    rsdt: Option<usize>,
    end: usize,
}

/// Number of tables the XSDT (and RSDT) list: FADT, MADT.
const ROOT_ENTRIES: usize = 2;
/// Alignment of every table but the FACS.
const TABLE_ALIGN: u64 = 16;
const FOUR_GIB: u64 = 1 << 32;

impl Layout {
    fn new(config: &AcpiConfig, base: u64, dsdt_aml_len: usize) -> Result<Layout, AcpiError> {
        let mut next = 0usize;
        let mut place = |len: usize, align: u64| -> Result<usize, AcpiError> {
            let gpa = base.checked_add(next as u64).ok_or(AcpiError::AddressOverflow)?;
            let aligned = gpa.checked_next_multiple_of(align).ok_or(AcpiError::AddressOverflow)?;
            let off = usize::try_from(aligned - base).map_err(|_| AcpiError::AddressOverflow)?;
            let end = off.checked_add(len).ok_or(AcpiError::AddressOverflow)?;
            base.checked_add(end as u64).ok_or(AcpiError::AddressOverflow)?;
            next = end;
            Ok(off)
        };
        let rsdp = place(rsdp::LEN, TABLE_ALIGN)?;
        let facs = place(facs::LEN, facs::ALIGN)?;
        let xsdt = place(xsdt_len(ROOT_ENTRIES), TABLE_ALIGN)?;
        let fadt = place(fadt::LEN, TABLE_ALIGN)?;
        let madt = place(madt_len(config), TABLE_ALIGN)?;
        let dsdt = place(sdt::HEADER_LEN + dsdt_aml_len, TABLE_ALIGN)?;
        let end_without_rsdt = dsdt + sdt::HEADER_LEN + dsdt_aml_len;
        // The RSDT goes last, so that leaving it out moves nothing else.
        let rsdt = place(rsdt_len(ROOT_ENTRIES), TABLE_ALIGN)?;
        let rsdt_end = rsdt + rsdt_len(ROOT_ENTRIES);
        let below_4g = base.checked_add(rsdt_end as u64).is_some_and(|end| end <= FOUR_GIB);
        Ok(if below_4g {
            Layout { rsdp, facs, xsdt, fadt, madt, dsdt, rsdt: Some(rsdt), end: rsdt_end }
        } else {
            Layout { rsdp, facs, xsdt, fadt, madt, dsdt, rsdt: None, end: end_without_rsdt }
        })
    }
}

/// How many bytes [`build`] uses for `config` at `base` (at most [`MAX_LEN`]).
pub fn required_len(config: &AcpiConfig, base: u64) -> Result<usize, AcpiError> {
    config.validate()?;
    Ok(Layout::new(config, base, dsdt_aml(config).len())?.end)
}

/// Writes RSDP, FACS, XSDT, FADT, MADT, DSDT (and an RSDT when everything lies below 4 GiB)
/// into `buf`, whose first byte will live at guest-physical `base`; returns the RSDP's
/// guest-physical address (for boot_params.acpi_rsdp_addr) and the number of bytes used from
/// the start of `buf` (all of which the caller copies to the guest; padding is zeroed).
///
/// Tables are aligned by guest-physical address (16 bytes; 64 for the FACS), so they are
/// aligned in `buf` too when `base` is 64-byte aligned. The region should be reported to the
/// guest as E820 type 3 (ACPI reclaimable) or 4 (ACPI NVS).
pub fn build(config: &AcpiConfig, base: u64, buf: &mut [u8]) -> Result<(u64, usize), AcpiError> {
    config.validate()?;
    let aml = dsdt_aml(config);
    let layout = Layout::new(config, base, aml.len())?;
    if buf.len() < layout.end {
        return Err(AcpiError::BufferTooSmall { needed: layout.end, have: buf.len() });
    }
    // Layout::new checked that base + end does not overflow.
    let gpa = |off: usize| base + off as u64;

    let fadt = fadt(config, gpa(layout.facs), gpa(layout.dsdt));
    let madt = madt(config);
    let xsdt = xsdt(&[gpa(layout.fadt), gpa(layout.madt)]);
    let rsdt = layout.rsdt.map(|_| rsdt(&[addr32(gpa(layout.fadt)), addr32(gpa(layout.madt))]));
    let rsdp = rsdp(layout.rsdt.map_or(0, |off| addr32(gpa(off))), gpa(layout.xsdt));

    let used = buf.get_mut(..layout.end).ok_or(AcpiError::BufferTooSmall { needed: layout.end, have: 0 })?;
    used.fill(0);
    let mut tables: Vec<(usize, Vec<u8>)> = alloc::vec![
        (layout.rsdp, rsdp),
        (layout.facs, facs()),
        (layout.xsdt, xsdt),
        (layout.fadt, fadt),
        (layout.madt, madt),
        (layout.dsdt, dsdt(&aml)),
    ];
    if let (Some(off), Some(rsdt)) = (layout.rsdt, rsdt) {
        tables.push((off, rsdt));
    }
    for (off, bytes) in &tables {
        let end = off.checked_add(bytes.len()).ok_or(AcpiError::AddressOverflow)?;
        used.get_mut(*off..end)
            .ok_or(AcpiError::BufferTooSmall { needed: end, have: layout.end })?
            .copy_from_slice(bytes);
    }
    Ok((gpa(layout.rsdp), layout.end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::{string::String, vec};

    const BASE: u64 = 0x000E_0000;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    /// A generic address structure as the spec lays it out: (space, bit width, bit offset,
    /// access size, address).
    fn gas_at(b: &[u8], off: usize) -> (u8, u8, u8, u8, u64) {
        (b[off], b[off + 1], b[off + 2], b[off + 3], u64_at(b, off + 4))
    }

    /// What a guest finds walking from the RSDP; every structure checked on the way.
    struct Parsed {
        rsdp_gpa: u64,
        rsdt: Option<Vec<u32>>,
        xsdt_entries: Vec<u64>,
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
        facs: Vec<u8>,
        facs_gpa: u64,
        dsdt_gpa: u64,
    }

    /// A System Description Table at `gpa`: signature, length within the buffer, checksum,
    /// alignment, OEM ID.
    fn table(buf: &[u8], base: u64, gpa: u64, signature: &[u8; 4]) -> Vec<u8> {
        assert_eq!(gpa % 16, 0, "{} at {gpa:#x} not 16-byte aligned", String::from_utf8_lossy(signature));
        let off = usize::try_from(gpa - base).unwrap();
        assert_eq!(&buf[off..off + 4], signature);
        let len = u32_at(buf, off + 4) as usize;
        assert!(len >= 36 && off + len <= buf.len(), "bad length {len}");
        let t = buf[off..off + len].to_vec();
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(signature));
        assert_eq!(&t[10..16], b"VIREO ");
        t
    }

    fn parse(buf: &[u8], base: u64, rsdp_gpa: u64) -> Parsed {
        // RSDP (§5.2.5.3): checksum over 20 bytes, extended checksum over 36.
        assert_eq!(rsdp_gpa % 16, 0);
        let r = usize::try_from(rsdp_gpa - base).unwrap();
        let rsdp = &buf[r..r + 36];
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(&rsdp[9..15], b"VIREO ");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
        assert_eq!(&rsdp[33..36], &[0, 0, 0]);

        let xsdt = table(buf, base, u64_at(rsdp, 24), b"XSDT");
        assert_eq!((xsdt.len() - 36) % 8, 0);
        let xsdt_entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|o| u64_at(&xsdt, o)).collect();

        let rsdt = match u32_at(rsdp, 16) {
            0 => None,
            gpa => {
                let t = table(buf, base, gpa.into(), b"RSDT");
                Some((36..t.len()).step_by(4).map(|o| u32_at(&t, o)).collect())
            }
        };

        let mut fadt = None;
        let mut madt = None;
        for &gpa in &xsdt_entries {
            let off = usize::try_from(gpa - base).unwrap();
            match &buf[off..off + 4] {
                b"FACP" => fadt = Some(table(buf, base, gpa, b"FACP")),
                b"APIC" => madt = Some(table(buf, base, gpa, b"APIC")),
                other => panic!("unexpected table {other:?}"),
            }
        }
        let fadt = fadt.expect("XSDT lists a FADT");
        let madt = madt.expect("XSDT lists a MADT");

        let dsdt_gpa = match u64_at(&fadt, 140) {
            0 => u64::from(u32_at(&fadt, 40)),
            x => x,
        };
        let dsdt = table(buf, base, dsdt_gpa, b"DSDT");
        let facs_gpa = match u64_at(&fadt, 132) {
            0 => u64::from(u32_at(&fadt, 36)),
            x => x,
        };
        assert_eq!(facs_gpa % 64, 0, "FACS must be 64-byte aligned");
        let f = usize::try_from(facs_gpa - base).unwrap();
        let facs = buf[f..f + 64].to_vec();
        Parsed { rsdp_gpa, rsdt, xsdt_entries, fadt, madt, dsdt, facs, facs_gpa, dsdt_gpa }
    }

    fn build_vec(config: &AcpiConfig, base: u64) -> (Vec<u8>, Parsed) {
        let mut buf = vec![0xAA; MAX_LEN];
        let (rsdp, used) = build(config, base, &mut buf).unwrap();
        assert_eq!(used, required_len(config, base).unwrap());
        assert!(used <= MAX_LEN);
        buf.truncate(used);
        let parsed = parse(&buf, base, rsdp);
        (buf, parsed)
    }

    /// MADT interrupt controller structures as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2 && off + len <= madt.len(), "MADT entry at {off} overruns");
            out.push((ty, madt[off..off + len].to_vec()));
            off += len;
        }
        assert_eq!(off, madt.len());
        out
    }

    fn count(entries: &[(u8, Vec<u8>)], ty: u8) -> usize {
        entries.iter().filter(|(t, _)| *t == ty).count()
    }

    #[test]
    fn walk_from_rsdp_one_cpu() {
        let (buf, p) = build_vec(&AcpiConfig::pc(1), BASE);
        assert_eq!(p.rsdp_gpa, BASE);
        assert_eq!(p.xsdt_entries.len(), 2);
        // Below 4 GiB the RSDT lists the same tables.
        let rsdt = p.rsdt.expect("RSDT below 4 GiB");
        assert_eq!(rsdt.iter().map(|&a| u64::from(a)).collect::<Vec<_>>(), p.xsdt_entries);
        // Revisions: FADT 6 (276 bytes), MADT 5, DSDT 2, XSDT 1.
        assert_eq!((p.fadt[8], p.fadt.len()), (6, 276));
        assert_eq!(p.madt[8], 5);
        assert_eq!(p.dsdt[8], 2);
        // FACS (§5.2.10).
        assert_eq!(&p.facs[0..4], b"FACS");
        assert_eq!(u32_at(&p.facs, 4), 64);
        assert_eq!(p.facs[32], 2);
        // Everything else in the buffer is zero padding.
        assert!(p.facs_gpa > p.rsdp_gpa && p.dsdt_gpa > p.facs_gpa);
        assert_eq!(buf.len(), required_len(&AcpiConfig::pc(1), BASE).unwrap());
    }

    #[test]
    fn padding_is_zeroed() {
        let config = AcpiConfig::pc_with_pci(2, 64 << 20);
        let mut buf = vec![0xAA; MAX_LEN];
        let (_, used) = build(&config, BASE, &mut buf).unwrap();
        // Tables start with ASCII signatures; count non-table bytes by zeroing known tables.
        let aml_len = dsdt_aml(&config).len();
        let l = Layout::new(&config, BASE, aml_len).unwrap();
        let mut covered = vec![false; used];
        let lens = [
            (l.rsdp, 36),
            (l.facs, 64),
            (l.xsdt, 52),
            (l.fadt, 276),
            (l.madt, madt_len(&config)),
            (l.dsdt, 36 + aml_len),
            (l.rsdt.unwrap(), 44),
        ];
        for (off, len) in lens {
            assert!(covered[off..off + len].iter().all(|c| !c), "tables overlap at {off}");
            covered[off..off + len].fill(true);
        }
        for (i, c) in covered.iter().enumerate() {
            if !c {
                assert_eq!(buf[i], 0, "padding byte {i}");
            }
        }
        // Beyond `used`, the buffer is untouched.
        assert!(buf[used..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn madt_xapic_one_and_four_cpus() {
        for cpus in [1u32, 4] {
            let (_, p) = build_vec(&AcpiConfig::pc(cpus), BASE);
            assert_eq!(u32_at(&p.madt, 36), 0xFEE0_0000, "local APIC address");
            assert_eq!(u32_at(&p.madt, 40), 1, "PCAT_COMPAT");
            assert_eq!(p.madt.len(), 44 + cpus as usize * 8 + 12 + 20 + 6);
            let e = madt_entries(&p.madt);
            assert_eq!(count(&e, 0), cpus as usize);
            assert_eq!(count(&e, 9), 0);
            assert_eq!(count(&e, 1), 1);
            assert_eq!(count(&e, 2), 2);
            assert_eq!(count(&e, 4), 1);
            assert_eq!(e.len(), cpus as usize + 4);
            for (i, (_, lapic)) in e.iter().filter(|(t, _)| *t == 0).enumerate() {
                // type, length, ACPI processor UID, APIC ID, flags (enabled).
                assert_eq!(lapic, &vec![0, 8, i as u8, i as u8, 1, 0, 0, 0]);
            }
            let (_, ioapic) = e.iter().find(|(t, _)| *t == 1).unwrap();
            assert_eq!(ioapic, &vec![1, 12, 0, 0, 0x00, 0x00, 0xC0, 0xFE, 0, 0, 0, 0]);
            let isos: Vec<&Vec<u8>> = e.iter().filter(|(t, _)| *t == 2).map(|(_, b)| b).collect();
            // IRQ0 -> GSI 2, edge (0b01 << 2) / active high (0b01).
            assert_eq!(isos[0], &vec![2, 10, 0, 0, 2, 0, 0, 0, 0x05, 0x00]);
            // IRQ9 -> GSI 9, level (0b11 << 2) / active high (0b01).
            assert_eq!(isos[1], &vec![2, 10, 0, 9, 9, 0, 0, 0, 0x0D, 0x00]);
            let (_, nmi) = e.iter().find(|(t, _)| *t == 4).unwrap();
            assert_eq!(nmi, &vec![4, 6, 0xFF, 0, 0, 1]);
        }
    }

    #[test]
    fn madt_for_every_vm_line_cpu_count() {
        use crate::vmm::spec::MAX_VCPUS;
        const { assert!(MAX_VCPUS <= MAX_CPUS && MAX_VCPUS < 255, "xAPIC IDs 0..N-1 fit type-0 entries") };
        for cpus in 1..=MAX_VCPUS {
            let (_, p) = build_vec(&AcpiConfig::pc(cpus), BASE);
            // Header length and checksum (parse checks every table's checksum too).
            assert_eq!(u32_at(&p.madt, 4) as usize, p.madt.len());
            assert_eq!(p.madt.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0, "MADT checksum");
            assert_eq!(p.madt.len(), 44 + cpus as usize * 8 + 12 + 20 + 6);
            let e = madt_entries(&p.madt);
            assert_eq!(e.len(), cpus as usize + 4, "N local APICs, the I/O APIC, 2 overrides, LINT1 NMI");
            let lapics: Vec<&Vec<u8>> = e.iter().filter(|(t, _)| *t == 0).map(|(_, b)| b).collect();
            assert_eq!(lapics.len(), cpus as usize);
            for (i, l) in lapics.iter().enumerate() {
                assert_eq!((l[2], l[3]), (i as u8, i as u8), "UID and APIC ID");
                assert_eq!(u32_at(l, 4), 1, "enabled");
            }
            assert_eq!(count(&e, 9), 0, "no x2APIC entries below ID 255");
        }
    }

    #[test]
    fn madt_x2apic() {
        let config = AcpiConfig { x2apic: true, ..AcpiConfig::pc(4) };
        let (_, p) = build_vec(&config, BASE);
        assert_eq!(p.madt.len(), 44 + 4 * 16 + 12 + 20 + 12);
        let e = madt_entries(&p.madt);
        assert_eq!(count(&e, 0), 0);
        assert_eq!(count(&e, 9), 4);
        assert_eq!(count(&e, 4), 0);
        assert_eq!(count(&e, 0x0A), 1);
        assert_eq!(count(&e, 1), 1);
        assert_eq!(count(&e, 2), 2);
        for (i, (_, x2)) in e.iter().filter(|(t, _)| *t == 9).enumerate() {
            assert_eq!(x2.len(), 16);
            assert_eq!(u16_at(x2, 2), 0, "reserved");
            assert_eq!(u32_at(x2, 4), i as u32, "x2APIC ID");
            assert_eq!(u32_at(x2, 8), 1, "enabled");
            assert_eq!(u32_at(x2, 12), i as u32, "ACPI processor UID");
        }
        let (_, nmi) = e.iter().find(|(t, _)| *t == 0x0A).unwrap();
        assert_eq!(nmi, &vec![0x0A, 12, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0]);
    }

    #[test]
    fn every_cpu_count_fits_and_checks_out() {
        for x2apic in [false, true] {
            for cpus in 1..=MAX_CPUS {
                let config = AcpiConfig { x2apic, ..AcpiConfig::pc(cpus) };
                let (_, p) = build_vec(&config, BASE);
                let e = madt_entries(&p.madt);
                assert_eq!(count(&e, if x2apic { 9 } else { 0 }), cpus as usize);
            }
        }
    }

    #[test]
    fn fadt_fields_at_spec_offsets() {
        let (_, p) = build_vec(&AcpiConfig::pc(4), BASE);
        let f = &p.fadt;
        // Offsets from the FADT field table of ACPI 6.3 §5.2.9 (written out, not taken from the module).
        assert_eq!(u32_at(f, 36), addr32(p.facs_gpa), "FIRMWARE_CTRL");
        assert_eq!(u64_at(f, 132), 0, "X_FIRMWARE_CTRL is 0 when FIRMWARE_CTRL is used");
        assert_eq!(u64::from(u32_at(f, 40)), p.dsdt_gpa, "DSDT");
        assert_eq!(u64_at(f, 140), p.dsdt_gpa, "X_DSDT");
        assert_eq!(f[45], 0, "Preferred_PM_Profile");
        assert_eq!(u16_at(f, 46), 9, "SCI_INT");
        assert_eq!(u32_at(f, 48), 0, "SMI_CMD");
        assert_eq!((f[52], f[53], f[54], f[55]), (0, 0, 0, 0), "ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT");
        assert_eq!(u32_at(f, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(f, 60), 0, "PM1b_EVT_BLK");
        assert_eq!(u32_at(f, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(f, 68), 0, "PM1b_CNT_BLK");
        assert_eq!(u32_at(f, 72), 0, "PM2_CNT_BLK");
        assert_eq!(u32_at(f, 76), 0x608, "PM_TMR_BLK");
        assert_eq!((u32_at(f, 80), u32_at(f, 84)), (0, 0), "GPE0_BLK, GPE1_BLK");
        assert_eq!(f[88], 4, "PM1_EVT_LEN");
        assert_eq!(f[89], 2, "PM1_CNT_LEN");
        assert_eq!(f[90], 0, "PM2_CNT_LEN");
        assert_eq!(f[91], 4, "PM_TMR_LEN");
        assert_eq!((f[92], f[93]), (0, 0), "GPE0_BLK_LEN, GPE1_BLK_LEN");
        assert_eq!(u16_at(f, 96), 101, "P_LVL2_LAT: no C2");
        assert_eq!(u16_at(f, 98), 1001, "P_LVL3_LAT: no C3");
        assert_eq!(u16_at(f, 109), fadt::LEGACY_DEVICES, "IAPC_BOOT_ARCH: LEGACY_DEVICES, no 8042");
        assert_eq!(u16_at(f, 109) & fadt::I8042, 0);
        let flags = u32_at(f, 112);
        // WBINVD, PROC_C1, PWR_BUTTON, SLP_BUTTON, FIX_RTC, RESET_REG_SUP, FORCE_APIC_PHYSICAL.
        assert_eq!(flags, 1 | 1 << 2 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 10 | 1 << 19, "FLAGS {flags:#x}");
        assert_eq!(flags & 1 << 8, 0, "TMR_VAL_EXT: 24-bit timer");
        assert_eq!(flags & 1 << 20, 0, "not HW_REDUCED_ACPI");
        assert_eq!(gas_at(f, 116), (1, 8, 0, 1, 0xCF9), "RESET_REG");
        assert_eq!(f[128], 0x06, "RESET_VALUE");
        assert_eq!(u16_at(f, 129), 0, "ARM_BOOT_ARCH");
        assert_eq!(f[131], 3, "FADT minor version");
        assert_eq!(gas_at(f, 148), (1, 32, 0, 2, 0x600), "X_PM1a_EVT_BLK");
        assert_eq!(gas_at(f, 160), (0, 0, 0, 0, 0), "X_PM1b_EVT_BLK");
        assert_eq!(gas_at(f, 172), (1, 16, 0, 2, 0x604), "X_PM1a_CNT_BLK");
        assert_eq!(gas_at(f, 184), (0, 0, 0, 0, 0), "X_PM1b_CNT_BLK");
        assert_eq!(gas_at(f, 196), (0, 0, 0, 0, 0), "X_PM2_CNT_BLK");
        assert_eq!(gas_at(f, 208), (1, 32, 0, 3, 0x608), "X_PM_TMR_BLK");
        assert_eq!(gas_at(f, 220), (0, 0, 0, 0, 0), "X_GPE0_BLK");
        assert_eq!(gas_at(f, 232), (0, 0, 0, 0, 0), "X_GPE1_BLK");
        assert_eq!(gas_at(f, 244), (0, 0, 0, 0, 0), "SLEEP_CONTROL_REG");
        assert_eq!(gas_at(f, 256), (0, 0, 0, 0, 0), "SLEEP_STATUS_REG");
        assert_eq!(&f[268..276], b"VIREO   ", "Hypervisor Vendor Identity");
    }

    #[test]
    fn fadt_without_timer_or_reset() {
        let config = AcpiConfig { pm_tmr: 0, reset_port: 0, ..AcpiConfig::pc(1) };
        let (_, p) = build_vec(&config, BASE);
        let f = &p.fadt;
        assert_eq!((u32_at(f, 76), f[91]), (0, 0), "no PM timer");
        assert_eq!(gas_at(f, 208), (0, 0, 0, 0, 0));
        assert_eq!(u32_at(f, 112) & 1 << 10, 0, "no RESET_REG_SUP");
        assert_eq!(gas_at(f, 116), (0, 0, 0, 0, 0));
        assert_eq!(f[128], 0);
    }

    /// Decodes `Name (NameSeg, Package (n) { integer... })` objects: the only AML the DSDT
    /// holds. Returns (name, elements).
    fn decode_aml(mut aml: &[u8]) -> Vec<([u8; 4], Vec<u64>)> {
        let mut out = Vec::new();
        while !aml.is_empty() {
            assert_eq!(aml[0], 0x08, "NameOp");
            let name: [u8; 4] = aml[1..5].try_into().unwrap();
            assert_eq!(aml[5], 0x12, "PackageOp");
            // PkgLength: one byte when bits 7:6 are 0.
            let lead = aml[6];
            assert_eq!(lead >> 6, 0, "one-byte PkgLength");
            let pkg_len = (lead & 0x3F) as usize;
            let pkg = &aml[6..6 + pkg_len];
            let count = pkg[1] as usize;
            let mut elems = Vec::new();
            let mut i = 2;
            while i < pkg.len() {
                match pkg[i] {
                    0x00 | 0x01 => {
                        elems.push(u64::from(pkg[i]));
                        i += 1;
                    }
                    0x0A => {
                        elems.push(u64::from(pkg[i + 1]));
                        i += 2;
                    }
                    op => panic!("unexpected AML opcode {op:#x}"),
                }
            }
            assert_eq!(i, pkg.len(), "package ends where PkgLength says");
            assert_eq!(elems.len(), count, "NumElements");
            out.push((name, elems));
            aml = &aml[6 + pkg_len..];
        }
        out
    }

    #[test]
    fn dsdt_defines_s0_and_s5() {
        let (_, p) = build_vec(&AcpiConfig::pc(1), BASE);
        let aml = &p.dsdt[36..];
        assert!(aml.windows(4).any(|w| w == b"_S5_"));
        let objects = decode_aml(aml);
        assert_eq!(objects, vec![(*b"_S0_", vec![0, 0, 0, 0]), (*b"_S5_", vec![5, 5, 0, 0])]);
    }

    /// The sleep-state packages as they were written by hand before the AML builder, and as
    /// Linux has powered off with since: the crate must produce exactly these bytes.
    #[rustfmt::skip]
    const SLEEP_STATES_AML: [u8; 26] = [
        0x08, b'_', b'S', b'0', b'_', 0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00,
        0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0A, 0x05, 0x0A, 0x05, 0x00, 0x00,
    ];

    #[test]
    fn dsdt_sleep_states_keep_their_encoding() {
        let (_, plain) = build_vec(&AcpiConfig::pc(1), BASE);
        assert_eq!(&plain.dsdt[36..], &SLEEP_STATES_AML);
        let (_, pci) = build_vec(&AcpiConfig::pc_with_pci(1, 256 << 20), BASE);
        assert_eq!(&pci.dsdt[36..36 + 26], &SLEEP_STATES_AML);
    }

    /// An AML data object, as the test decoder below reads it.
    #[derive(Clone, Debug, PartialEq)]
    enum Obj {
        Int(u64),
        Pkg(Vec<Obj>),
        Buf(Vec<u8>),
    }

    /// A decoder for the AML the DSDT holds (ACPI 6.3 §20.2), written from the grammar and
    /// independent of the builder: Scope, Device, Name, Package, Buffer and integer constants;
    /// every PkgLength, NumElements and BufferSize is checked against what follows. Returns
    /// every named object by its absolute path (`\\_SB_.PCI0._HID`), in order.
    fn decode_namespace(aml: &[u8]) -> Vec<(String, Obj)> {
        fn pkg_length(b: &[u8], i: &mut usize) -> usize {
            let lead = b[*i];
            let follow = (lead >> 6) as usize;
            let mut len = if follow == 0 { (lead & 0x3F) as usize } else { (lead & 0x0F) as usize };
            assert!(follow == 0 || lead & 0x30 == 0, "PkgLeadByte bits 5:4 reserved");
            for k in 0..follow {
                len |= (b[*i + 1 + k] as usize) << (4 + 8 * k);
            }
            let start = *i;
            *i += 1 + follow;
            start + len // PkgLength counts itself
        }
        fn name_string(b: &[u8], i: &mut usize, scope: &str) -> String {
            let root = b[*i] == b'\\';
            if root {
                *i += 1;
            }
            let segs = match b[*i] {
                0x2E => {
                    *i += 1;
                    2
                }
                0x2F => {
                    *i += 2;
                    b[*i - 1] as usize
                }
                _ => 1,
            };
            let mut path = if root { String::from("\\") } else { String::from(scope) };
            for _ in 0..segs {
                let seg = &b[*i..*i + 4];
                assert!(seg.iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_'), "{seg:?}");
                if !path.ends_with('\\') {
                    path.push('.');
                }
                path.push_str(core::str::from_utf8(seg).unwrap());
                *i += 4;
            }
            path
        }
        fn data(b: &[u8], i: &mut usize) -> Obj {
            let op = b[*i];
            *i += 1;
            let int = |i: &mut usize, n: usize| {
                let mut v = [0u8; 8];
                v[..n].copy_from_slice(&b[*i..*i + n]);
                *i += n;
                Obj::Int(u64::from_le_bytes(v))
            };
            match op {
                0x00 => Obj::Int(0),
                0x01 => Obj::Int(1),
                0xFF => Obj::Int(u64::MAX),
                0x0A => int(i, 1),
                0x0B => int(i, 2),
                0x0C => int(i, 4),
                0x0E => int(i, 8),
                0x12 => {
                    let end = pkg_length(b, i);
                    let count = b[*i] as usize;
                    *i += 1;
                    let mut elems = Vec::new();
                    while *i < end {
                        elems.push(data(b, i));
                    }
                    assert_eq!(*i, end, "package ends at its PkgLength");
                    assert_eq!(elems.len(), count, "NumElements");
                    Obj::Pkg(elems)
                }
                0x11 => {
                    let end = pkg_length(b, i);
                    let Obj::Int(size) = data(b, i) else { panic!("BufferSize") };
                    assert_eq!(end - *i, size as usize, "BufferSize matches PkgLength");
                    let bytes = b[*i..end].to_vec();
                    *i = end;
                    Obj::Buf(bytes)
                }
                op => panic!("unexpected data object opcode {op:#x}"),
            }
        }
        fn terms(b: &[u8], i: &mut usize, end: usize, scope: &str, out: &mut Vec<(String, Obj)>) {
            while *i < end {
                match b[*i] {
                    0x08 => {
                        *i += 1;
                        let name = name_string(b, i, scope);
                        let obj = data(b, i);
                        out.push((name, obj));
                    }
                    0x10 => {
                        *i += 1;
                        let e = pkg_length(b, i);
                        let name = name_string(b, i, scope);
                        terms(b, i, e, &name, out);
                    }
                    0x5B if b[*i + 1] == 0x82 => {
                        *i += 2;
                        let e = pkg_length(b, i);
                        let name = name_string(b, i, scope);
                        terms(b, i, e, &name, out);
                    }
                    op => panic!("unexpected term opcode {op:#x} at {i}"),
                }
            }
            assert_eq!(*i, end, "term list ends at its PkgLength");
        }
        let mut out = Vec::new();
        let mut i = 0;
        terms(aml, &mut i, aml.len(), "\\", &mut out);
        out
    }

    fn lookup<'a>(ns: &'a [(String, Obj)], path: &str) -> &'a Obj {
        ns.iter().find(|(n, _)| n == path).map(|(_, o)| o).unwrap_or_else(|| panic!("no {path} in {ns:?}"))
    }

    /// The small and large resource descriptors of a ResourceTemplate (ACPI 6.3 §6.4), read by
    /// their spec layout: (tag byte, body). Checks the buffer ends in an End Tag.
    fn resource_descriptors(buf: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let tag = buf[i];
            if tag & 0x80 == 0 {
                // Small: bits 6:3 name, 2:0 length.
                let len = (tag & 7) as usize;
                if tag >> 3 == 0x0F {
                    assert_eq!(i + 2, buf.len(), "End Tag (0x79, checksum) is last");
                    return out;
                }
                out.push((tag, buf[i + 1..i + 1 + len].to_vec()));
                i += 1 + len;
            } else {
                // Large: a 16-bit length follows.
                let len = u16_at(buf, i + 1) as usize;
                out.push((tag, buf[i + 3..i + 3 + len].to_vec()));
                i += 3 + len;
            }
        }
    }

    #[test]
    fn dsdt_declares_the_pci_root_bridge() {
        let ram = 256u64 << 20;
        let (_, p) = build_vec(&AcpiConfig::pc_with_pci(2, ram), BASE);
        assert_eq!(p.dsdt.len(), 36 + 26 + 1739, "the size the module documentation gives");
        let ns = decode_namespace(&p.dsdt[36..]);
        let names: Vec<&str> = ns.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "\\_S0_",
                "\\_S5_",
                "\\_SB_.PCI0._HID",
                "\\_SB_.PCI0._UID",
                "\\_SB_.PCI0._SEG",
                "\\_SB_.PCI0._BBN",
                "\\_SB_.PCI0._CRS",
                "\\_SB_.PCI0._PRT"
            ]
        );
        // EisaId ("PNP0A03"): compressed vendor "PNP" and product 0x0A03 (§19.6.35), stored
        // as a DWord with bytes 41 D0 0A 03, as iasl writes it.
        assert!(p.dsdt.windows(9).any(|w| w == [b'_', b'H', b'I', b'D', 0x0C, 0x41, 0xD0, 0x0A, 0x03]));
        assert_eq!(lookup(&ns, "\\_SB_.PCI0._HID"), &Obj::Int(0x030A_D041));
        for name in ["_UID", "_SEG", "_BBN"] {
            assert_eq!(lookup(&ns, &format!("\\_SB_.PCI0.{name}")), &Obj::Int(0), "{name}");
        }

        // _PRT: 32 devices x 4 pins, each { 0xDDDDFFFF, pin, 0, GSI 16 + (device + pin) % 4 }.
        let Obj::Pkg(prt) = lookup(&ns, "\\_SB_.PCI0._PRT") else { panic!("_PRT is a package") };
        assert_eq!(prt.len(), 128);
        let mut seen = std::collections::BTreeSet::new();
        for e in prt {
            let Obj::Pkg(f) = e else { panic!("_PRT entry is a package") };
            let [Obj::Int(addr), Obj::Int(pin), Obj::Int(source), Obj::Int(gsi)] = f.as_slice() else {
                panic!("{f:?}")
            };
            let device = (addr >> 16) as u8;
            assert_eq!(addr & 0xFFFF, 0xFFFF, "any function");
            assert!(*addr >> 16 < 32 && *pin < 4 && *source == 0, "{f:?}");
            assert_eq!(*gsi, 16 + (u64::from(device) + pin) % 4, "{f:?}");
            assert_eq!(*gsi, u64::from(pci_intx_gsi(device, *pin as u8)));
            assert!(seen.insert((device, *pin)), "one entry per device and pin");
        }

        // _CRS: a ResourceTemplate (a buffer of resource descriptors).
        let Obj::Buf(buf) = lookup(&ns, "\\_SB_.PCI0._CRS") else { panic!("_CRS is a buffer") };
        let buf = buf.clone();
        // ... and by the spec's layouts (§6.4.3.5.1-3, §6.4.2.5).
        let d = resource_descriptors(&buf);
        // Word Address Space (0x88): type, general flags, type flags, granularity, min, max,
        // translation, length. General flags 0x0C: MinFixed, MaxFixed, producer, positive decode.
        assert_eq!(d[0], (0x88, vec![2, 0x0C, 0, 0, 0, 0, 0, 0xFF, 0, 0, 0, 0, 1]), "WordBusNumber 0-255");
        assert_eq!(d[1], (0x47, vec![1, 0xF8, 0x0C, 0xF8, 0x0C, 1, 8]), "IO (Decode16, 0xCF8, 0xCF8, 1, 8)");
        // I/O type flags 3: ISA and non-ISA ranges (EntireRange).
        assert_eq!(d[2], (0x88, vec![1, 0x0C, 3, 0, 0, 0, 0, 0xF7, 0x0C, 0, 0, 0xF8, 0x0C]), "WordIO 0-0xCF7");
        assert_eq!(d[3], (0x88, vec![1, 0x0C, 3, 0, 0, 0, 0x0D, 0xFF, 0xFF, 0, 0, 0, 0xF3]), "WordIO 0xD00-0xFFFF");
        // DWord Address Space (0x87), memory (type 0), read-write non-cacheable (type flags 1).
        let (tag, m) = &d[4];
        assert_eq!((*tag, m.len(), m[0], m[1], m[2]), (0x87, 23, 0, 0x0C, 1), "DWordMemory");
        assert_eq!(
            (u32_at(m, 7), u32_at(m, 11), u32_at(m, 15), u32_at(m, 19)),
            (0xC000_0000, 0xFEBF_FFFF, 0, 0x3EC0_0000)
        );
    }

    #[test]
    fn pci_mmio_window_follows_ram() {
        let w = |base: u32| Some(MmioWindow { base, last: PCI_MMIO32_LAST });
        assert_eq!(pci_mmio32_window(0), w(0xC000_0000));
        assert_eq!(pci_mmio32_window(64 << 20), w(0xC000_0000));
        assert_eq!(pci_mmio32_window(0xC000_0000), w(0xC000_0000));
        assert_eq!(pci_mmio32_window(0xC000_0001), w(0xC010_0000));
        assert_eq!(pci_mmio32_window(0xE000_0000), w(0xE000_0000));
        assert_eq!(pci_mmio32_window(0xFEB0_0000), w(0xFEB0_0000));
        for ram in [0xFEC0_0000u64, 0xFEBF_FFFF, 1 << 32, u64::MAX] {
            assert_eq!(pci_mmio32_window(ram), None, "{ram:#x}");
        }
        // No window: the bridge has buses and I/O only.
        let (_, p) = build_vec(&AcpiConfig::pc_with_pci(1, 1 << 32), BASE);
        let ns = decode_namespace(&p.dsdt[36..]);
        let Obj::Buf(crs) = lookup(&ns, "\\_SB_.PCI0._CRS") else { panic!() };
        let d = resource_descriptors(crs);
        assert_eq!(d.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [0x88, 0x47, 0x88, 0x88]);
        // A window reaching the APICs is refused.
        let mut buf = vec![0; MAX_LEN];
        let bad = AcpiConfig {
            pci: Some(PciRoot { mmio32: Some(MmioWindow { base: 0xC000_0000, last: 0xFEC0_0000 }) }),
            ..AcpiConfig::pc(1)
        };
        assert!(matches!(build(&bad, BASE, &mut buf), Err(AcpiError::BadConfig(_))));
        let empty =
            AcpiConfig { pci: Some(PciRoot { mmio32: Some(MmioWindow { base: 2, last: 1 }) }), ..AcpiConfig::pc(1) };
        assert!(matches!(build(&empty, BASE, &mut buf), Err(AcpiError::BadConfig(_))));
    }

    #[test]
    fn sleep_request_decodes_pm1_control() {
        assert_eq!(sleep_request(PM1_CNT_SCI_EN), None);
        assert_eq!(sleep_request(5 << 10 | 1 << 13 | 1), Some(SLP_TYP_S5));
        assert_eq!(sleep_request(1 << 13), Some(SLP_TYP_S0));
        assert_eq!(sleep_request(5 << 10), None, "SLP_TYP alone does nothing");
    }

    #[test]
    fn buffer_too_small() {
        let config = AcpiConfig::pc(4);
        let needed = required_len(&config, BASE).unwrap();
        let mut buf = vec![0; needed - 1];
        assert_eq!(build(&config, BASE, &mut buf), Err(AcpiError::BufferTooSmall { needed, have: needed - 1 }));
        assert!(buf.iter().all(|&b| b == 0), "nothing written on error");
        assert_eq!(build(&config, BASE, &mut []), Err(AcpiError::BufferTooSmall { needed, have: 0 }));
        let mut buf = vec![0; needed];
        assert_eq!(build(&config, BASE, &mut buf), Ok((BASE, needed)));
    }

    #[test]
    fn bad_configs_are_errors() {
        let mut buf = vec![0; MAX_LEN];
        let pc = AcpiConfig::pc(1);
        let bad = [
            AcpiConfig { cpus: 0, ..pc },
            AcpiConfig { cpus: 256, ..pc },
            AcpiConfig { cpus: u32::MAX, ..pc },
            AcpiConfig { lapic_addr: 0x1_FEE0_0000, ..pc },
            AcpiConfig { lapic_addr: 0xFEE0_0800, ..pc },
            AcpiConfig { ioapic_addr: 0, ..pc },
            AcpiConfig { ioapic_addr: u64::MAX, ..pc },
            AcpiConfig { pm1a_evt: 0, ..pc },
            AcpiConfig { pm1a_evt: 0x601, ..pc },
            AcpiConfig { pm1a_cnt: 0, ..pc },
            AcpiConfig { pm1a_cnt: 0x606, ..pc },
            AcpiConfig { pm_tmr: 0x609, ..pc },
            AcpiConfig { sci_irq: 0, ..pc },
            AcpiConfig { sci_irq: 2, ..pc },
            AcpiConfig { sci_irq: 16, ..pc },
            AcpiConfig { sci_irq: 255, ..pc },
        ];
        for config in bad {
            let err = build(&config, BASE, &mut buf).unwrap_err();
            assert!(matches!(err, AcpiError::BadConfig(_) | AcpiError::BadCpuCount(_)), "{config:?}: {err}");
            assert_eq!(required_len(&config, BASE).unwrap_err(), err);
        }
        // The guest-physical address space ends before the tables do.
        for base in [u64::MAX, u64::MAX - 15, u64::MAX - 0x100] {
            assert_eq!(build(&pc, base, &mut buf), Err(AcpiError::AddressOverflow), "{base:#x}");
        }
    }

    #[test]
    fn above_4g_uses_64_bit_addresses_only() {
        let base = 0x1_0000_0000;
        let (_, p) = build_vec(&AcpiConfig::pc(2), base);
        assert!(p.rsdt.is_none(), "no RSDT above 4 GiB");
        assert_eq!(u32_at(&p.fadt, 36), 0, "FIRMWARE_CTRL");
        assert_eq!(u64_at(&p.fadt, 132), p.facs_gpa, "X_FIRMWARE_CTRL");
        assert_eq!(u32_at(&p.fadt, 40), 0, "DSDT");
        assert_eq!(u64_at(&p.fadt, 140), p.dsdt_gpa, "X_DSDT");
        assert!(p.dsdt_gpa > base);

        // Approaching 4 GiB: an RSDT exactly while everything ends below 4 GiB; 32-bit
        // FADT addresses exactly for what lies below.
        let config = AcpiConfig::pc(1);
        let mut straddled = false;
        for base in (FOUR_GIB - 0x400..FOUR_GIB).step_by(16) {
            let (buf, p) = build_vec(&config, base);
            let end = base + buf.len() as u64;
            if p.rsdt.is_some() {
                assert!(end <= FOUR_GIB, "{base:#x}: RSDT above 4 GiB");
            } else {
                assert!(end + 44 > FOUR_GIB, "{base:#x}: an RSDT would have fit below 4 GiB");
            }
            assert_eq!(u32_at(&p.fadt, 40) != 0, p.dsdt_gpa < FOUR_GIB, "{base:#x}");
            assert_eq!(u32_at(&p.fadt, 36) != 0, p.facs_gpa < FOUR_GIB, "{base:#x}");
            straddled |= p.rsdt.is_none() && u32_at(&p.fadt, 40) != 0;
        }
        assert!(straddled, "some base puts the DSDT below 4 GiB and the RSDT above");
    }

    #[test]
    fn unaligned_base_aligns_by_guest_address() {
        for base in [0x1001u64, 0x100F, 0x1010, 0x1030] {
            let (_, p) = build_vec(&AcpiConfig::pc(3), base);
            assert_eq!(p.rsdp_gpa % 16, 0);
            assert!(p.rsdp_gpa >= base && p.rsdp_gpa < base + 16);
            assert_eq!(p.facs_gpa % 64, 0);
        }
    }

    #[test]
    fn max_len_bounds_every_layout() {
        let worst = AcpiConfig { x2apic: true, ..AcpiConfig::pc_with_pci(MAX_CPUS, 0) };
        for base in 0..128u64 {
            assert!(required_len(&worst, base).unwrap() <= MAX_LEN);
        }
    }

    #[test]
    fn build_is_deterministic_and_idempotent() {
        let config = AcpiConfig { x2apic: true, ..AcpiConfig::pc(8) };
        let mut a = vec![0x55; MAX_LEN];
        let mut b = vec![0x00; MAX_LEN];
        let ra = build(&config, BASE, &mut a).unwrap();
        let rb = build(&config, BASE, &mut b).unwrap();
        assert_eq!(ra, rb);
        assert_eq!(a[..ra.1], b[..rb.1]);
    }

    /// Writes the tables as separate files for the ACPICA tools, and the whole buffer as
    /// `all.bin` / `allx2.bin`, into the directory named by VIREO_ACPI_DUMP; VIREO_ACPI_BASE
    /// (hex, default 0xE0000) and VIREO_ACPI_CPUS (default 4) choose the layout:
    /// `VIREO_ACPI_DUMP=/tmp/acpi cargo test -p hypervisor --lib acpi::tests::dump -- --ignored`,
    /// then `iasl -d /tmp/acpi/*.dat`, or `acpiexec -b "sleep 5" facp.dat dsdt.dat facs.dat`.
    #[test]
    #[ignore = "writes files for iasl; run by hand"]
    fn dump_for_iasl() {
        let Some(dir) = std::env::var_os("VIREO_ACPI_DUMP") else { return };
        let base = std::env::var("VIREO_ACPI_BASE")
            .map(|b| u64::from_str_radix(b.trim_start_matches("0x"), 16).unwrap())
            .unwrap_or(BASE);
        let cpus = std::env::var("VIREO_ACPI_CPUS").map(|c| c.parse().unwrap()).unwrap_or(4);
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: std::string::String, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
        for (suffix, x2apic) in [("", false), ("x2", true)] {
            let (buf, p) = build_vec(&AcpiConfig { x2apic, ..AcpiConfig::pc_with_pci(cpus, 256 << 20) }, base);
            let at = |gpa: u64, len: usize| &buf[(gpa - base) as usize..(gpa - base) as usize + len];
            let rsdp = at(p.rsdp_gpa, 36);
            write(std::format!("rsdp{suffix}.dat"), rsdp);
            write(std::format!("xsdt{suffix}.dat"), at(u64_at(rsdp, 24), 52));
            write(std::format!("facs{suffix}.dat"), at(p.facs_gpa, 64));
            for (sig, t) in [("facp", &p.fadt), ("apic", &p.madt), ("dsdt", &p.dsdt)] {
                write(std::format!("{sig}{suffix}.dat"), t);
            }
            write(std::format!("all{suffix}.bin"), &buf);
        }
    }
}
