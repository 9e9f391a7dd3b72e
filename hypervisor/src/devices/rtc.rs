//! The MC146818 real-time clock and CMOS RAM (Motorola MC146818A datasheet), as on a PC.
//!
//! Ports: 0x70 index (bits 6:0; bit 7 is the PC's NMI mask, remembered but not acted upon,
//! [`Mc146818::nmi_disabled`]), 0x71 data. Registers:
//! - 0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week (1 = Sunday), 0x07 day of
//!   month, 0x08 month, 0x09 year, and 0x32 century (the PC/ACPI FADT convention): derived
//!   from the wall clock, in BCD or binary per status B DM (bit 2), hours in 24- or 12-hour
//!   form per status B bit 1 (12-hour: bit 7 = PM).
//! - 0x01, 0x03, 0x05 seconds/minutes/hours alarm (0xC0-0xFF = don't care).
//! - 0x0A status A: UIP (bit 7) reads 1 during the last 244 us before each second's update
//!   (the datasheet's tBUC; the update itself is instantaneous, so UIP is never high for
//!   longer and readers that wait for it to drop wait at most 244 us), 0 while SET is 1 or
//!   the divider is held in reset; DV (bits 6:4) and RS (bits 3:0) are stored.
//! - 0x0B status B: SET, PIE, AIE, UIE, SQWE, DM, 24/12, DSE (DSE is stored, no DST jumps).
//! - 0x0C status C: IRQF, PF, AF, UF; reading clears it.
//! - 0x0D status D: VRT (0x80, the battery is good).
//! - 0x0E-0x7F: battery-backed RAM (0x32 is the century, see above).
//!
//! The wall clock starts at the Unix time given to [`Mc146818::new`] at guest time 0 and
//! advances with `now`. While status B SET is 1 the clock is frozen and the guest writes the
//! time fields; they are normalised (out-of-range values clamped, e.g. 31 February becomes
//! the month's last day) when SET returns to 0, and the clock resumes from them. A time
//! write with SET 0 takes effect at once, keeping the sub-second phase. Writes to the day of
//! week are ignored: it is derived from the date.
//!
//! Interrupts (IRQ 8, [`Mc146818::irq_level`] = status C IRQF): all three sources are
//! modelled. PF is set at every period of the rate in RS (periods counted on the 32.768 kHz
//! time base from guest time 0; RS 0 or a divider held in reset (DV 11x) stops it); UF at
//! every wall-clock second while SET is 0; AF at every second matching the alarm registers
//! while SET is 0. The flags are set whether or not enabled (as on the chip); IRQF is the OR
//! of the enabled ones, and the line stays high until status C is read.

use super::time::{cycles_at, earliest, split_read, split_write, time_of_cycle, Nanos, NANOS_PER_SEC};

pub const INDEX_PORT: u16 = 0x70;
pub const DATA_PORT: u16 = 0x71;
/// The ISA interrupt line of the RTC.
pub const RTC_IRQ: u8 = 8;
/// The CMOS index of the century byte (to put in the FADT's CENTURY field).
pub const CENTURY_INDEX: u8 = 0x32;

const REG_SECONDS: u8 = 0x00;
const REG_SECONDS_ALARM: u8 = 0x01;
const REG_MINUTES: u8 = 0x02;
const REG_MINUTES_ALARM: u8 = 0x03;
const REG_HOURS: u8 = 0x04;
const REG_HOURS_ALARM: u8 = 0x05;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0A;
const REG_B: u8 = 0x0B;
const REG_C: u8 = 0x0C;
const REG_D: u8 = 0x0D;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_UIE: u8 = 0x10;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
/// PF, AF, UF in status C; PIE, AIE, UIE sit at the same positions in status B.
const C_SOURCES: u8 = 0x70;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;

/// How long before each update UIP is set (tBUC, MC146818A datasheet).
const UIP_LEAD_NS: u64 = 244_000;
/// The time base the periodic rates divide.
const TIME_BASE_HZ: u64 = 32_768;
const SECS_PER_DAY: i64 = 86_400;
/// Start times beyond this (year ~ 292 billion) are clamped so that no arithmetic overflows.
const MAX_START_SECS: u64 = i64::MAX as u64 / 4;

