//! ACPI fixed hardware (ACPI 6.x §4.8: PM1 event and control registers, PM timer) and the
//! PC's legacy reset and power controls: the reset control register 0xCF9 (ICH/PIIX4), the
//! 8042 keyboard controller's reset line (0x64), and system control port A (0x92).
//!
//! Ports (the PM1 blocks are configurable; the FADT the VMM builds must name the same):
//! - PM1a_EVT_BLK, 4 bytes (default 0x600): PM1_STS (16 bits, write 1 to clear) then PM1_EN.
//!   Modelled status bits: TMR_STS (bit 0: set whenever bit 23 of the PM timer changes) and
//!   PWRBTN_STS (bit 8: [`Pm::press_power_button`]). GBL/SLPBTN/RTC/PCIEXP bits can be
//!   enabled but are never set. The SCI ([`Pm::sci_level`]) is high while an enabled status
//!   bit is set.
//! - PM1a_CNT_BLK, 2 bytes (default 0x604): SCI_EN (bit 0) always reads 1 (there is no SMM,
//!   the OS owns the hardware from the start, so the FADT needs no SMI_CMD); BM_RLD (bit 1)
//!   and SLP_TYP (bits 12:10) are stored; GBL_RLS (bit 2) and SLP_EN (bit 13) are write-only.
//!   Writing SLP_EN = 1 yields [`PmEffect::PowerOff`] with the SLP_TYP being written: the
//!   caller compares it with the value of the DSDT's `_S5` package ([`S5_SLP_TYP`]).
//! - PM_TMR_BLK, 4 bytes (default 0x608): the 24-bit PM timer at 3.579545 MHz, computed
//!   exactly from `now` (the FADT must not set TMR_VAL_EXT). Read-only.
//! - 0xCF9 (byte): reset control. Bits 1 (SYS_RST) and 3 (FULL_RST) are stored; writing bit 2
//!   (RST_CPU) set resets: Linux writes `cf9 | 2`, then `cf9 | 0x06` (warm) or `0x0E` (cold).
//! - 0x60/0x64: a minimal 8042. Status and data read 0 (no output, input buffer empty, so
//!   Linux's kb_wait() passes at once). Commands 0xF0-0xFE with bit 0 clear pulse the reset
//!   line (0xFE is the common one); 0xD1 (write output port) followed by a data byte with bit
//!   0 clear resets too. Other commands and data are accepted and ignored.
//! - 0x92: fast A20 (bit 1, stored; A20 is always enabled for the guest) and fast reset
//!   (bit 0: writing 1 resets).

use super::time::{cycles_at, read_lanes, split_read, split_write, time_of_cycle, write_lanes, Nanos};

/// The ACPI PM timer frequency.
pub const PM_TIMER_HZ: u64 = 3_579_545;
pub const RESET_CONTROL_PORT: u16 = 0xCF9;
pub const KBC_DATA_PORT: u16 = 0x60;
pub const KBC_COMMAND_PORT: u16 = 0x64;
pub const SYSTEM_CONTROL_A_PORT: u16 = 0x92;
/// The SLP_TYP value the VMM's DSDT `_S5` object advertises.
pub const S5_SLP_TYP: u8 = 5;
/// The conventional SCI interrupt (FADT SCI_INT).
pub const SCI_IRQ: u8 = 9;

pub const PM1_TMR_STS: u16 = 1 << 0;
pub const PM1_PWRBTN_STS: u16 = 1 << 8;
/// PM1_EN bits that exist: TMR, GBL, PWRBTN, SLPBTN, RTC enables and PCIEXP_WAKE_DIS.
const PM1_EN_MASK: u16 = 0x4721;
/// Enable bits that can raise the SCI.
const PM1_SCI_SOURCES: u16 = 0x0721;

pub const PM1_CNT_SCI_EN: u16 = 1 << 0;
const PM1_CNT_BM_RLD: u16 = 1 << 1;
const PM1_CNT_SLP_TYP: u16 = 7 << 10;
pub const PM1_CNT_SLP_EN: u16 = 1 << 13;

/// Bit 23 of the timer toggles every 2^23 ticks.
const TMR_STS_PERIOD_SHIFT: u32 = 23;
const TIMER_MASK: u64 = 0x00FF_FFFF;

/// Where the ACPI fixed-hardware blocks live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmConfig {
    pub pm1a_evt: u16,
    pub pm1a_cnt: u16,
    pub pm_tmr: u16,
}

