//! The PC's pair of 8259A programmable interrupt controllers (Intel 8259A datasheet), with
//! the edge/level control registers of the PIIX/ICH south bridges (ELCR).
//!
//! Ports: master command 0x20 / data 0x21, slave command 0xA0 / data 0xA1, ELCR 0x4D0
//! (IRQ 0-7) and 0x4D1 (IRQ 8-15). The slave's INT output is wired to the master's IR2.
//!
//! Modelled: the ICW1-ICW4 initialisation sequence (ICW1 LTIM is ignored: the ELCR decides
//! the trigger mode, as on PIIX), OCW1 (IMR), OCW2 (non-specific, specific and rotating EOIs,
//! set priority, rotate in auto-EOI), OCW3 (read IRR/ISR, poll, special mask mode), auto-EOI,
//! special fully nested mode on the master, fully nested priorities with rotation.
//!
//! Triggering: an edge-triggered input latches its IRR bit on a rising edge of
//! [`Pic8259Pair::set_irq`] and the bit stays set until the interrupt is acknowledged (a pulse
//! `set_irq(n, true); set_irq(n, false)` is not lost). A level-triggered input's IRR bit
//! follows the line. ICW1 resets the edge detectors, so an input that is already high must be
//! reported high again after an initialisation to raise a request.
//!
//! The master's IR2 is the slave's INT output, evaluated whenever needed; ISA "IRQ 2" has no
//! input of its own (`set_irq(2, ..)` is ignored: boards route it to IRQ 9). Until a chip has
//! finished its ICW sequence it raises nothing.

use super::time::{split_read, split_write};

pub const MASTER_CMD: u16 = 0x20;
pub const MASTER_DATA: u16 = 0x21;
pub const SLAVE_CMD: u16 = 0xA0;
pub const SLAVE_DATA: u16 = 0xA1;
pub const ELCR_MASTER: u16 = 0x4D0;
pub const ELCR_SLAVE: u16 = 0x4D1;
/// The master input the slave is cascaded on.
pub const CASCADE_IRQ: u8 = 2;

/// ELCR bits that can be set: IRQ 0, 1, 2, 8 and 13 are always edge-triggered (PIIX).
const ELCR_WRITABLE: [u8; 2] = [0xF8, 0xDE];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum InitStep {
    #[default]
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

#[derive(Clone, Copy, Debug, Default)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input levels as last reported (edge detection).
    line: u8,
    elcr: u8,
    vector_base: u8,
    step: InitStep,
    initialised: bool,
    needs_icw4: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_aeoi: bool,
    special_fully_nested: bool,
    special_mask: bool,
    read_isr: bool,
    poll: bool,
    /// The IR level with the highest priority (0 until rotated).
    highest_priority: u8,
}

impl Chip {
    fn rank(&self, irq: u8) -> u8 {
        irq.wrapping_sub(self.highest_priority) & 7
    }

    /// The highest-priority IR level set in `bits`.
    fn highest(&self, bits: u8) -> Option<u8> {
        (0..8).map(|k| (k + self.highest_priority) & 7).find(|&irq| bits & (1 << irq) != 0)
    }

    /// The IR level the chip raises INT for, given its request bits (the master's include the
    /// cascade), after masking and in-service blocking.
    fn deliverable(&self, requests: u8, is_master: bool) -> Option<u8> {
        if !self.initialised {
            return None;
        }
        let irq = self.highest(requests & !self.imr)?;
        let mut blocking = self.isr;
        if self.special_mask {
            blocking &= !self.imr;
        }
        if is_master && self.special_fully_nested {
            blocking &= !(1 << CASCADE_IRQ);
        }
        match self.highest(blocking) {
            Some(s) if self.rank(s) <= self.rank(irq) => None,
            _ => Some(irq),
        }
    }