/// Broken-down time as held in the clock registers, decoded to binary. While SET is 1 these
/// are what the guest wrote and may be out of range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fields {
    sec: u8,
    min: u8,
    hour: u8,
    day: u8,
    month: u8,
    year: u8,
    century: u8,
}

impl Fields {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let sod = secs.rem_euclid(SECS_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        Self {
            sec: (sod % 60) as u8,
            min: (sod / 60 % 60) as u8,
            hour: (sod / 3600) as u8,
            day: d as u8,
            month: m as u8,
            year: y.rem_euclid(100) as u8,
            century: (y.div_euclid(100)).rem_euclid(100) as u8,
        }
    }

    /// Seconds since the Unix epoch, clamping every field into its range.
    fn to_unix(self) -> i64 {
        let y = self.century as i64 * 100 + self.year as i64;
        let month = self.month.clamp(1, 12) as u32;
        let day = (self.day as u32).clamp(1, days_in_month(y, month));
        let sod = self.hour.min(23) as i64 * 3600 + self.min.min(59) as i64 * 60 + self.sec.min(59) as i64;
        days_from_civil(y, month, day) * SECS_PER_DAY + sod
    }

    fn day_of_week(self) -> u8 {
        // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
        let days = days_from_civil(
            self.century as i64 * 100 + self.year as i64,
            self.month.clamp(1, 12) as u32,
            self.day.max(1) as u32,
        );
        ((days + 4).rem_euclid(7) + 1) as u8
    }
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The MC146818 RTC with its CMOS RAM.
#[derive(Clone, Debug)]
pub struct Mc146818 {
    index: u8,
    nmi_disabled: bool,
    /// Alarm registers, status A and B, and the RAM, by index (time registers unused).
    ram: [u8; 128],
    /// The wall clock read `base_secs` (a whole second) at guest time `base`.
    base_secs: i64,
    base: Nanos,
    /// The time fields while SET is 1.
    frozen: Option<Fields>,
    /// Status C PF/AF/UF, valid as of `checked`.
    flags: u8,
    checked: Nanos,
}

impl Mc146818 {
    /// An RTC whose wall clock reads `unix_secs` (seconds since 1970-01-01 UTC) at guest time
    /// 0. Status A = 0x26 (32.768 kHz, 1024 Hz periodic rate), B = 0x02 (24-hour, BCD), as a
    /// PC BIOS leaves them.
    pub fn new(unix_secs: u64) -> Self {
        let mut ram = [0; 128];
        ram[REG_A as usize] = 0x26;
        ram[REG_B as usize] = B_24H;
        Self {
            index: 0,
            nmi_disabled: false,
            ram,
            base_secs: unix_secs.min(MAX_START_SECS) as i64,
            base: Nanos::ZERO,
            frozen: None,
            flags: 0,
            checked: Nanos::ZERO,
        }
    }

    /// Whether `port` is the RTC's (0x70, 0x71).
    pub fn contains(&self, port: u16) -> bool {
        matches!(port, INDEX_PORT | DATA_PORT)
    }

    /// An IN of `size` bytes at `port` (split into bytes; other ports read 0xFF).
    pub fn read(&mut self, port: u16, size: u8, now: Nanos) -> u32 {
        split_read(port, size, |p| match p {
            DATA_PORT => self.read_reg(self.index, now),
            _ => 0xFF, // the index register is write-only
        })
    }

    /// An OUT of `size` bytes at `port` (split into bytes; other ports ignored).
    pub fn write(&mut self, port: u16, size: u8, value: u32, now: Nanos) {
        split_write(port, size, value, |p, v| match p {
            INDEX_PORT => {
                self.index = v & 0x7F;
                self.nmi_disabled = v & 0x80 != 0;
            }
            DATA_PORT => self.write_reg(self.index, v, now),
            _ => {}
        });
    }

    /// Whether the guest's last index write set bit 7 (NMIs masked on a PC).
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    /// Advances the interrupt flags to `now`.
    pub fn tick(&mut self, now: Nanos) {
        self.advance(now);
    }

    /// The level of IRQ 8 as of the last access or tick: status C IRQF.
    pub fn irq_level(&self) -> bool {
        self.flags & self.ram[REG_B as usize] & C_SOURCES != 0
    }