impl Default for PmConfig {
    fn default() -> Self {
        Self { pm1a_evt: 0x600, pm1a_cnt: 0x604, pm_tmr: 0x608 }
    }
}

/// What a write asks the VMM to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmEffect {
    None,
    /// SLP_EN was written with this SLP_TYP; [`S5_SLP_TYP`] means soft-off.
    PowerOff {
        slp_typ: u8,
    },
    /// A platform reset was requested (0xCF9, 0x64, 0x92).
    Reset,
}

/// The ACPI PM registers and the legacy reset ports.
#[derive(Clone, Debug)]
pub struct Pm {
    config: PmConfig,
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    /// Which 2^23-tick period of the timer TMR_STS was last evaluated in.
    tmr_period: u64,
    last_cycle: u64,
    reset_control: u8,
    port92: u8,
    kbc_awaits_output_port: bool,
}

impl Pm {
    pub fn new(config: PmConfig) -> Self {
        Self {
            config,
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: 0,
            tmr_period: 0,
            last_cycle: 0,
            reset_control: 0,
            port92: 0x02,
            kbc_awaits_output_port: false,
        }
    }

    pub fn config(&self) -> PmConfig {
        self.config
    }

    /// Whether `port` is one of the device's.
    pub fn contains(&self, port: u16) -> bool {
        self.block(port).is_some()
            || matches!(port, RESET_CONTROL_PORT | KBC_DATA_PORT | KBC_COMMAND_PORT | SYSTEM_CONTROL_A_PORT)
    }

    /// An IN of `size` bytes at `port`; bytes of other ports read 0xFF.
    pub fn read(&mut self, port: u16, size: u8, now: Nanos) -> u32 {
        self.advance(now);
        if let Some((block, offset)) = self.block(port) {
            let (reg, width) = match block {
                Block::Evt => (u32::from(self.pm1_en) << 16 | u32::from(self.pm1_sts), 4),
                Block::Cnt => (u32::from(self.pm1_cnt | PM1_CNT_SCI_EN), 2),
                Block::Tmr => (self.timer_value(), 4),
            };
            return read_lanes(reg, width, offset, size);
        }
        split_read(port, size, |p| match p {
            RESET_CONTROL_PORT => self.reset_control,
            KBC_DATA_PORT | KBC_COMMAND_PORT => 0,
            SYSTEM_CONTROL_A_PORT => self.port92,
            _ => 0xFF,
        })
    }

    /// An OUT of `size` bytes at `port`; returns what the VMM must do.
    pub fn write(&mut self, port: u16, size: u8, value: u32, now: Nanos) -> PmEffect {
        self.advance(now);
        if let Some((block, offset)) = self.block(port) {
            return match block {
                Block::Evt => {
                    let (bits, mask) = write_lanes(4, offset, size, value);
                    self.pm1_sts &= !(bits as u16);
                    let en_mask = (mask >> 16) as u16;
                    self.pm1_en = (self.pm1_en & !en_mask) | ((bits >> 16) as u16 & en_mask & PM1_EN_MASK);
                    PmEffect::None
                }
                Block::Cnt => {
                    let (bits, mask) = write_lanes(2, offset, size, value);
                    let (bits, mask) = (bits as u16, mask as u16);
                    let merged = (self.pm1_cnt & !mask) | bits;
                    self.pm1_cnt = merged & (PM1_CNT_BM_RLD | PM1_CNT_SLP_TYP);
                    if bits & PM1_CNT_SLP_EN != 0 {
                        PmEffect::PowerOff { slp_typ: ((merged & PM1_CNT_SLP_TYP) >> 10) as u8 }
                    } else {
                        PmEffect::None
                    }
                }
                Block::Tmr => PmEffect::None,
            };
        }
        let mut effect = PmEffect::None;
        split_write(port, size, value, |p, v| {
            if self.write_byte(p, v) == PmEffect::Reset {
                effect = PmEffect::Reset;
            }
        });
        effect
    }

    /// The PM timer's value at `now` (24 bits).
    pub fn timer(&self, now: Nanos) -> u32 {
        (cycles_at(now, PM_TIMER_HZ).max(self.last_cycle) & TIMER_MASK) as u32
    }

    /// Sets PWRBTN_STS, as pressing the power button does; with PWRBTN_EN the SCI rises and an
    /// ACPI OS starts an orderly shutdown.
    pub fn press_power_button(&mut self) {
        self.pm1_sts |= PM1_PWRBTN_STS;
    }

    /// The SCI level as of the last access or tick.
    pub fn sci_level(&self) -> bool {
        self.pm1_sts & self.pm1_en & PM1_SCI_SOURCES != 0
    }

