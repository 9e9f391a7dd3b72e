//! The 8254 programmable interval timer (Intel 8254 datasheet) and the PC's system control
//! port B (0x61), which carries counter 2's gate and output.
//!
//! Ports: counters 0-2 at 0x40-0x42, control word at 0x43 (write-only), port B at 0x61. The
//! counters run at 1.193182 MHz from guest time 0; every counter value and output is computed
//! from `now` exactly (`floor(now * 1193182 / 1e9)` input clocks), so nothing drifts.
//!
//! Modelled: access modes LSB, MSB, LSB then MSB; the counter latch command; the read-back
//! command (count and status); binary and BCD counting; modes 0 (interrupt on terminal
//! count), 1 (hardware retriggerable one-shot), 2 (rate generator), 3 (square wave), 4
//! (software triggered strobe) and 5 (hardware triggered strobe); the gate of counter 2 (port
//! 0x61 bit 0; the gates of counters 0 and 1 are tied high): low pauses modes 0 and 4, low
//! forces OUT high in modes 2 and 3 and its rising edge reloads them, its rising edge
//! triggers modes 1 and 5.
//!
//! Simplifications: a count is loaded at the moment it is written (the real part loads it on
//! the next clock, and in modes 2 and 3 only at the end of the current period); the count 1,
//! illegal in modes 2 and 3, counts as 2 there; writing a new count in modes 1 and 5 waits
//! for the next gate trigger.
//!
//! Counter 0's OUT drives IRQ0: [`Pit8254::tick`] returns the number of its rising edges since
//! the last tick (edges caused by port writes included), and [`Pit8254::next_deadline`] is
//! the exact time of the next one.
//!
//! Port 0x61 reads: bits 3:0 as written (bit 0 gate 2, bit 1 speaker data enable, bits 2-3
//! parity/channel check enables), bit 4 the refresh toggle (flips every 18 input clocks,
//! about 15 us, as with counter 1 programmed by a PC BIOS), bit 5 counter 2's OUT, bits 7:6
//! (NMI sources) 0.

use super::time::{cycles_at, split_read, split_write, time_of_cycle, Nanos};

/// The 8254's input clock on a PC: 14.31818 MHz / 12 (Linux's PIT_TICK_RATE).
pub const PIT_HZ: u64 = 1_193_182;
pub const COUNTER0_PORT: u16 = 0x40;
pub const COUNTER1_PORT: u16 = 0x41;
pub const COUNTER2_PORT: u16 = 0x42;
pub const CONTROL_PORT: u16 = 0x43;
/// System control port B: counter 2 gate (bit 0), speaker enable (bit 1), OUT2 (bit 5).
pub const PORT_B: u16 = 0x61;
/// The ISA interrupt line counter 0 drives.
pub const PIT_IRQ: u8 = 0;

const ACCESS_LSB: u8 = 1;
const ACCESS_MSB: u8 = 2;
const ACCESS_WORD: u8 = 3;

/// Input clocks per refresh-toggle flip of port 0x61 bit 4.
const REFRESH_PERIOD: u64 = 18;

#[derive(Clone, Copy, Debug)]
struct Counter {
    mode: u8,
    bcd: bool,
    access: u8,
    /// Initial count N: 1..=65536 (binary) or 1..=10000 (BCD); 0 written means the maximum.
    count: u64,
    /// A count has been written since the control word.
    loaded: bool,
    /// Counting has begun (count loaded; in modes 1 and 5, gate triggered).
    started: bool,
    /// The counting element advances now (started and the gate allows it).
    running: bool,
    gate: bool,
    null_count: bool,
    /// LSB/MSB access: the next write is the LSB; the LSB written so far.
    write_lsb_next: bool,
    lsb: u8,
    /// LSB/MSB access: the next read is the LSB.
    read_lsb_next: bool,
    latched_count: Option<u16>,
    latched_status: Option<u8>,
    /// Clocks counted before `run_from`, and the input clock the current run started at.
    acc: u64,
    run_from: u64,
    /// Elapsed count up to which OUT's rising edges are accounted, and their number.
    edges_through: u64,
    edges: u32,
}