    /// When an enabled interrupt source next sets its flag, if IRQF is not already set.
    pub fn next_deadline(&self) -> Option<Nanos> {
        if self.irq_level() {
            return None;
        }
        let b = self.ram[REG_B as usize];
        let periodic = match self.periodic_period() {
            Some(period) if b & C_PF != 0 => {
                let next = (cycles_at(self.checked, TIME_BASE_HZ) / period + 1).saturating_mul(period);
                Some(time_of_cycle(next, TIME_BASE_HZ))
            }
            _ => None,
        };
        if self.frozen.is_some() {
            return periodic;
        }
        let s = self.elapsed_secs(self.checked);
        let update = (b & C_UF != 0).then(|| self.time_of_second(s + 1));
        let alarm = if b & C_AF != 0 {
            self.next_alarm_after(self.base_secs + s).map(|t| self.time_of_second(t - self.base_secs))
        } else {
            None
        };
        earliest(periodic, earliest(update, alarm))
    }

    /// The wall clock at `now` in seconds since the Unix epoch (the frozen value while SET).
    pub fn wall_time(&self, now: Nanos) -> i64 {
        match self.frozen {
            Some(f) => f.to_unix(),
            None => self.base_secs + self.elapsed_secs(now),
        }
    }

    /// A CMOS byte as the guest would read it at `now`.
    pub fn cmos(&mut self, index: u8, now: Nanos) -> u8 {
        self.read_reg(index & 0x7F, now)
    }

    /// Presets a RAM byte (0x0E-0x7F except the century 0x32), e.g. the memory sizes a BIOS
    /// leaves there; other indices are ignored.
    pub fn set_ram(&mut self, index: u8, value: u8) {
        if (0x0E..0x80).contains(&index) && index != CENTURY_INDEX {
            self.ram[index as usize] = value;
        }
    }

    fn elapsed_secs(&self, now: Nanos) -> i64 {
        (now.since(self.base) / NANOS_PER_SEC) as i64
    }

    fn time_of_second(&self, s: i64) -> Nanos {
        self.base.saturating_add((s.max(0) as u64).saturating_mul(NANOS_PER_SEC))
    }

    fn fields(&self, now: Nanos) -> Fields {
        self.frozen.unwrap_or_else(|| Fields::from_unix(self.wall_time(now)))
    }

    fn binary(&self) -> bool {
        self.ram[REG_B as usize] & B_DM_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            ((v / 10 % 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            (v >> 4) * 10 + (v & 0x0F)
        }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.ram[REG_B as usize] & B_24H != 0 {
            self.encode(h)
        } else {
            let h12 = if h.is_multiple_of(12) { 12 } else { h % 12 };
            self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
        }
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.ram[REG_B as usize] & B_24H != 0 {
            self.decode(v)
        } else {
            let h12 = self.decode(v & 0x7F);
            h12 % 12 + if v & 0x80 != 0 { 12 } else { 0 }
        }
    }

    fn read_reg(&mut self, index: u8, now: Nanos) -> u8 {
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY | REG_MONTH | REG_YEAR
            | CENTURY_INDEX => {
                let f = self.fields(now);
                match index {
                    REG_SECONDS => self.encode(f.sec),
                    REG_MINUTES => self.encode(f.min),
                    REG_HOURS => self.encode_hour(f.hour),
                    REG_DAY_OF_WEEK => self.encode(f.day_of_week()),
                    REG_DAY => self.encode(f.day),
                    REG_MONTH => self.encode(f.month),
                    REG_YEAR => self.encode(f.year),
                    _ => self.encode(f.century),
                }
            }
            REG_A => (self.ram[REG_A as usize] & 0x7F) | if self.update_in_progress(now) { A_UIP } else { 0 },
            REG_C => {
                self.advance(now);
                let irqf = if self.irq_level() { C_IRQF } else { 0 };
                let c = irqf | self.flags;
                self.flags = 0;
                c
            }
            REG_D => D_VRT,
            _ => self.ram[(index & 0x7F) as usize],
        }
    }