    /// When TMR_STS next sets, if the timer interrupt is enabled and not already pending.
    pub fn next_deadline(&self) -> Option<Nanos> {
        if self.pm1_en & PM1_TMR_STS == 0 || self.pm1_sts & PM1_TMR_STS != 0 {
            return None;
        }
        Some(time_of_cycle((self.tmr_period + 1) << TMR_STS_PERIOD_SHIFT, PM_TIMER_HZ))
    }

    /// Advances TMR_STS to `now`.
    pub fn tick(&mut self, now: Nanos) {
        self.advance(now);
    }

    fn advance(&mut self, now: Nanos) {
        self.last_cycle = cycles_at(now, PM_TIMER_HZ).max(self.last_cycle);
        let period = self.last_cycle >> TMR_STS_PERIOD_SHIFT;
        if period != self.tmr_period {
            self.pm1_sts |= PM1_TMR_STS;
            self.tmr_period = period;
        }
    }

    fn timer_value(&self) -> u32 {
        (self.last_cycle & TIMER_MASK) as u32
    }

    fn block(&self, port: u16) -> Option<(Block, u16)> {
        let c = &self.config;
        [(Block::Evt, c.pm1a_evt, 4), (Block::Cnt, c.pm1a_cnt, 2), (Block::Tmr, c.pm_tmr, 4)]
            .into_iter()
            .find(|&(_, base, len)| port.wrapping_sub(base) < len)
            .map(|(block, base, _)| (block, port.wrapping_sub(base)))
    }

    fn write_byte(&mut self, port: u16, v: u8) -> PmEffect {
        match port {
            RESET_CONTROL_PORT => {
                self.reset_control = v & 0x0A;
                if v & 0x04 != 0 {
                    return PmEffect::Reset;
                }
            }
            KBC_COMMAND_PORT => {
                self.kbc_awaits_output_port = v == 0xD1;
                if v & 0xF1 == 0xF0 {
                    return PmEffect::Reset;
                }
            }
            KBC_DATA_PORT => {
                // The byte after command 0xD1 is the output port; its bit 0 is the reset line.
                let output_port = core::mem::take(&mut self.kbc_awaits_output_port);
                if output_port && v & 1 == 0 {
                    return PmEffect::Reset;
                }
            }
            SYSTEM_CONTROL_A_PORT => {
                self.port92 = v & !1;
                if v & 1 != 0 {
                    return PmEffect::Reset;
                }
            }
            _ => {}
        }
        PmEffect::None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Evt,
    Cnt,
    Tmr,
}

/// ACPI fixed hardware and the reset paths on the bus, driving the SCI.
pub struct PmDevice {
    pub pm: Pm,
    sci: super::irqchip::IrqLine,
}

impl PmDevice {
    pub fn new(config: PmConfig, sci: super::irqchip::IrqLine) -> Self {
        Self { pm: Pm::new(config), sci }
    }

    /// PM1 event, control and timer blocks; reset control, keyboard controller, port 92h.
    pub fn ranges(&self) -> [super::bus::Range; 7] {
        use super::bus::Range;
        let c = self.pm.config();
        [
            Range::port(c.pm1a_evt, 4),
            Range::port(c.pm1a_cnt, 2),
            Range::port(c.pm_tmr, 4),
            Range::port(RESET_CONTROL_PORT, 1),
            Range::port(KBC_DATA_PORT, 1),
            Range::port(KBC_COMMAND_PORT, 1),
            Range::port(SYSTEM_CONTROL_A_PORT, 1),
        ]
    }
}

impl super::bus::Device for PmDevice {
    fn name(&self) -> &'static str {
        "pm"
    }

    fn read(&mut self, addr: u64, size: u8, cx: &super::bus::Ctx<'_>) -> u64 {
        let v = self.pm.read(addr as u16, size, cx.now);
        self.sci.set(self.pm.sci_level());
        v as u64
    }

    fn write(&mut self, addr: u64, size: u8, value: u64, cx: &super::bus::Ctx<'_>) -> super::bus::BusEffect {
        use super::bus::BusEffect;
        let effect = match self.pm.write(addr as u16, size, value as u32, cx.now) {
            // Sleep states other than S5 (the DSDT offers only S0 and S5) are ignored.
            PmEffect::PowerOff { slp_typ } if slp_typ == S5_SLP_TYP => BusEffect::PowerOff,
            PmEffect::Reset => BusEffect::Reset,
            _ => BusEffect::None,
        };
        self.sci.set(self.pm.sci_level());
        effect
    }