    /// INTA for `irq`: IRR -> ISR (unless auto-EOI).
    fn accept(&mut self, irq: u8) {
        let bit = 1 << irq;
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
        if self.auto_eoi {
            if self.rotate_on_aeoi {
                self.highest_priority = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
    }

    fn set_input(&mut self, bit: u8, level: bool) {
        if level {
            if self.elcr & bit != 0 || self.line & bit == 0 {
                self.irr |= bit;
            }
            self.line |= bit;
        } else {
            if self.elcr & bit != 0 {
                self.irr &= !bit;
            }
            self.line &= !bit;
        }
    }

    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1: IMR and ISR cleared, IR7 lowest priority, special mask off, status read
            // set to IRR, edge sense reset; ICW4 functions zero unless ICW4 follows.
            self.imr = 0;
            self.isr = 0;
            self.irr &= self.elcr;
            self.line &= self.elcr;
            self.highest_priority = 0;
            self.special_mask = false;
            self.read_isr = false;
            self.poll = false;
            self.auto_eoi = false;
            self.rotate_on_aeoi = false;
            self.special_fully_nested = false;
            self.needs_icw4 = v & 0x01 != 0;
            self.single = v & 0x02 != 0;
            self.initialised = false;
            self.step = InitStep::Icw2;
        } else if v & 0x08 != 0 {
            // OCW3.
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 0x01 != 0;
            }
            if v & 0x40 != 0 {
                self.special_mask = v & 0x20 != 0;
            }
        } else {
            // OCW2.
            let level = v & 7;
            match v >> 5 {
                0b000 => self.rotate_on_aeoi = false,
                0b100 => self.rotate_on_aeoi = true,
                op @ (0b001 | 0b101) => {
                    // Non-specific EOI; in special mask mode masked IS bits are not cleared.
                    let mut candidates = self.isr;
                    if self.special_mask {
                        candidates &= !self.imr;
                    }
                    if let Some(irq) = self.highest(candidates) {
                        self.isr &= !(1 << irq);
                        if op == 0b101 {
                            self.highest_priority = (irq + 1) & 7;
                        }
                    }
                }
                0b011 => self.isr &= !(1 << level),
                0b111 => {
                    self.isr &= !(1 << level);
                    self.highest_priority = (level + 1) & 7;
                }
                0b110 => self.highest_priority = (level + 1) & 7,
                _ => {} // 0b010: no operation
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        self.step = match self.step {
            InitStep::Ready => {
                self.imr = v;
                InitStep::Ready
            }
            InitStep::Icw2 => {
                self.vector_base = v & 0xF8;
                if !self.single {
                    InitStep::Icw3
                } else if self.needs_icw4 {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                }
            }
            // The cascade wiring is fixed (slave on IR2); ICW3 is accepted as is.
            InitStep::Icw3 if self.needs_icw4 => InitStep::Icw4,
            InitStep::Icw3 => InitStep::Ready,
            InitStep::Icw4 => {
                self.auto_eoi = v & 0x02 != 0;
                self.special_fully_nested = v & 0x10 != 0;
                InitStep::Ready
            }
        };
        if self.step == InitStep::Ready {
            self.initialised = true;
        }
    }
}

/// The master/slave 8259A pair of a PC.
#[derive(Clone, Debug, Default)]
pub struct Pic8259Pair {
    chips: [Chip; 2],
}

impl Pic8259Pair {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `port` belongs to the pair (command, data and ELCR ports).
    pub fn contains(&self, port: u16) -> bool {
        matches!(port, MASTER_CMD | MASTER_DATA | SLAVE_CMD | SLAVE_DATA | ELCR_MASTER | ELCR_SLAVE)
    }