impl Counter {
    /// A counter as after power-on: unprogrammed, OUT high (mode 3 until told otherwise), so
    /// that the first control word raises no edge.
    fn new(gate: bool) -> Self {
        Self {
            mode: 3,
            bcd: false,
            access: ACCESS_WORD,
            count: 0x1_0000,
            loaded: false,
            started: false,
            running: false,
            gate,
            null_count: true,
            write_lsb_next: true,
            lsb: 0,
            read_lsb_next: true,
            latched_count: None,
            latched_status: None,
            acc: 0,
            run_from: 0,
            edges_through: 0,
            edges: 0,
        }
    }

    /// Clocks counted since the count was loaded (or the trigger).
    fn elapsed(&self, c: u64) -> u64 {
        if self.running {
            self.acc + c.saturating_sub(self.run_from)
        } else {
            self.acc
        }
    }

    /// The period in modes 2 and 3.
    fn period(&self) -> u64 {
        self.count.max(2)
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    fn out(&self, c: u64) -> bool {
        if !self.started {
            return self.mode != 0;
        }
        let d = self.elapsed(c);
        let n = self.count;
        match self.mode {
            0 | 1 => d >= n,
            2 => !self.gate || d % self.period() != self.period() - 1,
            3 => !self.gate || d % self.period() < self.period().div_ceil(2),
            _ => d != n, // 4, 5
        }
    }

    /// The counting element's value (binary, before BCD encoding).
    fn value(&self, c: u64) -> u64 {
        let m = self.modulus();
        if !self.started {
            return self.count % m;
        }
        let d = self.elapsed(c);
        match self.mode {
            2 => self.period() - d % self.period(),
            3 => {
                let p = self.period();
                let phase = d % p;
                let high = p.div_ceil(2);
                let in_half = if phase < high { phase } else { phase - high };
                ((p & !1).saturating_sub(2 * in_half)).max(2) % m
            }
            _ => (self.count % m + m - d % m) % m,
        }
    }

    /// Rising edges of OUT at elapsed counts in `(from, to]` with the current programming.
    fn rising_edges(&self, from: u64, to: u64) -> u64 {
        if !self.started || to <= from {
            return 0;
        }
        let n = self.count;
        match self.mode {
            0 | 1 => (from < n && to >= n) as u64,
            2 | 3 if self.gate => to / self.period() - from / self.period(),
            2 | 3 => 0,
            _ => (from < n + 1 && to > n) as u64,
        }
    }

    /// The elapsed count of OUT's next rising edge after `edges_through`.
    fn next_edge(&self) -> Option<u64> {
        if !self.running {
            return None;
        }
        let n = self.count;
        let d = self.edges_through;
        match self.mode {
            0 | 1 => (d < n).then_some(n),
            2 | 3 => Some((d / self.period() + 1) * self.period()),
            _ => (d < n + 1).then_some(n + 1),
        }
    }

    /// Accounts OUT's rising edges up to input clock `c`.
    fn sync(&mut self, c: u64) {
        let d = self.elapsed(c);
        let new = self.rising_edges(self.edges_through, d);
        self.edges = self.edges.saturating_add(new.min(u32::MAX as u64) as u32);
        self.edges_through = d;
    }

    /// Applies a change of programming at clock `c`, counting a rising edge of OUT it causes.
    fn change(&mut self, c: u64, f: impl FnOnce(&mut Self)) {
        self.sync(c);
        let before = self.out(c);
        f(self);
        self.edges_through = self.elapsed(c);
        if !before && self.out(c) {
            self.edges = self.edges.saturating_add(1);
        }
    }

    fn start(&mut self, c: u64) {
        self.started = true;
        self.acc = 0;
        self.run_from = c;
        // Modes 1 and 5 run to the end once triggered; the others need the gate high.
        self.running = self.gate || matches!(self.mode, 1 | 5);
    }

    fn status(&self, c: u64) -> u8 {
        let out = if self.out(c) { 0x80 } else { 0 };
        let null = if self.null_count { 0x40 } else { 0 };
        out | null | self.access << 4 | self.mode << 1 | self.bcd as u8
    }

    fn encoded_value(&self, c: u64) -> u16 {
        let v = self.value(c);
        if self.bcd {
            to_bcd(v % 10_000)
        } else {
            v as u16
        }
    }

    fn write_control(&mut self, c: u64, v: u8) {
        let access = (v >> 4) & 3;
        if access == 0 {
            // Counter latch command; a second latch before the read is ignored.
            if self.latched_count.is_none() {
                self.latched_count = Some(self.encoded_value(c));
            }
            return;
        }
        self.change(c, |s| {
            s.access = access;
            s.mode = match (v >> 1) & 7 {
                6 => 2,
                7 => 3,
                m => m,
            };
            s.bcd = v & 1 != 0;
            s.loaded = false;
            s.started = false;
            s.running = false;
            s.acc = 0;
            s.null_count = true;
            s.write_lsb_next = true;
            s.read_lsb_next = true;
            s.latched_count = None;
            s.latched_status = None;
        });
    }

    fn write_data(&mut self, c: u64, v: u8) {
        let raw = match self.access {
            ACCESS_LSB => v as u16,
            ACCESS_MSB => (v as u16) << 8,
            _ if self.write_lsb_next => {
                self.lsb = v;
                self.write_lsb_next = false;
                if self.mode == 0 {
                    // Mode 0: writing the first byte stops the count and drives OUT low.
                    self.change(c, |s| {
                        s.started = false;
                        s.running = false;
                        s.acc = 0;
                    });
                }
                return;
            }
            _ => {
                self.write_lsb_next = true;
                u16::from_le_bytes([self.lsb, v])
            }
        };
        let count = if self.bcd { from_bcd(raw) } else { raw as u64 };
        let count = if count == 0 { self.modulus() } else { count };
        self.change(c, |s| {
            s.count = count;
            s.loaded = true;
            s.null_count = false;
            if matches!(s.mode, 1 | 5) {
                s.started = false;
                s.running = false;
                s.acc = 0;
            } else {
                s.start(c);
            }
        });
    }

    fn read_data(&mut self, c: u64) -> u8 {
        if let Some(status) = self.latched_status.take() {
            return status;
        }
        let (value, latched) = match self.latched_count {
            Some(v) => (v, true),
            None => (self.encoded_value(c), false),
        };
        let (byte, done) = match self.access {
            ACCESS_LSB => (value as u8, true),
            ACCESS_MSB => ((value >> 8) as u8, true),
            _ if self.read_lsb_next => {
                self.read_lsb_next = false;
                (value as u8, false)
            }
            _ => {
                self.read_lsb_next = true;
                ((value >> 8) as u8, true)
            }
        };
        if latched && done {
            self.latched_count = None;
        }
        byte
    }

    fn set_gate(&mut self, c: u64, gate: bool) {
        if gate == self.gate {
            return;
        }
        self.change(c, |s| {
            let rising = gate;
            match s.mode {
                0 | 4 => {
                    s.acc = s.elapsed(c);
                    s.run_from = c;
                    s.running = rising && s.started;
                }
                1 | 5 => {
                    if rising && s.loaded {
                        s.gate = true;
                        s.start(c);
                    }
                }
                _ => {
                    if rising {
                        if s.loaded {
                            s.gate = true;
                            s.start(c);
                        }
                    } else {
                        s.acc = s.elapsed(c);
                        s.running = false;
                    }
                }
            }
            s.gate = gate;
        });
    }
}

fn to_bcd(v: u64) -> u16 {
    let v = v as u16;
    (v % 10) | (v / 10 % 10) << 4 | (v / 100 % 10) << 8 | (v / 1000 % 10) << 12
}

/// Decodes a BCD count; nibbles above 9 are taken at face value and the result reduced
/// modulo 10000, so no input is rejected.
fn from_bcd(raw: u16) -> u64 {
    let d = |shift: u16| ((raw >> shift) & 0xF) as u64;
    (d(0) + 10 * d(4) + 100 * d(8) + 1000 * d(12)) % 10_000
}

/// The 8254 with port 0x61.
#[derive(Clone, Debug)]
pub struct Pit8254 {
    counters: [Counter; 3],
    /// Port 0x61 bits 3:0 as written.
    port_b: u8,
    last_cycle: u64,
}

impl Default for Pit8254 {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit8254 {
    /// A PIT with no counter programmed (no IRQ0 edges until the guest programs counter 0)
    /// and counter 2's gate low.
    pub fn new() -> Self {
        Self { counters: [Counter::new(true), Counter::new(true), Counter::new(false)], port_b: 0, last_cycle: 0 }
    }