    fn tick(&mut self, cx: &super::bus::Ctx<'_>) {
        self.pm.tick(cx.now);
        self.sci.set(self.pm.sci_level());
    }

    fn next_deadline(&self) -> Option<Nanos> {
        self.pm.next_deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> Pm {
        Pm::new(PmConfig::default())
    }

    /// Linux's acpi_pm clocksource reads the timer with inl() and masks 24 bits; it must
    /// advance, be monotonic but for the 24-bit wrap, and run at 3.579545 MHz exactly.
    #[test]
    fn pm_timer_is_exact_monotonic_and_wraps_at_24_bits() {
        let mut p = pm();
        let t = |ns: u64| Nanos(ns);
        assert_eq!(p.read(0x608, 4, t(0)), 0);
        assert_eq!(p.read(0x608, 4, Nanos::from_secs(1)), PM_TIMER_HZ as u32);
        let wrap = time_of_cycle(1 << 24, PM_TIMER_HZ);
        assert_eq!(p.read(0x608, 4, Nanos(wrap.0 - 1)), 0xFF_FFFF);
        assert_eq!(p.read(0x608, 4, wrap), 0);
        assert_eq!(p.read(0x608, 4, Nanos(wrap.0 + 1_000)) >> 24, 0, "bits 31:24 read 0");
        // acpi_pm's init check: successive reads advance, or wrap to a small value.
        let mut prev = p.read(0x608, 4, Nanos(wrap.0 + 2_000));
        let mut now = wrap.0 + 2_000;
        for _ in 0..100_000 {
            now += 397;
            let v = p.read(0x608, 4, Nanos(now));
            assert!(v > prev || (v < prev && v < 0xFFF), "{prev:#x} -> {v:#x}");
            prev = v;
        }
        // Byte and word reads see the same value.
        let now = Nanos::from_secs(7);
        let full = p.read(0x608, 4, now);
        assert_eq!(p.read(0x608, 2, now) | p.read(0x60A, 1, now) << 16, full);
        assert_eq!(p.read(0x60B, 1, now), 0);
        assert_eq!(p.timer(now), full);
        // Writes are ignored; time never runs backwards.
        assert_eq!(p.write(0x608, 4, 0, now), PmEffect::None);
        assert_eq!(p.read(0x608, 4, Nanos::ZERO), full);
    }

    /// ACPICA acpi_hw_legacy_sleep(): read PM1_CNT, write SLP_TYP, then SLP_TYP | SLP_EN.
    #[test]
    fn s5_write_gives_power_off() {
        let mut p = pm();
        let now = Nanos::ZERO;
        let cnt = p.read(0x604, 2, now) as u16;
        assert_eq!(cnt & PM1_CNT_SCI_EN, PM1_CNT_SCI_EN, "ACPI mode from the start");
        let cnt = (cnt & !(PM1_CNT_SLP_TYP | PM1_CNT_SLP_EN)) | (S5_SLP_TYP as u16) << 10;
        assert_eq!(p.write(0x604, 2, cnt as u32, now), PmEffect::None);
        assert_eq!(p.read(0x604, 2, now), 0x1401);
        assert_eq!(p.write(0x604, 2, (cnt | PM1_CNT_SLP_EN) as u32, now), PmEffect::PowerOff { slp_typ: 5 });
        assert_eq!(p.read(0x604, 2, now) as u16 & PM1_CNT_SLP_EN, 0, "SLP_EN is write-only");
        // A byte write to the high half works too, and another SLP_TYP is reported as is.
        assert_eq!(p.write(0x605, 1, 0x20 | 1 << 2, now), PmEffect::PowerOff { slp_typ: 1 });
        // Clearing SCI_EN is not possible.
        p.write(0x604, 2, 0, now);
        assert_eq!(p.read(0x604, 2, now), 1);
        assert_eq!(p.read(0x604, 4, now), 0xFFFF_0001, "bytes past the register read all ones");
    }

    #[test]
    fn pm1_status_enable_and_sci() {
        let mut p = pm();
        let now = Nanos::ZERO;
        p.press_power_button();
        assert!(!p.sci_level(), "not enabled");
        assert_eq!(p.read(0x600, 2, now), 0x0100);
        p.write(0x602, 2, 0x0100, now); // PWRBTN_EN
        assert!(p.sci_level());
        assert_eq!(p.read(0x600, 4, now), 0x0100_0100);
        p.write(0x600, 2, 0x0100, now); // write 1 to clear
        assert!(!p.sci_level());
        assert_eq!(p.read(0x600, 2, now), 0);
        p.write(0x602, 2, 0xFFFF, now);
        assert_eq!(p.read(0x602, 2, now), 0x4721, "only the defined enables stick");
        // TMR_STS: set when timer bit 23 flips; with TMR_EN it raises the SCI.
        p.write(0x602, 2, 0x0001, now);
        let flip = time_of_cycle(1 << 23, PM_TIMER_HZ);
        assert_eq!(p.next_deadline(), Some(flip));
        p.tick(Nanos(flip.0 - 1));
        assert!(!p.sci_level());
        p.tick(flip);
        assert!(p.sci_level());
        assert_eq!(p.next_deadline(), None);
        p.write(0x600, 4, 0x0001_0001, flip); // clear TMR_STS, keep TMR_EN (dword access)
        assert!(!p.sci_level());
        assert_eq!(p.next_deadline(), Some(time_of_cycle(2 << 23, PM_TIMER_HZ)));
    }

    #[test]
    fn reset_paths() {
        let mut p = pm();
        let now = Nanos::ZERO;
        // Linux BOOT_CF9_FORCE: cf9 | 2, then cf9 | 6 (warm) or cf9 | 0x0E (cold).
        let cf9 = p.read(0xCF9, 1, now) as u8 & !0x06;
        assert_eq!(p.write(0xCF9, 1, (cf9 | 2) as u32, now), PmEffect::None);
        assert_eq!(p.read(0xCF9, 1, now), 0x02);
        assert_eq!(p.write(0xCF9, 1, (cf9 | 6) as u32, now), PmEffect::Reset);
        assert_eq!(p.write(0xCF9, 1, 0x0E, now), PmEffect::Reset);
        // Linux BOOT_KBD: kb_wait() polls status bit 1, then writes 0xFE.
        assert_eq!(p.read(0x64, 1, now) & 0x02, 0);
        assert_eq!(p.read(0x60, 1, now), 0);
        assert_eq!(p.write(0x64, 1, 0xFE, now), PmEffect::Reset);
        for cmd in [0x20, 0x60, 0xA7, 0xAA, 0xAD, 0xAE, 0xFF] {
            assert_eq!(p.write(0x64, 1, cmd, now), PmEffect::None, "{cmd:#x}");
        }
        assert_eq!(p.write(0x60, 1, 0xF4, now), PmEffect::None);
        // Write output port with the reset bit low.
        assert_eq!(p.write(0x64, 1, 0xD1, now), PmEffect::None);
        assert_eq!(p.write(0x60, 1, 0xDF, now), PmEffect::None, "bit 0 high: no reset");
        assert_eq!(p.write(0x64, 1, 0xD1, now), PmEffect::None);
        assert_eq!(p.write(0x60, 1, 0xDE, now), PmEffect::Reset);
        // Port 0x92: A20 stays readable, bit 0 resets.
        assert_eq!(p.read(0x92, 1, now), 0x02);
        assert_eq!(p.write(0x92, 1, 0x00, now), PmEffect::None);
        assert_eq!(p.read(0x92, 1, now), 0x00);
        assert_eq!(p.write(0x92, 1, 0x03, now), PmEffect::Reset);
        assert_eq!(p.read(0x92, 1, now), 0x02);
    }

    #[test]
    fn any_port_size_value_is_harmless() {
        let mut p = Pm::new(PmConfig { pm1a_evt: 0xFFFE, pm1a_cnt: 0x0000, pm_tmr: 0x0001 });
        assert!(p.contains(0xFFFF) && p.contains(0x0001) && p.contains(0x0004));
        let mut t = 0;
        for port in (0..0x10u16).chain(0x5E..0x66).chain(0x90..0x94).chain(0x600..0x60C).chain(0xCF8..0xD00) {
            for size in [0, 1, 2, 3, 4] {
                for v in [0u32, 0x01, 0x2000, 0x3C00, 0xFFFF, 0xFFFF_FFFF] {
                    t += 1_000_000;
                    let _ = p.write(port, size, v, Nanos(t));
                    let _ = p.read(port, size, Nanos(t));
                    let _ = p.next_deadline();
                    p.tick(Nanos(t));
                }
            }
        }
        p.tick(Nanos::MAX);
        let _ = p.next_deadline();
        let _ = p.read(0x0001, 4, Nanos::MAX);
        assert_eq!(pm().read(0x1234, 2, Nanos::ZERO), 0xFFFF);
    }
}