    fn write_reg(&mut self, index: u8, v: u8, now: Nanos) {
        self.advance(now);
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR | CENTURY_INDEX => {
                let mut f = self.fields(now);
                let field = match index {
                    REG_SECONDS => &mut f.sec,
                    REG_MINUTES => &mut f.min,
                    REG_HOURS => &mut f.hour,
                    REG_DAY => &mut f.day,
                    REG_MONTH => &mut f.month,
                    REG_YEAR => &mut f.year,
                    _ => &mut f.century,
                };
                *field = if index == REG_HOURS { self.decode_hour(v) } else { self.decode(v) };
                if self.frozen.is_some() {
                    self.frozen = Some(f);
                } else {
                    // Keep the phase within the second: rebase on the last whole second.
                    let whole = self.elapsed_secs(now) as u64;
                    self.base = self.base.saturating_add(whole * NANOS_PER_SEC);
                    self.base_secs = f.to_unix();
                }
            }
            REG_DAY_OF_WEEK => {}
            REG_A => self.ram[REG_A as usize] = v & 0x7F,
            REG_B => {
                let mut v = v;
                if v & B_SET != 0 {
                    v &= !B_UIE; // SET going high clears UIE
                    if self.frozen.is_none() {
                        self.frozen = Some(self.fields(now));
                    }
                } else if let Some(f) = self.frozen.take() {
                    self.base_secs = f.to_unix();
                    self.base = now;
                }
                self.ram[REG_B as usize] = v;
            }
            REG_C | REG_D => {}
            _ => self.ram[(index & 0x7F) as usize] = v,
        }
    }

    /// Whether UIP reads 1 at `now`: within tBUC before the next second's update.
    fn update_in_progress(&self, now: Nanos) -> bool {
        let divider_reset = (self.ram[REG_A as usize] >> 4) & 6 == 6;
        self.frozen.is_none() && !divider_reset && now.since(self.base) % NANOS_PER_SEC >= NANOS_PER_SEC - UIP_LEAD_NS
    }

    /// The periodic interrupt's period in time-base cycles, if it runs.
    fn periodic_period(&self) -> Option<u64> {
        let a = self.ram[REG_A as usize];
        let rs = (a & 0x0F) as u64;
        let divider_reset = (a >> 4) & 6 == 6;
        match rs {
            0 => None,
            _ if divider_reset => None,
            1 | 2 => Some(1 << (rs + 6)),
            _ => Some(1 << (rs - 1)),
        }
    }

    /// Sets PF, UF and AF for what happened between `checked` and `now`.
    fn advance(&mut self, now: Nanos) {
        if now <= self.checked {
            return;
        }
        if let Some(period) = self.periodic_period() {
            if cycles_at(now, TIME_BASE_HZ) / period > cycles_at(self.checked, TIME_BASE_HZ) / period {
                self.flags |= C_PF;
            }
        }
        if self.frozen.is_none() {
            let from = self.elapsed_secs(self.checked);
            let to = self.elapsed_secs(now);
            if to > from {
                self.flags |= C_UF;
                if self.next_alarm_after(self.base_secs + from).is_some_and(|t| t <= self.base_secs + to) {
                    self.flags |= C_AF;
                }
            }
        }
        self.checked = now;
    }

    /// An alarm register decoded: `Ok(None)` = don't care, `Err(())` = can never match.
    fn alarm_field(&self, index: u8, limit: u8) -> Result<Option<i64>, ()> {
        let raw = self.ram[index as usize];
        if raw >= 0xC0 {
            return Ok(None);
        }
        let v = if index == REG_HOURS_ALARM { self.decode_hour(raw) } else { self.decode(raw) };
        if v < limit {
            Ok(Some(v as i64))
        } else {
            Err(())
        }
    }