    /// Whether `port` is one of the PIT's (0x40-0x43, 0x61).
    pub fn contains(&self, port: u16) -> bool {
        matches!(port, COUNTER0_PORT..=CONTROL_PORT | PORT_B)
    }

    /// An IN of `size` bytes at `port` (split into byte registers; other ports read 0xFF).
    pub fn read(&mut self, port: u16, size: u8, now: Nanos) -> u32 {
        let c = self.cycle(now);
        split_read(port, size, |p| self.read_byte(p, c))
    }

    /// An OUT of `size` bytes at `port` (split into byte registers; other ports ignored).
    pub fn write(&mut self, port: u16, size: u8, value: u32, now: Nanos) {
        let c = self.cycle(now);
        split_write(port, size, value, |p, v| self.write_byte(p, v, c));
    }

    /// Advances to `now`; returns the number of IRQ0 (counter 0 OUT) rising edges since the
    /// last tick.
    pub fn tick(&mut self, now: Nanos) -> u32 {
        let c = self.cycle(now);
        let counter = &mut self.counters[0];
        counter.sync(c);
        core::mem::take(&mut counter.edges)
    }

    /// When counter 0's OUT next rises ([`Nanos::ZERO`] if a tick is already owed).
    pub fn next_deadline(&self) -> Option<Nanos> {
        let counter = &self.counters[0];
        if counter.edges > 0 {
            return Some(Nanos::ZERO);
        }
        let d = counter.next_edge()?;
        Some(time_of_cycle(counter.run_from.saturating_add(d.saturating_sub(counter.acc)), PIT_HZ))
    }