    /// Sets the level of ISA interrupt line `irq` (0..16). IRQ 2 (the cascade) and numbers
    /// from 16 up are ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        if irq >= 16 || irq == CASCADE_IRQ {
            return;
        }
        self.chips[(irq / 8) as usize].set_input(1 << (irq % 8), level);
    }

    /// The vector the CPU would receive if it acknowledged an interrupt now; `None` while the
    /// master's INT output is low.
    pub fn pending(&self) -> Option<u8> {
        let [master, slave] = &self.chips;
        let irq = master.deliverable(self.master_requests(), true)?;
        if irq == CASCADE_IRQ {
            Some(slave.vector_base | slave.deliverable(slave.irr, false).unwrap_or(7))
        } else {
            Some(master.vector_base | irq)
        }
    }

    /// Whether the master's INT output is high.
    pub fn int_output(&self) -> bool {
        self.pending().is_some()
    }

    /// The interrupt acknowledge cycle: moves the winning request from IRR to ISR (or not, in
    /// auto-EOI mode) and returns its vector. If the request vanished (masked, or a level
    /// input dropped) it returns the spurious vector of IR7 of the chip asked, without
    /// setting an ISR bit (the master's IR2 stays in service for a spurious slave interrupt).
    /// `None` only while the master is not initialised (no vectors programmed).
    pub fn acknowledge(&mut self) -> Option<u8> {
        if !self.chips[0].initialised {
            return None;
        }
        let requests = self.master_requests();
        let [master, slave] = &mut self.chips;
        match master.deliverable(requests, true) {
            None => Some(master.vector_base | 7),
            Some(CASCADE_IRQ) => {
                master.accept(CASCADE_IRQ);
                match slave.deliverable(slave.irr, false) {
                    Some(irq) => {
                        slave.accept(irq);
                        Some(slave.vector_base | irq)
                    }
                    None => Some(slave.vector_base | 7),
                }
            }
            Some(irq) => {
                master.accept(irq);
                Some(master.vector_base | irq)
            }
        }
    }

    /// The ELCR: bit n set = IRQ n level-triggered.
    pub fn elcr(&self) -> u16 {
        u16::from_le_bytes([self.chips[0].elcr, self.chips[1].elcr])
    }

    /// The interrupt masks: bit n set = IRQ n masked at its chip.
    pub fn imr(&self) -> u16 {
        u16::from_le_bytes([self.chips[0].imr, self.chips[1].imr])
    }

    /// An IN of `size` bytes at `port` (split into byte registers; other ports read 0xFF).
    pub fn read(&mut self, port: u16, size: u8) -> u32 {
        split_read(port, size, |p| self.read_byte(p))
    }

    /// An OUT of `size` bytes at `port` (split into byte registers; other ports ignored).
    pub fn write(&mut self, port: u16, size: u8, value: u32) {
        split_write(port, size, value, |p, v| self.write_byte(p, v));
    }

    fn read_byte(&mut self, port: u16) -> u8 {
        match port {
            MASTER_CMD | MASTER_DATA | SLAVE_CMD | SLAVE_DATA => {
                let index = (port == SLAVE_CMD || port == SLAVE_DATA) as usize;
                if self.chips[index].poll {
                    return self.poll(index);
                }
                let chip = &self.chips[index];
                if port & 1 == 1 {
                    chip.imr
                } else if chip.read_isr {
                    chip.isr
                } else if index == 0 {
                    self.master_requests()
                } else {
                    chip.irr
                }
            }
            ELCR_MASTER => self.chips[0].elcr,
            ELCR_SLAVE => self.chips[1].elcr,
            _ => 0xFF,
        }
    }

    fn write_byte(&mut self, port: u16, v: u8) {
        match port {
            MASTER_CMD => self.chips[0].write_command(v),
            MASTER_DATA => self.chips[0].write_data(v),
            SLAVE_CMD => self.chips[1].write_command(v),
            SLAVE_DATA => self.chips[1].write_data(v),
            ELCR_MASTER | ELCR_SLAVE => {
                let index = (port == ELCR_SLAVE) as usize;
                let chip = &mut self.chips[index];
                chip.elcr = v & ELCR_WRITABLE[index];
                // Level-triggered inputs request exactly while their line is high.
                chip.irr = (chip.irr & !chip.elcr) | (chip.line & chip.elcr);
            }
            _ => {}
        }
    }

    /// OCW3 poll: the read acts as an interrupt acknowledge of that chip.
    fn poll(&mut self, index: usize) -> u8 {
        let requests = if index == 0 { self.master_requests() } else { self.chips[1].irr };
        let chip = &mut self.chips[index];
        chip.poll = false;
        match chip.deliverable(requests, index == 0) {
            Some(irq) => {
                chip.accept(irq);
                0x80 | irq
            }
            None => 0,
        }
    }

    /// The master's request bits: its own latched inputs and the slave's INT output on IR2.
    fn master_requests(&self) -> u8 {
        let slave = &self.chips[1];
        let cascade = if slave.deliverable(slave.irr, false).is_some() { 1 << CASCADE_IRQ } else { 0 };
        (self.chips[0].irr & !(1 << CASCADE_IRQ)) | cascade
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outb(p: &mut Pic8259Pair, port: u16, v: u8) {
        p.write(port, 1, v as u32);
    }

    fn inb(p: &mut Pic8259Pair, port: u16) -> u8 {
        p.read(port, 1) as u8
    }

    /// Linux 6.1 arch/x86/kernel/i8259.c: probe_8259A() then init_8259A(0) with vectors
    /// 0x30/0x38 (ISA_IRQ_VECTOR), then unmasking as the IRQs are started up.
    fn linux_init() -> Pic8259Pair {
        let mut p = Pic8259Pair::new();
        // probe_8259A: IMR must read back.
        outb(&mut p, SLAVE_DATA, 0xFF);
        outb(&mut p, MASTER_DATA, !(1 << CASCADE_IRQ));
        assert_eq!(inb(&mut p, MASTER_DATA), !(1 << CASCADE_IRQ));
        // init_8259A.
        outb(&mut p, MASTER_DATA, 0xFF);
        outb(&mut p, SLAVE_DATA, 0xFF);
        outb(&mut p, MASTER_CMD, 0x11);
        outb(&mut p, MASTER_DATA, 0x30);
        outb(&mut p, MASTER_DATA, 1 << CASCADE_IRQ);
        outb(&mut p, MASTER_DATA, 0x01);
        outb(&mut p, SLAVE_CMD, 0x11);
        outb(&mut p, SLAVE_DATA, 0x38);
        outb(&mut p, SLAVE_DATA, CASCADE_IRQ);
        outb(&mut p, SLAVE_DATA, 0x01);
        outb(&mut p, MASTER_DATA, 0xFB); // cached masks: all but the cascade
        outb(&mut p, SLAVE_DATA, 0xFF);
        p
    }

    /// mask_and_ack_8259A's EOI sequence.
    fn linux_eoi(p: &mut Pic8259Pair, irq: u8) {
        if irq >= 8 {
            outb(p, SLAVE_CMD, 0x60 + (irq & 7));
            outb(p, MASTER_CMD, 0x60 + CASCADE_IRQ);
        } else {
            outb(p, MASTER_CMD, 0x60 + irq);
        }
    }

    #[test]
    fn linux_init_and_timer_interrupt() {
        let mut p = linux_init();
        assert_eq!(p.pending(), None);
        p.set_irq(0, true);
        p.set_irq(0, false);
        assert_eq!(p.pending(), None, "masked");
        assert_eq!(inb(&mut p, MASTER_CMD) & 1, 1, "but requested (IRR)");
        outb(&mut p, MASTER_DATA, 0xFA); // unmask IRQ0
        assert_eq!(p.pending(), Some(0x30));
        assert!(p.int_output());
        assert_eq!(p.acknowledge(), Some(0x30));
        assert_eq!(p.pending(), None, "in service");
        // i8259A_irq_real: OCW3 read ISR.
        outb(&mut p, MASTER_CMD, 0x0B);
        assert_eq!(inb(&mut p, MASTER_CMD), 0x01);
        outb(&mut p, MASTER_CMD, 0x0A);
        assert_eq!(inb(&mut p, MASTER_CMD), 0x00, "IRR bit moved to ISR");
        // A second edge while in service is latched and delivered after the EOI.
        p.set_irq(0, true);
        assert_eq!(p.pending(), None);
        linux_eoi(&mut p, 0);
        assert_eq!(p.acknowledge(), Some(0x30));
        linux_eoi(&mut p, 0);
        assert_eq!(p.pending(), None);
        // The line is still high: no new edge, no new request.
        p.set_irq(0, true);
        assert_eq!(p.pending(), None);
    }

    #[test]
    fn slave_cascade_and_priorities() {
        let mut p = linux_init();
        outb(&mut p, MASTER_DATA, 0x00);
        outb(&mut p, SLAVE_DATA, 0x00);
        p.set_irq(8, true); // RTC
        p.set_irq(12, true);
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), Some(0x38), "IR2 (slave) outranks IR4");
        outb(&mut p, MASTER_CMD, 0x0B);
        assert_eq!(inb(&mut p, MASTER_CMD), 1 << CASCADE_IRQ);
        // IRQ 12 waits behind IRQ 8 on the slave and the master's IR2; IRQ 4 behind IR2.
        assert_eq!(p.pending(), None);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), Some(0x31), "IRQ1 nests above the cascade");
        linux_eoi(&mut p, 1);
        linux_eoi(&mut p, 8);
        assert_eq!(p.acknowledge(), Some(0x3C));
        linux_eoi(&mut p, 12);
        assert_eq!(p.acknowledge(), Some(0x34));
        p.set_irq(5, true);
        assert_eq!(p.pending(), None, "IR5 waits behind IR4 in service");
        p.set_irq(3, true);
        assert_eq!(p.acknowledge(), Some(0x33), "IR3 nests above IR4");
        // Non-specific EOI clears the highest-priority in-service bit.
        outb(&mut p, MASTER_CMD, 0x20);
        outb(&mut p, MASTER_CMD, 0x0B);
        assert_eq!(inb(&mut p, MASTER_CMD), 1 << 4);
        outb(&mut p, MASTER_CMD, 0x20);
        assert_eq!(p.acknowledge(), Some(0x35));
    }

    #[test]
    fn level_triggered_via_elcr_and_spurious() {
        let mut p = linux_init();
        outb(&mut p, MASTER_DATA, 0x00);
        outb(&mut p, SLAVE_DATA, 0x00);
        outb(&mut p, ELCR_MASTER, 0xFF);
        outb(&mut p, ELCR_SLAVE, 0xFF);
        assert_eq!(p.elcr(), 0xDEF8, "IRQ 0, 1, 2, 8, 13 stay edge-triggered");
        p.set_irq(10, true);
        assert_eq!(p.acknowledge(), Some(0x3A));
        linux_eoi(&mut p, 10);
        assert_eq!(p.acknowledge(), Some(0x3A), "still high: requested again after the EOI");
        linux_eoi(&mut p, 10);
        p.set_irq(10, false);
        assert_eq!(p.pending(), None);
        // The request vanishes between INTR and INTA: spurious IRQ7, nothing in service.
        p.set_irq(5, true);
        assert_eq!(p.pending(), Some(0x35));
        p.set_irq(5, false);
        assert_eq!(p.acknowledge(), Some(0x37));
        outb(&mut p, MASTER_CMD, 0x0B);
        assert_eq!(inb(&mut p, MASTER_CMD), 0);
        // Edge-triggered: masking after the request also makes INTA spurious.
        p.set_irq(1, true);
        outb(&mut p, MASTER_DATA, 0x02);
        assert_eq!(p.acknowledge(), Some(0x37));
        outb(&mut p, MASTER_DATA, 0x00);
        assert_eq!(p.acknowledge(), Some(0x31), "the edge stayed latched");
    }

    #[test]
    fn auto_eoi_rotation_poll_and_special_mask() {
        let mut p = Pic8259Pair::new();
        assert_eq!(p.acknowledge(), None, "not initialised");
        p.set_irq(3, true);
        assert_eq!(p.pending(), None);
        // Master alone, ICW4 with AEOI.
        outb(&mut p, MASTER_CMD, 0x13);
        outb(&mut p, MASTER_DATA, 0x20);
        outb(&mut p, MASTER_DATA, 0x03);
        assert_eq!(p.pending(), None, "ICW1 reset the edge detector");
        p.set_irq(3, false);
        p.set_irq(3, true);
        assert_eq!(p.acknowledge(), Some(0x23));
        outb(&mut p, MASTER_CMD, 0x0B);
        assert_eq!(inb(&mut p, MASTER_CMD), 0, "auto-EOI: nothing in service");
        // OCW2 set priority: IR5 lowest, so IR6 highest.
        outb(&mut p, MASTER_CMD, 0xC5);
        p.set_irq(0, true);
        p.set_irq(6, true);
        assert_eq!(p.acknowledge(), Some(0x26));
        assert_eq!(p.acknowledge(), Some(0x20));
        // Poll mode: the read is the acknowledge.
        outb(&mut p, MASTER_CMD, 0xC7); // IR0 highest again
        p.set_irq(4, true);
        outb(&mut p, MASTER_CMD, 0x0C);
        assert_eq!(inb(&mut p, MASTER_DATA), 0x84);
        outb(&mut p, MASTER_CMD, 0x0C);
        assert_eq!(inb(&mut p, MASTER_CMD), 0x00, "nothing left to poll");
        // Special mask mode: in-service IR1, masked, lets a lower level through.
        let mut p = linux_init();
        outb(&mut p, MASTER_DATA, 0x00);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), Some(0x31));
        p.set_irq(6, true);
        assert_eq!(p.pending(), None);
        outb(&mut p, MASTER_DATA, 0x02);
        outb(&mut p, MASTER_CMD, 0x68);
        assert_eq!(p.acknowledge(), Some(0x36));
        outb(&mut p, MASTER_CMD, 0x20); // non-specific EOI skips masked IR1
        outb(&mut p, MASTER_CMD, 0x0B);
        assert_eq!(inb(&mut p, MASTER_CMD), 0x02);
        outb(&mut p, MASTER_CMD, 0x48); // special mask off
        outb(&mut p, MASTER_CMD, 0x20);
        assert_eq!(inb(&mut p, MASTER_CMD), 0);
    }

    #[test]
    fn any_port_size_value_is_harmless() {
        let mut p = linux_init();
        assert_eq!(p.read(0x22, 1), 0xFF);
        assert_eq!(p.read(MASTER_CMD, 2) >> 8, 0xFB, "word read: IRR then IMR");
        for irq in 0..=255u8 {
            p.set_irq(irq, irq & 1 == 0);
        }
        for port in [0x1F, 0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, 0xFFFF] {
            for size in [0, 1, 2, 3, 4] {
                for v in [0u32, 0x10, 0x1F, 0x0C, 0xE7, 0xFF, 0xFFFF_FFFF] {
                    p.write(port, size, v);
                    let _ = p.read(port, size);
                    let _ = p.pending();
                    let _ = p.acknowledge();
                }
            }
        }
    }
}