    /// The first wall-clock second after `s` that matches the alarm registers.
    fn next_alarm_after(&self, s: i64) -> Option<i64> {
        let hour = self.alarm_field(REG_HOURS_ALARM, 24).ok()?;
        let min = self.alarm_field(REG_MINUTES_ALARM, 60).ok()?;
        let sec = self.alarm_field(REG_SECONDS_ALARM, 60).ok()?;
        let mut t = s + 1;
        // Each step moves to the next candidate for the first mismatching field; a few steps
        // always suffice (hour, minute, second, possibly a day wrap).
        for _ in 0..16 {
            let sod = t.rem_euclid(SECS_PER_DAY);
            let day = t - sod;
            let (h, m, sc) = (sod / 3600, sod / 60 % 60, sod % 60);
            if let Some(ah) = hour {
                if h != ah {
                    t = day + ah * 3600 + if ah > h { 0 } else { SECS_PER_DAY };
                    continue;
                }
            }
            if let Some(am) = min {
                if m != am {
                    t = day + h * 3600 + if am > m { am * 60 } else { 3600 };
                    continue;
                }
            }
            if let Some(asec) = sec {
                if sc != asec {
                    t = t - sc + if asec > sc { asec } else { 60 };
                    continue;
                }
            }
            return Some(t);
        }
        None
    }
}

/// The RTC on the bus, driving IRQ8.
pub struct RtcDevice {
    pub rtc: Mc146818,
    irq8: super::irqchip::IrqLine,
}

impl RtcDevice {
    pub fn new(unix_secs: u64, irq8: super::irqchip::IrqLine) -> Self {
        Self { rtc: Mc146818::new(unix_secs), irq8 }
    }

    pub const RANGES: [super::bus::Range; 1] = [super::bus::Range::port(INDEX_PORT, 2)];
}