    /// The level of counter `index`'s OUT (0..3; others read false) at `now`.
    pub fn output(&self, index: usize, now: Nanos) -> bool {
        let c = cycles_at(now, PIT_HZ).max(self.last_cycle);
        self.counters.get(index).is_some_and(|counter| counter.out(c))
    }

    /// Whether port 0x61 enables the speaker (bits 0 and 1 both set): a tone of counter 2.
    pub fn speaker_on(&self) -> bool {
        self.port_b & 3 == 3
    }

    fn cycle(&mut self, now: Nanos) -> u64 {
        self.last_cycle = cycles_at(now, PIT_HZ).max(self.last_cycle);
        self.last_cycle
    }

    fn read_byte(&mut self, port: u16, c: u64) -> u8 {
        match port {
            COUNTER0_PORT..=COUNTER2_PORT => self.counters[(port - COUNTER0_PORT) as usize].read_data(c),
            PORT_B => {
                let refresh = if (c / REFRESH_PERIOD) & 1 != 0 { 0x10 } else { 0 };
                let out2 = if self.counters[2].out(c) { 0x20 } else { 0 };
                self.port_b | refresh | out2
            }
            _ => 0xFF, // the control word register is write-only
        }
    }

    fn write_byte(&mut self, port: u16, v: u8, c: u64) {
        match port {
            COUNTER0_PORT..=COUNTER2_PORT => self.counters[(port - COUNTER0_PORT) as usize].write_data(c, v),
            CONTROL_PORT => match v >> 6 {
                3 => self.read_back(v, c),
                i => self.counters[i as usize].write_control(c, v),
            },
            PORT_B => {
                self.port_b = v & 0x0F;
                self.counters[2].set_gate(c, v & 1 != 0);
            }
            _ => {}
        }
    }

    /// The read-back command: bit 5 clear latches the counts, bit 4 clear the status, of the
    /// counters selected by bits 3:1.
    fn read_back(&mut self, v: u8, c: u64) {
        for (i, counter) in self.counters.iter_mut().enumerate() {
            if v & (2 << i) == 0 {
                continue;
            }
            if v & 0x20 == 0 && counter.latched_count.is_none() {
                counter.latched_count = Some(counter.encoded_value(c));
            }
            if v & 0x10 == 0 && counter.latched_status.is_none() {
                counter.latched_status = Some(counter.status(c));
            }
        }
    }
}

/// The PIT on the bus, driving IRQ0.
pub struct PitDevice {
    pub pit: Pit8254,
    irq0: super::irqchip::IrqLine,
}

impl PitDevice {
    pub fn new(irq0: super::irqchip::IrqLine) -> Self {
        Self { pit: Pit8254::new(), irq0 }
    }