impl super::bus::Device for RtcDevice {
    fn name(&self) -> &'static str {
        "rtc"
    }

    fn read(&mut self, addr: u64, size: u8, cx: &super::bus::Ctx<'_>) -> u64 {
        let v = self.rtc.read(addr as u16, size, cx.now);
        self.irq8.set(self.rtc.irq_level());
        v as u64
    }

    fn write(&mut self, addr: u64, size: u8, value: u64, cx: &super::bus::Ctx<'_>) -> super::bus::BusEffect {
        self.rtc.write(addr as u16, size, value as u32, cx.now);
        self.irq8.set(self.rtc.irq_level());
        super::bus::BusEffect::None
    }

    fn tick(&mut self, cx: &super::bus::Ctx<'_>) {
        self.rtc.tick(cx.now);
        self.irq8.set(self.rtc.irq_level());
    }

    fn next_deadline(&self) -> Option<Nanos> {
        self.rtc.next_deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2023-11-14 22:13:20 UTC, a Tuesday.
    const START: u64 = 1_700_000_000;

    fn cmos_read(r: &mut Mc146818, index: u8, now: Nanos) -> u8 {
        r.write(INDEX_PORT, 1, index as u32, now);
        r.read(DATA_PORT, 1, now) as u8
    }

    fn cmos_write(r: &mut Mc146818, index: u8, v: u8, now: Nanos) {
        r.write(INDEX_PORT, 1, index as u32, now);
        r.write(DATA_PORT, 1, v as u32, now);
    }

    /// Linux 6.1 drivers/rtc/rtc-mc146818-lib.c mc146818_get_time(), BCD mode.
    #[test]
    fn linux_reads_the_time_in_bcd() {
        let mut r = Mc146818::new(START);
        let now = Nanos::from_secs(90);
        assert_eq!(cmos_read(&mut r, REG_D, now) & 0x40, 0, "RTC_VALID bit 6 must be 0");
        assert_eq!(cmos_read(&mut r, REG_D, now), 0x80);
        let sec = cmos_read(&mut r, REG_SECONDS, now);
        assert_eq!(cmos_read(&mut r, REG_A, now) & 0x80, 0, "UIP clear mid-second");
        assert_eq!(cmos_read(&mut r, REG_SECONDS, now), sec);
        let min = cmos_read(&mut r, REG_MINUTES, now);
        let hour = cmos_read(&mut r, REG_HOURS, now);
        let mday = cmos_read(&mut r, REG_DAY, now);
        let mon = cmos_read(&mut r, REG_MONTH, now);
        let year = cmos_read(&mut r, REG_YEAR, now);
        let century = cmos_read(&mut r, CENTURY_INDEX, now);
        let control = cmos_read(&mut r, REG_B, now);
        assert_eq!(control & B_DM_BINARY, 0, "BCD");
        assert_eq!((sec, min, hour, mday, mon, year, century), (0x50, 0x14, 0x22, 0x14, 0x11, 0x23, 0x20));
        assert_eq!(cmos_read(&mut r, REG_DAY_OF_WEEK, now), 3, "Tuesday (Sunday = 1)");
        assert_eq!(r.wall_time(now), START as i64 + 90);
        // UIP rises 244 us before the update and is gone with it.
        assert_eq!(cmos_read(&mut r, REG_A, Nanos(90_999_755_999)), 0x26);
        assert_eq!(cmos_read(&mut r, REG_A, Nanos(90_999_756_000)), 0xA6);
        assert_eq!(cmos_read(&mut r, REG_SECONDS, Nanos(90_999_999_999)), 0x50);
        assert_eq!(cmos_read(&mut r, REG_A, Nanos(91_000_000_000)), 0x26);
        assert_eq!(cmos_read(&mut r, REG_SECONDS, Nanos(91_000_000_000)), 0x51);
        // Time runs on with `now`, across midnight and the month.
        let now = Nanos::from_secs(90 + 16 * 86_400 + 2 * 3600);
        assert_eq!(cmos_read(&mut r, REG_DAY, now), 0x01);
        assert_eq!(cmos_read(&mut r, REG_MONTH, now), 0x12);
        assert_eq!(cmos_read(&mut r, REG_HOURS, now), 0x00);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut r = Mc146818::new(START);
        let now = Nanos::ZERO;
        cmos_write(&mut r, REG_B, B_DM_BINARY, now); // binary, 12-hour
        assert_eq!(cmos_read(&mut r, REG_HOURS, now), 0x80 | 10, "10 PM");
        assert_eq!(cmos_read(&mut r, REG_MINUTES, now), 13);
        assert_eq!(cmos_read(&mut r, CENTURY_INDEX, now), 20);
        cmos_write(&mut r, REG_B, 0, now); // BCD, 12-hour
        assert_eq!(cmos_read(&mut r, REG_HOURS, now), 0x90);
        // Midnight and noon in 12-hour form.
        let mut r = Mc146818::new(START - 22 * 3600 - 13 * 60 - 20);
        cmos_write(&mut r, REG_B, 0, Nanos::ZERO);
        assert_eq!(cmos_read(&mut r, REG_HOURS, Nanos::ZERO), 0x12, "12 AM");
        assert_eq!(cmos_read(&mut r, REG_HOURS, Nanos::from_secs(12 * 3600)), 0x92, "12 PM");
        // A 12-hour write: 0x81 = 1 PM.
        cmos_write(&mut r, REG_HOURS, 0x81, Nanos::from_secs(12 * 3600));
        cmos_write(&mut r, REG_B, B_24H, Nanos::from_secs(12 * 3600));
        assert_eq!(cmos_read(&mut r, REG_HOURS, Nanos::from_secs(12 * 3600)), 0x13);
    }

    /// mc146818_set_time(): SET, then year, month, day, hour, minutes, seconds, then restore.
    #[test]
    fn linux_sets_the_time() {
        let mut r = Mc146818::new(START);
        let t = Nanos(5_300_000_000);
        let control = cmos_read(&mut r, REG_B, t);
        cmos_write(&mut r, REG_B, control | B_SET, t);
        // Frozen while SET.
        assert_eq!(cmos_read(&mut r, REG_SECONDS, Nanos::from_secs(8)), 0x25);
        cmos_write(&mut r, CENTURY_INDEX, 0x20, t);
        cmos_write(&mut r, REG_YEAR, 0x24, t);
        cmos_write(&mut r, REG_MONTH, 0x02, t);
        cmos_write(&mut r, REG_DAY, 0x29, t);
        cmos_write(&mut r, REG_HOURS, 0x23, t);
        cmos_write(&mut r, REG_MINUTES, 0x59, t);
        cmos_write(&mut r, REG_SECONDS, 0x58, t);
        let t2 = Nanos::from_secs(20);
        cmos_write(&mut r, REG_B, control, t2);
        // 2024-02-29 23:59:58 UTC = 1709251198; three seconds later it is 1 March.
        assert_eq!(r.wall_time(t2), 1_709_251_198);
        let t3 = Nanos::from_secs(23);
        assert_eq!(
            [REG_DAY, REG_MONTH, REG_HOURS, REG_MINUTES, REG_SECONDS].map(|i| cmos_read(&mut r, i, t3)),
            [0x01, 0x03, 0x00, 0x00, 0x01]
        );
        // Out-of-range values are clamped when SET drops: 31 February 2023 -> 28 February.
        cmos_write(&mut r, REG_B, control | B_SET, t3);
        cmos_write(&mut r, REG_YEAR, 0x23, t3);
        cmos_write(&mut r, REG_MONTH, 0x02, t3);
        cmos_write(&mut r, REG_DAY, 0x31, t3);
        assert_eq!(cmos_read(&mut r, REG_DAY, t3), 0x31, "raw while SET");
        cmos_write(&mut r, REG_B, control, t3);
        assert_eq!(cmos_read(&mut r, REG_DAY, t3), 0x28);
        // A write without SET takes effect at once and keeps the sub-second phase.
        let mut r = Mc146818::new(START);
        cmos_write(&mut r, REG_MINUTES, 0x00, Nanos(2_700_000_000));
        assert_eq!(r.wall_time(Nanos(2_999_999_999)), START as i64 + 2 - 13 * 60);
        assert_eq!(r.wall_time(Nanos(3_000_000_000)), START as i64 + 3 - 13 * 60);
    }

    #[test]
    fn periodic_update_and_alarm_interrupts() {
        let mut r = Mc146818::new(START);
        assert_eq!(r.next_deadline(), None, "nothing enabled");
        // Rate 6 = 1024 Hz; PF is set even with PIE off, and read-clear.
        let t = Nanos(1_500_000);
        assert_eq!(cmos_read(&mut r, REG_C, t), C_PF);
        assert_eq!(cmos_read(&mut r, REG_C, t), 0);
        cmos_write(&mut r, REG_B, B_24H | 0x40, t); // PIE
        let d = r.next_deadline().unwrap();
        assert_eq!(d, time_of_cycle(64, TIME_BASE_HZ), "second 1024 Hz period ends at 64 cycles");
        r.tick(Nanos(d.0 - 1));
        assert!(!r.irq_level());
        r.tick(d);
        assert!(r.irq_level());
        assert_eq!(r.next_deadline(), None, "IRQF already high");
        assert_eq!(cmos_read(&mut r, REG_C, d), C_IRQF | C_PF);
        assert!(!r.irq_level());
        // Update-ended: UF each second.
        cmos_write(&mut r, REG_B, B_24H | B_UIE, d);
        assert_eq!(r.next_deadline(), Some(Nanos::from_secs(1)));
        r.tick(Nanos::from_secs(1));
        assert_eq!(cmos_read(&mut r, REG_C, Nanos::from_secs(1)) & (C_IRQF | C_UF), C_IRQF | C_UF);
        // SET clears UIE.
        cmos_write(&mut r, REG_B, B_24H | B_UIE | B_SET, Nanos::from_secs(1));
        assert_eq!(cmos_read(&mut r, REG_B, Nanos::from_secs(1)), B_24H | B_SET);
        cmos_write(&mut r, REG_B, B_24H, Nanos::from_secs(1));
        // Alarm at 22:15:00 (BCD), 99 s after the start (22:13:20 at t=0, resumed at t=1).
        let now = Nanos::from_secs(2);
        cmos_write(&mut r, REG_HOURS_ALARM, 0x22, now);
        cmos_write(&mut r, REG_MINUTES_ALARM, 0x15, now);
        cmos_write(&mut r, REG_SECONDS_ALARM, 0x00, now);
        cmos_write(&mut r, REG_B, B_24H | 0x20, now); // AIE
        let _ = cmos_read(&mut r, REG_C, now);
        let wall_now = r.wall_time(now);
        let alarm_at = r.next_deadline().unwrap();
        assert_eq!(r.wall_time(alarm_at), START as i64 + 100);
        assert!(alarm_at > now && r.wall_time(alarm_at) - wall_now == 98);
        r.tick(alarm_at);
        assert!(r.irq_level());
        assert_eq!(cmos_read(&mut r, REG_C, alarm_at), C_IRQF | C_AF | C_UF | C_PF);
        // Don't-care hours and minutes: the alarm fires at second 00 of every minute.
        cmos_write(&mut r, REG_HOURS_ALARM, 0xFF, alarm_at);
        cmos_write(&mut r, REG_MINUTES_ALARM, 0xC0, alarm_at);
        let next = r.next_deadline().unwrap();
        assert_eq!(next.since(alarm_at), 60 * NANOS_PER_SEC);
        // A late tick still catches an alarm second it skipped over.
        r.tick(Nanos(next.0 + 30 * NANOS_PER_SEC));
        assert!(r.irq_level());
        // An impossible alarm (minute 0x75) never fires.
        cmos_write(&mut r, REG_MINUTES_ALARM, 0x75, next);
        let _ = cmos_read(&mut r, REG_C, next);
        assert_eq!(r.next_deadline(), None);
    }

    #[test]
    fn cmos_ram_index_and_nmi_bit() {
        let mut r = Mc146818::new(0);
        let now = Nanos::ZERO;
        for i in 0x0E..0x80u8 {
            if i != CENTURY_INDEX {
                cmos_write(&mut r, i, i ^ 0x5A, now);
            }
        }
        for i in 0x0E..0x80u8 {
            if i != CENTURY_INDEX {
                assert_eq!(cmos_read(&mut r, i, now), i ^ 0x5A);
            }
        }
        assert_eq!(cmos_read(&mut r, CENTURY_INDEX, now), 0x19, "1970");
        r.write(INDEX_PORT, 1, 0x80 | 0x10, now);
        assert!(r.nmi_disabled());
        assert_eq!(r.read(DATA_PORT, 1, now), 0x10 ^ 0x5A, "bit 7 is not part of the index");
        assert_eq!(r.read(INDEX_PORT, 1, now), 0xFF);
        r.set_ram(0x34, 0x12);
        r.set_ram(CENTURY_INDEX, 0x77);
        assert_eq!(r.cmos(0x34, now), 0x12);
        assert_eq!(r.cmos(CENTURY_INDEX, now), 0x19);
        // Status C and D are read-only.
        cmos_write(&mut r, REG_C, 0xFF, now);
        cmos_write(&mut r, REG_D, 0x00, now);
        assert_eq!((r.cmos(REG_C, now), r.cmos(REG_D, now)), (0, 0x80));
    }

    #[test]
    fn calendar_conversions() {
        for (secs, f) in [
            (0i64, (0, 0, 0, 1, 1, 70, 19)),
            (951_782_400, (0, 0, 0, 29, 2, 0, 20)), // 2000-02-29
            (4_102_444_799, (59, 59, 23, 31, 12, 99, 20)),
            (4_107_542_399, (59, 59, 23, 28, 2, 0, 21)), // 2100 is no leap year
        ] {
            let fields = Fields::from_unix(secs);
            assert_eq!((fields.sec, fields.min, fields.hour, fields.day, fields.month, fields.year, fields.century), f);
            assert_eq!(fields.to_unix(), secs);
        }
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(Fields::from_unix(0).day_of_week(), 5, "Thursday");
    }

    #[test]
    fn any_port_size_value_is_harmless() {
        let mut r = Mc146818::new(u64::MAX);
        let mut t = 0u64;
        for index in 0..=255u8 {
            for size in [0, 1, 2, 3, 4] {
                for v in [0u32, 0x0F, 0x80, 0x99, 0xBF, 0xC0, 0xFF, 0xFFFF_FFFF] {
                    t += 1_000_003;
                    r.write(INDEX_PORT, 1, index as u32, Nanos(t));
                    r.write(DATA_PORT, size, v, Nanos(t));
                    r.write(INDEX_PORT, size, v, Nanos(t));
                    let _ = r.read(DATA_PORT, size, Nanos(t));
                    let _ = r.read(0x72, size, Nanos(t));
                    let _ = r.next_deadline();
                    r.tick(Nanos(t));
                }
            }
        }
        r.tick(Nanos::MAX);
        let _ = r.read(DATA_PORT, 4, Nanos::MAX);
        let _ = r.next_deadline();
    }
}