    pub const RANGES: [super::bus::Range; 2] =
        [super::bus::Range::port(COUNTER0_PORT, 4), super::bus::Range::port(PORT_B, 1)];

    fn sync(&mut self, now: Nanos) {
        // Edge-triggered IRQ0: one rising edge latches the request (several coalesce, as on
        // real hardware when ticks are missed).
        if self.pit.tick(now) > 0 {
            self.irq0.pulse();
        }
    }
}

impl super::bus::Device for PitDevice {
    fn name(&self) -> &'static str {
        "pit"
    }

    fn read(&mut self, addr: u64, size: u8, cx: &super::bus::Ctx<'_>) -> u64 {
        let v = self.pit.read(addr as u16, size, cx.now);
        self.sync(cx.now);
        v as u64
    }

    fn write(&mut self, addr: u64, size: u8, value: u64, cx: &super::bus::Ctx<'_>) -> super::bus::BusEffect {
        self.pit.write(addr as u16, size, value as u32, cx.now);
        self.sync(cx.now);
        super::bus::BusEffect::None
    }

    fn tick(&mut self, cx: &super::bus::Ctx<'_>) {
        self.sync(cx.now);
    }

    fn next_deadline(&self) -> Option<Nanos> {
        self.pit.next_deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(cycles: u64) -> Nanos {
        time_of_cycle(cycles, PIT_HZ)
    }

    fn outb(p: &mut Pit8254, port: u16, v: u8, now: Nanos) {
        p.write(port, 1, v as u32, now);
    }

    fn inb(p: &mut Pit8254, port: u16, now: Nanos) -> u8 {
        p.read(port, 1, now) as u8
    }

    /// Linux 6.1 arch/x86/kernel/tsc.c pit_calibrate_tsc(): gate on, counter 2 mode 0,
    /// LATCH for 10 ms, poll OUT2 in port 0x61 until it rises.
    #[test]
    fn linux_pit_calibrate_tsc() {
        let mut p = Pit8254::new();
        let t0 = Nanos::from_millis(3);
        let v = inb(&mut p, PORT_B, t0);
        outb(&mut p, PORT_B, (v & !0x02) | 0x01, t0);
        outb(&mut p, CONTROL_PORT, 0xB0, t0);
        let latch = (PIT_HZ / (1000 / 10)) as u16;
        outb(&mut p, COUNTER2_PORT, latch as u8, t0);
        outb(&mut p, COUNTER2_PORT, (latch >> 8) as u8, t0);
        let c0 = cycles_at(t0, PIT_HZ);
        let rise = at(c0 + latch as u64);
        let mut polls = 0;
        let mut t = t0;
        while inb(&mut p, PORT_B, t) & 0x20 == 0 {
            polls += 1;
            t = t.saturating_add(1_000);
        }
        assert!(polls >= 1000, "loopmin");
        assert!(t >= rise && t.0 < rise.0 + 1_000, "OUT2 rose at exactly {rise:?}, seen at {t:?}");
        assert_eq!(inb(&mut p, PORT_B, Nanos(rise.0 + 5_000_000)) & 0x20, 0x20, "OUT stays high");
        assert_eq!(p.tick(t), 0, "counter 2 is not IRQ0");
    }

    /// quick_pit_calibrate(): counter 2 mode 0 from 0xFFFF, unlatched LSB/MSB reads; the MSB
    /// falls by one every 256 clocks.
    #[test]
    fn linux_quick_pit_calibrate() {
        let mut p = Pit8254::new();
        let t0 = Nanos::from_micros(250);
        outb(&mut p, PORT_B, 0x01, t0);
        outb(&mut p, CONTROL_PORT, 0xB0, t0);
        outb(&mut p, COUNTER2_PORT, 0xFF, t0);
        outb(&mut p, COUNTER2_PORT, 0xFF, t0);
        let c0 = cycles_at(t0, PIT_HZ);
        for i in 0..200u64 {
            for within in [0, 100, 255] {
                let t = at(c0 + 256 * i + within);
                let _lsb = inb(&mut p, COUNTER2_PORT, t);
                let msb = inb(&mut p, COUNTER2_PORT, t);
                let expect = (0xFFFF - 256 * i - within) >> 8;
                assert_eq!(msb as u64, expect, "i={i} within={within}");
            }
        }
        // Exactly: value = 0xFFFF - elapsed clocks.
        let t = at(c0 + 60_000);
        assert_eq!(p.read(COUNTER2_PORT, 1, t) | p.read(COUNTER2_PORT, 1, t) << 8, 0xFFFF - 60_000);
    }

    #[test]
    fn latch_and_read_back() {
        let mut p = Pit8254::new();
        outb(&mut p, CONTROL_PORT, 0x34, Nanos::ZERO); // counter 0, LSB/MSB, mode 2
        outb(&mut p, COUNTER0_PORT, 0x00, Nanos::ZERO);
        outb(&mut p, COUNTER0_PORT, 0x10, Nanos::ZERO); // 4096
        outb(&mut p, CONTROL_PORT, 0x00, at(100)); // latch counter 0
        outb(&mut p, CONTROL_PORT, 0x00, at(200)); // ignored: already latched
        let lo = inb(&mut p, COUNTER0_PORT, at(3000));
        let hi = inb(&mut p, COUNTER0_PORT, at(4000));
        assert_eq!(u16::from_le_bytes([lo, hi]), 4096 - 100, "latched value, not the live one");
        assert_eq!(
            inb(&mut p, COUNTER0_PORT, at(4000)) as u16 | (inb(&mut p, COUNTER0_PORT, at(4000)) as u16) << 8,
            4096 - 4000
        );
        // Read-back: status and count of counter 0 (0xC2), status first.
        outb(&mut p, CONTROL_PORT, 0xC2, at(5000));
        let status = inb(&mut p, COUNTER0_PORT, at(6000));
        assert_eq!(status, 0x80 | 0x34, "OUT high, count loaded, LSB/MSB, mode 2, binary");
        let lo = inb(&mut p, COUNTER0_PORT, at(6000));
        let hi = inb(&mut p, COUNTER0_PORT, at(6000));
        assert_eq!(u16::from_le_bytes([lo, hi]), 4096 - 5000 % 4096);
        // Status after a control word: null count, OUT low in mode 0.
        outb(&mut p, CONTROL_PORT, 0x70, at(7000)); // counter 1, LSB/MSB, mode 0
        outb(&mut p, CONTROL_PORT, 0xE4, at(7000)); // read-back status only, counter 1
        assert_eq!(inb(&mut p, COUNTER1_PORT, at(7000)), 0x40 | 0x30);
        // LSB-only and MSB-only access.
        outb(&mut p, CONTROL_PORT, 0x50, at(8000)); // counter 1, LSB, mode 0
        outb(&mut p, COUNTER1_PORT, 200, at(8000));
        assert_eq!(inb(&mut p, COUNTER1_PORT, at(8050)), 150);
        outb(&mut p, CONTROL_PORT, 0x60, at(9000)); // counter 1, MSB, mode 0
        outb(&mut p, COUNTER1_PORT, 2, at(9000));
        assert_eq!(inb(&mut p, COUNTER1_PORT, at(9256)), 1);
    }

    /// The i8253 clockevent: periodic mode 2 at HZ=250 and one-shot mode 4.
    #[test]
    fn irq0_periodic_and_oneshot() {
        let mut p = Pit8254::new();
        assert_eq!(p.next_deadline(), None, "unprogrammed: no IRQ0");
        let latch: u64 = (PIT_HZ + 125) / 250;
        let t0 = Nanos::from_millis(7);
        let c0 = cycles_at(t0, PIT_HZ);
        outb(&mut p, CONTROL_PORT, 0x34, t0);
        outb(&mut p, COUNTER0_PORT, latch as u8, t0);
        outb(&mut p, COUNTER0_PORT, (latch >> 8) as u8, t0);
        assert_eq!(p.tick(t0), 0);
        // Follow the deadlines for one second: every edge exactly at k * LATCH.
        let mut edges = 0;
        let mut k = 1;
        while let Some(d) = p.next_deadline() {
            if d > t0.saturating_add(1_000_000_000) {
                break;
            }
            assert_eq!(d, at(c0 + k * latch));
            assert_eq!(p.tick(Nanos(d.0 - 1)), 0);
            assert_eq!(p.tick(d), 1);
            edges += 1;
            k += 1;
        }
        assert_eq!(edges, PIT_HZ / latch);
        // Ticking late reports all the edges missed.
        let t = p.next_deadline().unwrap();
        assert_eq!(p.tick(Nanos(t.0 + 10_000_000)), 1 + (10_000_000 * PIT_HZ / 1_000_000_000) as u32 / latch as u32);
        // One-shot (mode 4): OUT strobes low at N, the edge comes at N + 1.
        let t1 = Nanos::from_secs(2);
        let c1 = cycles_at(t1, PIT_HZ);
        outb(&mut p, CONTROL_PORT, 0x38, t1);
        outb(&mut p, COUNTER0_PORT, 100, t1);
        outb(&mut p, COUNTER0_PORT, 0, t1);
        let _ = p.tick(t1);
        assert_eq!(p.next_deadline(), Some(at(c1 + 101)));
        assert!(!p.output(0, at(c1 + 100)));
        assert!(p.output(0, at(c1 + 101)));
        assert_eq!(p.tick(at(c1 + 5000)), 1);
        assert_eq!(p.next_deadline(), None);
        // Shutdown as Linux does it: mode 0, count 0: one edge 65536 clocks later.
        let t2 = Nanos::from_secs(3);
        let c2 = cycles_at(t2, PIT_HZ);
        outb(&mut p, CONTROL_PORT, 0x30, t2);
        outb(&mut p, COUNTER0_PORT, 0, t2);
        outb(&mut p, COUNTER0_PORT, 0, t2);
        assert_eq!(p.tick(t2), 0);
        assert_eq!(p.next_deadline(), Some(at(c2 + 65536)));
        assert_eq!(p.tick(Nanos::from_secs(10)), 1);
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn mode_changes_that_raise_out_count_as_edges() {
        let mut p = Pit8254::new();
        outb(&mut p, CONTROL_PORT, 0x30, Nanos::ZERO); // mode 0: OUT low
        outb(&mut p, COUNTER0_PORT, 0xFF, Nanos::ZERO);
        outb(&mut p, COUNTER0_PORT, 0xFF, Nanos::ZERO);
        outb(&mut p, CONTROL_PORT, 0x34, at(10)); // mode 2: OUT goes high at once
        assert_eq!(p.next_deadline(), Some(Nanos::ZERO));
        assert_eq!(p.tick(at(10)), 1);
        assert_eq!(p.next_deadline(), None, "mode 2 waits for its count");
    }

    #[test]
    fn square_wave_and_bcd() {
        let mut p = Pit8254::new();
        outb(&mut p, CONTROL_PORT, 0x36, Nanos::ZERO); // counter 0, mode 3, binary
        outb(&mut p, COUNTER0_PORT, 10, Nanos::ZERO);
        outb(&mut p, COUNTER0_PORT, 0, Nanos::ZERO);
        let outs: Vec<bool> = (0..20).map(|c| p.output(0, at(c))).collect();
        assert_eq!(&outs[..10], [true, true, true, true, true, false, false, false, false, false]);
        assert_eq!(&outs[10..], &outs[..10]);
        outb(&mut p, CONTROL_PORT, 0x00, at(3));
        assert_eq!(
            p.read(COUNTER0_PORT, 1, at(3)) | p.read(COUNTER0_PORT, 1, at(3)) << 8,
            10 - 2 * 3,
            "decrements by 2"
        );
        assert_eq!(p.tick(at(20)), 2);
        // Odd count: high (N+1)/2, low (N-1)/2.
        outb(&mut p, CONTROL_PORT, 0x36, at(100));
        outb(&mut p, COUNTER0_PORT, 5, at(100));
        outb(&mut p, COUNTER0_PORT, 0, at(100));
        let outs: Vec<bool> = (100..105).map(|c| p.output(0, at(c))).collect();
        assert_eq!(outs, [true, true, true, false, false]);
        // BCD: 0x1000 means 1000 decimal; reads back in BCD; 0 means 10000.
        outb(&mut p, CONTROL_PORT, 0x71, at(200)); // counter 1, mode 0, BCD
        outb(&mut p, COUNTER1_PORT, 0x00, at(200));
        outb(&mut p, COUNTER1_PORT, 0x10, at(200));
        assert_eq!(p.read(COUNTER1_PORT, 1, at(201)) | p.read(COUNTER1_PORT, 1, at(201)) << 8, 0x0999);
        outb(&mut p, COUNTER1_PORT, 0x00, at(300));
        outb(&mut p, COUNTER1_PORT, 0x00, at(300));
        assert_eq!(p.read(COUNTER1_PORT, 1, at(301)) | p.read(COUNTER1_PORT, 1, at(301)) << 8, 0x9999);
        assert!(!p.output(1, at(300 + 9999)) && p.output(1, at(300 + 10000)));
    }

    #[test]
    fn gate_of_counter_2() {
        let mut p = Pit8254::new();
        // Mode 0 with the gate low does not count; gate high resumes.
        outb(&mut p, CONTROL_PORT, 0x90, Nanos::ZERO); // counter 2, LSB only, mode 0
        outb(&mut p, COUNTER2_PORT, 100, Nanos::ZERO);
        assert_eq!(inb(&mut p, COUNTER2_PORT, at(50)), 100);
        outb(&mut p, PORT_B, 0x01, at(1000));
        outb(&mut p, PORT_B, 0x00, at(1040));
        assert_eq!(inb(&mut p, COUNTER2_PORT, at(5000)), 60, "paused after 40 clocks");
        outb(&mut p, PORT_B, 0x01, at(6000));
        assert_eq!(inb(&mut p, PORT_B, at(6059)) & 0x20, 0);
        assert_eq!(inb(&mut p, PORT_B, at(6060)) & 0x20, 0x20);
        assert_eq!(inb(&mut p, PORT_B, at(6060)) & 0x0F, 0x01, "bits 3:0 read back");
        // Mode 2: gate low forces OUT high and stops; rising gate reloads.
        outb(&mut p, CONTROL_PORT, 0xB4, at(7000));
        outb(&mut p, COUNTER2_PORT, 10, at(7000));
        outb(&mut p, COUNTER2_PORT, 0, at(7000));
        assert!(!p.output(2, at(7009)));
        outb(&mut p, PORT_B, 0x00, at(7009));
        assert!(p.output(2, at(7009)));
        outb(&mut p, PORT_B, 0x01, at(7500));
        assert_eq!(inb(&mut p, COUNTER2_PORT, at(7503)), 7);
        // Mode 1: the gate's rising edge triggers the one-shot; OUT low for N clocks.
        outb(&mut p, PORT_B, 0x00, at(8000));
        outb(&mut p, CONTROL_PORT, 0x92, at(8000)); // counter 2, LSB, mode 1
        outb(&mut p, COUNTER2_PORT, 20, at(8000));
        assert!(p.output(2, at(8100)), "waits for a trigger");
        outb(&mut p, PORT_B, 0x03, at(8200));
        assert!(p.speaker_on());
        assert!(!p.output(2, at(8219)));
        assert!(p.output(2, at(8220)));
        // The refresh toggle flips every 18 clocks.
        assert_ne!(inb(&mut p, PORT_B, at(18 * 1001)) & 0x10, inb(&mut p, PORT_B, at(18 * 1002)) & 0x10);
    }

    #[test]
    fn any_port_size_value_is_harmless() {
        let mut p = Pit8254::new();
        let mut t = 0u64;
        for port in [0x3F, 0x40, 0x41, 0x42, 0x43, 0x44, 0x60, 0x61, 0x62] {
            for size in [0, 1, 2, 3, 4] {
                for v in [0u32, 1, 0x30, 0x34, 0x36, 0x38, 0x3A, 0x3E, 0xC0, 0xFE, 0xFF, 0xFFFF_FFFF] {
                    t += 997;
                    p.write(port, size, v, Nanos(t));
                    p.write(COUNTER0_PORT, 1, v, Nanos(t));
                    let _ = p.read(port, size, Nanos(t));
                    let _ = p.tick(Nanos(t));
                    let _ = p.next_deadline();
                }
            }
        }
        let _ = p.tick(Nanos::MAX);
        let _ = p.read(0x40, 4, Nanos::MAX);
        let _ = p.next_deadline();
        let _ = p.tick(Nanos(5)); // time going backwards is harmless
        assert_eq!(p.read(CONTROL_PORT, 1, Nanos::MAX), 0xFF);
    }
}
