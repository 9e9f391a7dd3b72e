//! A 16550A UART (National Semiconductor PC16550D datasheet) at eight consecutive ports,
//! conventionally COM1 at 0x3F8 (IRQ 4).
//!
//! Registers (offset from the base; DLAB is LCR bit 7):
//! - 0: RBR (read) / THR (write); DLL when DLAB=1
//! - 1: IER (bits 3:0); DLM when DLAB=1
//! - 2: IIR (read) / FCR (write)
//! - 3: LCR, 4: MCR (bits 4:0), 5: LSR, 6: MSR, 7: SCR
//!
//! Transmit is instantaneous: a byte written to THR is handed to the caller and THR and the
//! transmitter shift register are empty again at once (LSR.THRE and LSR.TEMT stay set).
//! Receive goes through a 16-byte FIFO (1 byte, the 16450 holding register, with FIFOs off)
//! fed by [`Uart16550::push_input`]; a byte arriving when it is full is lost and sets LSR.OE.
//!
//! Interrupt identification follows the datasheet's priorities: receiver line status (OE) >
//! received data available > transmitter holding register empty > modem status. Simplification:
//! with FIFOs on, data below the trigger level is reported at once as a character timeout
//! (IIR 0x0C) instead of after four character times; Linux treats both alike.
//! The THRE interrupt is a latch as on the real part (and as Linux's 8250 driver tests at
//! startup, UART_BUG_THRE/UART_BUG_TXEN): it is set when IER.ETBEI goes 0->1 (THR is always
//! empty) and after every THR write (the byte leaves immediately), and cleared by an IIR read
//! that reports it or by a THR write.
//!
//! On a PC the interrupt output reaches the IRQ line only through the OUT2 gate; in loopback
//! mode the OUT pins are forced inactive, so the IRQ line is then low as well
//! ([`Uart16550::irq_level`]). In loopback mode THR bytes go to the receiver instead of the
//! caller and MSR bits 7:4 follow MCR OUT2/OUT1/DTR/RTS (DCD/RI/DSR/CTS). Outside loopback the
//! modem inputs read as a connected modem: DCD, DSR and CTS asserted, RI not.

use super::time::{split_read, split_write};

/// The conventional base port of COM1.
pub const COM1_BASE: u16 = 0x3F8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u8 = 4;

/// Receive FIFO depth of the 16550A.
pub const FIFO_LEN: usize = 16;

const IER_ERBFI: u8 = 0x01; // received data available
const IER_ETBEI: u8 = 0x02; // transmitter holding register empty
const IER_ELSI: u8 = 0x04; // receiver line status
const IER_EDSSI: u8 = 0x08; // modem status

const IIR_NONE: u8 = 0x01;
const IIR_MSR: u8 = 0x00;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_RLS: u8 = 0x06;
const IIR_TIMEOUT: u8 = 0x0C;
const IIR_FIFO_ENABLED: u8 = 0xC0;

const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// The modem input lines outside loopback mode: a connected, ready modem.
const MODEM_INPUTS: u8 = MSR_DCD | MSR_DSR | MSR_CTS;

/// One 16550A.
#[derive(Clone, Debug)]
pub struct Uart16550 {
    base: u16,
    rx: [u8; FIFO_LEN],
    rx_head: usize,
    rx_len: usize,
    ier: u8,
    lcr: u8,
    mcr: u8,
    /// Only OE is latched here; DR, THRE and TEMT are derived.
    lsr_errors: u8,
    /// MSR bits 3:0 (delta flags); bits 7:4 are derived from the inputs.
    msr_deltas: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo_enabled: bool,
    /// RX trigger level in bytes (1, 4, 8 or 14).
    trigger: usize,
    thre_pending: bool,
}

impl Uart16550 {
    /// A UART in its reset state at ports `base..base + 8`.
    pub fn new(base: u16) -> Self {
        Self {
            base,
            rx: [0; FIFO_LEN],
            rx_head: 0,
            rx_len: 0,
            ier: 0,
            lcr: 0,
            mcr: 0,
            lsr_errors: 0,
            msr_deltas: 0,
            scr: 0,
            // 115200 / 12 = 9600 baud, a common firmware default.
            dll: 12,
            dlm: 0,
            fifo_enabled: false,
            trigger: 1,
            thre_pending: false,
        }
    }

    pub fn base(&self) -> u16 {
        self.base
    }

    /// Whether `port` is one of this UART's eight registers.
    pub fn contains(&self, port: u16) -> bool {
        port.wrapping_sub(self.base) < 8
    }

    /// An IN of `size` bytes at `port` (split into byte registers).
    pub fn read(&mut self, port: u16, size: u8) -> u32 {
        split_read(port, size, |p| if self.contains(p) { self.read_reg(p.wrapping_sub(self.base)) } else { 0xFF })
    }

    /// An OUT of `size` bytes at `port`; returns the byte the guest transmitted, if any.
    pub fn write(&mut self, port: u16, size: u8, value: u32) -> Option<u8> {
        let mut sent = None;
        split_write(port, size, value, |p, v| {
            if self.contains(p) {
                if let Some(b) = self.write_reg(p.wrapping_sub(self.base), v) {
                    sent = Some(b);
                }
            }
        });
        sent
    }

    /// Reads register `offset` (0..8; other offsets read 0xFF).
    pub fn read_reg(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => self.pop_rx().unwrap_or(0),
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => {
                let iir = self.iir();
                if iir & 0x0F == IIR_THRE {
                    self.thre_pending = false;
                }
                iir
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => {
                let lsr = self.lsr();
                self.lsr_errors = 0;
                lsr
            }
            6 => {
                let msr = self.msr();
                self.msr_deltas = 0;
                msr
            }
            7 => self.scr,
            _ => 0xFF,
        }
    }

    /// Writes register `offset` (0..8; other offsets are ignored); returns a transmitted byte.
    pub fn write_reg(&mut self, offset: u16, value: u8) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = value,
            0 => {
                // THR: the byte leaves at once, so THR is empty again and THRE re-latches.
                self.thre_pending = true;
                if self.mcr & MCR_LOOP != 0 {
                    self.receive(value);
                    return None;
                }
                return Some(value);
            }
            1 if dlab => self.dlm = value,
            1 => {
                let old = self.ier;
                self.ier = value & 0x0F;
                if old & IER_ETBEI == 0 && self.ier & IER_ETBEI != 0 {
                    self.thre_pending = true;
                }
            }
            2 => self.write_fcr(value),
            3 => self.lcr = value,
            4 => {
                let before = self.modem_lines();
                self.mcr = value & 0x1F;
                self.note_modem_change(before);
            }
            // LSR and MSR are read-only (the factory test writes are not modelled).
            5 | 6 => {}
            7 => self.scr = value,
            _ => {}
        }
        None
    }

    /// Offers one received byte. Returns false if the FIFO was full: the byte is lost and
    /// LSR.OE is set, as on the wire. Use [`Uart16550::rx_space`] to avoid overruns.
    pub fn push_input(&mut self, byte: u8) -> bool {
        self.receive(byte)
    }

    /// How many more bytes the receiver holds before overrunning.
    pub fn rx_space(&self) -> usize {
        self.rx_capacity() - self.rx_len
    }

    /// The level of the IRQ line: an interrupt is pending and MCR.OUT2 gates it through
    /// (never in loopback mode).
    pub fn irq_level(&self) -> bool {
        self.mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2 && self.iir() & IIR_NONE == 0
    }

    /// The divisor latch (DLM:DLL); the baud rate is 115200 / divisor.
    pub fn divisor(&self) -> u16 {
        u16::from_le_bytes([self.dll, self.dlm])
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled {
            FIFO_LEN
        } else {
            1
        }
    }

    fn receive(&mut self, byte: u8) -> bool {
        if self.rx_len < self.rx_capacity() {
            self.rx[(self.rx_head + self.rx_len) % FIFO_LEN] = byte;
            self.rx_len += 1;
            true
        } else {
            if !self.fifo_enabled {
                // 16450 mode: the new character overwrites the holding register.
                self.rx[self.rx_head] = byte;
            }
            self.lsr_errors |= LSR_OE;
            false
        }
    }

    fn pop_rx(&mut self) -> Option<u8> {
        if self.rx_len == 0 {
            return None;
        }
        let b = self.rx[self.rx_head];
        self.rx_head = (self.rx_head + 1) % FIFO_LEN;
        self.rx_len -= 1;
        Some(b)
    }

    fn write_fcr(&mut self, value: u8) {
        let enable = value & FCR_ENABLE != 0;
        if enable != self.fifo_enabled {
            // Changing the FIFO mode clears the FIFOs (datasheet, FCR bit 0).
            self.fifo_enabled = enable;
            self.rx_head = 0;
            self.rx_len = 0;
        }
        if enable {
            // The other FCR bits are programmed only together with bit 0.
            if value & FCR_CLEAR_RX != 0 {
                self.rx_head = 0;
                self.rx_len = 0;
            }
            self.trigger = match value >> 6 {
                0 => 1,
                1 => 4,
                2 => 8,
                _ => 14,
            };
        }
    }

    fn lsr(&self) -> u8 {
        let dr = if self.rx_len > 0 { LSR_DR } else { 0 };
        self.lsr_errors | dr | LSR_THRE | LSR_TEMT
    }

    /// The modem lines as seen in MSR bits 7:4.
    fn modem_lines(&self) -> u8 {
        if self.mcr & MCR_LOOP != 0 {
            let m = self.mcr;
            let mut v = 0;
            if m & MCR_RTS != 0 {
                v |= MSR_CTS;
            }
            if m & MCR_DTR != 0 {
                v |= MSR_DSR;
            }
            if m & MCR_OUT1 != 0 {
                v |= MSR_RI;
            }
            if m & MCR_OUT2 != 0 {
                v |= MSR_DCD;
            }
            v
        } else {
            MODEM_INPUTS
        }
    }

    fn note_modem_change(&mut self, before: u8) {
        let after = self.modem_lines();
        let changed = before ^ after;
        // DCTS, DDSR and DDCD flag any change; TERI only RI's trailing (1 -> 0) edge.
        self.msr_deltas |= (changed >> 4) & (MSR_DCTS | MSR_DDSR | MSR_DDCD);
        if before & MSR_RI != 0 && after & MSR_RI == 0 {
            self.msr_deltas |= MSR_TERI;
        }
    }

    fn msr(&self) -> u8 {
        self.modem_lines() | self.msr_deltas
    }

    fn iir(&self) -> u8 {
        let fifo_bits = if self.fifo_enabled { IIR_FIFO_ENABLED } else { 0 };
        let id = if self.ier & IER_ELSI != 0 && self.lsr_errors != 0 {
            IIR_RLS
        } else if self.ier & IER_ERBFI != 0 && self.rx_len > 0 {
            if !self.fifo_enabled || self.rx_len >= self.trigger {
                IIR_RDA
            } else {
                IIR_TIMEOUT
            }
        } else if self.ier & IER_ETBEI != 0 && self.thre_pending {
            IIR_THRE
        } else if self.ier & IER_EDSSI != 0 && self.msr_deltas != 0 {
            IIR_MSR
        } else {
            IIR_NONE
        };
        fifo_bits | id
    }
}

/// COM1 of a VM on the bus: the UART, its IRQ line, and the console its output goes to
/// (`[name] line` on Vireo's console).
pub struct ConsoleUart {
    pub uart: Uart16550,
    line: super::irqchip::IrqLine,
    console: super::console::GuestConsole,
    vm: alloc::string::String,
    /// Guest time of the last transmitted byte.
    last_tx: super::time::Nanos,
}

impl ConsoleUart {
    pub fn new(base: u16, line: super::irqchip::IrqLine, vm: &str) -> Self {
        Self {
            uart: Uart16550::new(base),
            line,
            console: super::console::GuestConsole::default(),
            vm: alloc::string::String::from(vm),
            last_tx: super::time::Nanos::ZERO,
        }
    }

    /// Bus ranges: the eight registers.
    pub fn ranges(&self) -> [super::bus::Range; 1] {
        [super::bus::Range::port(self.uart.base(), 8)]
    }

    /// Queues bytes typed on Vireo's console; returns how many fit.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.iter().take_while(|&&b| self.uart.push_input(b)).count();
        self.line.set(self.uart.irq_level());
        n
    }

    /// Prints a partial line (the guest may be waiting at a prompt).
    pub fn flush(&mut self) {
        let vm = &self.vm;
        self.console.flush(&mut |l| super::console::print_line(vm, l));
    }

    /// Prints a partial line once the guest has sent nothing for `quiet` (a prompt waiting
    /// for input), without splitting lines that are still being written.
    pub fn flush_if_quiet(&mut self, now: super::time::Nanos, quiet: u64) {
        if now.since(self.last_tx) >= quiet {
            self.flush();
        }
    }
}

impl super::bus::Device for ConsoleUart {
    fn name(&self) -> &'static str {
        "uart"
    }

    fn read(&mut self, addr: u64, size: u8, _cx: &super::bus::Ctx<'_>) -> u64 {
        let v = self.uart.read(addr as u16, size);
        self.line.set(self.uart.irq_level());
        v as u64
    }

    fn write(&mut self, addr: u64, size: u8, value: u64, cx: &super::bus::Ctx<'_>) -> super::bus::BusEffect {
        if let Some(b) = self.uart.write(addr as u16, size, value as u32) {
            self.last_tx = cx.now;
            let vm = &self.vm;
            self.console.push_byte(b, &mut |l| super::console::print_line(vm, l));
        }
        self.line.set(self.uart.irq_level());
        super::bus::BusEffect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u16 = COM1_BASE;
    const IER: u16 = B + 1;
    const IIR: u16 = B + 2;
    const FCR: u16 = B + 2;
    const LCR: u16 = B + 3;
    const MCR: u16 = B + 4;
    const LSR: u16 = B + 5;
    const MSR: u16 = B + 6;
    const SCR: u16 = B + 7;

    fn out(u: &mut Uart16550, port: u16, v: u8) -> Option<u8> {
        u.write(port, 1, v as u32)
    }

    fn inb(u: &mut Uart16550, port: u16) -> u8 {
        u.read(port, 1) as u8
    }

    /// Linux 6.1 drivers/tty/serial/8250/8250_port.c autoconfig() and autoconfig_16550a(),
    /// in order, with the checks the driver makes.
    #[test]
    fn linux_autoconfig_finds_a_16550a() {
        let mut u = Uart16550::new(B);
        // IER test.
        let scratch = inb(&mut u, IER);
        out(&mut u, IER, 0);
        let scratch2 = inb(&mut u, IER) & 0x0F;
        out(&mut u, IER, 0x0F);
        let scratch3 = inb(&mut u, IER) & 0x0F;
        out(&mut u, IER, scratch);
        assert_eq!((scratch2, scratch3), (0, 0x0F));
        // Loopback test (skipped for the legacy ports, UPF_SKIP_TEST, but must pass).
        let save_mcr = inb(&mut u, MCR);
        let save_lcr = inb(&mut u, LCR);
        out(&mut u, MCR, MCR_LOOP | 0x0A);
        let status1 = inb(&mut u, MSR) & 0xF0;
        out(&mut u, MCR, save_mcr);
        assert_eq!(status1, 0x90);
        // EFR probe (LCR 0xBF), then FIFO detection.
        out(&mut u, LCR, 0xBF);
        out(&mut u, IIR, 0); // UART_EFR on enhanced parts, FCR here
        out(&mut u, LCR, 0);
        out(&mut u, FCR, FCR_ENABLE);
        assert_eq!(inb(&mut u, IIR) >> 6, 3, "FIFOs present: 16550A path");
        // autoconfig_16550a: no EFR with DLAB set ...
        out(&mut u, LCR, 0x80);
        assert_ne!(inb(&mut u, IIR), 0, "EFR read as 0 would mean an ST16C650V1");
        out(&mut u, LCR, 0xBF);
        assert_ne!(inb(&mut u, IIR), 0, "EFR read as 0 would mean an ST16C650V2");
        // ... no National SuperIO EXCR1 ...
        out(&mut u, LCR, 0);
        let status1 = inb(&mut u, MCR);
        out(&mut u, LCR, 0xE0);
        let status2 = inb(&mut u, IIR);
        assert_eq!((status1 ^ status2) & MCR_LOOP, 0);
        out(&mut u, LCR, 0);
        out(&mut u, MCR, status1 ^ MCR_LOOP);
        out(&mut u, LCR, 0xE0);
        let status2 = inb(&mut u, IIR);
        out(&mut u, LCR, 0);
        out(&mut u, MCR, status1);
        assert_eq!((status1 ^ status2) & MCR_LOOP, 0, "not an NS16550 SuperIO");
        // ... not a TI16750 (IIR bit 5 with a 64-byte FIFO) ...
        out(&mut u, FCR, FCR_ENABLE | 0x20);
        let s1 = inb(&mut u, IIR) >> 5;
        out(&mut u, FCR, FCR_ENABLE);
        out(&mut u, LCR, 0x80);
        out(&mut u, FCR, FCR_ENABLE | 0x20);
        let s2 = inb(&mut u, IIR) >> 5;
        out(&mut u, FCR, FCR_ENABLE);
        out(&mut u, LCR, 0);
        assert!(!(s1 == 6 && s2 == 7));
        // ... and not an XScale (IER bit 6 sticks).
        let iersave = inb(&mut u, IER);
        out(&mut u, IER, iersave | 0x40);
        assert_eq!(inb(&mut u, IER) & 0x40, 0);
        out(&mut u, IER, iersave);
        out(&mut u, LCR, save_lcr);
        // Scratch and LCR read back whole bytes.
        for v in [0x00, 0x55, 0xAA, 0xFF] {
            out(&mut u, SCR, v);
            assert_eq!(inb(&mut u, SCR), v);
            out(&mut u, LCR, v);
            assert_eq!(inb(&mut u, LCR), v);
        }
        out(&mut u, LCR, 0x03);
        assert_ne!(inb(&mut u, LSR), 0xFF, "startup bails out on LSR 0xFF");
    }

    /// serial8250_do_startup's THRE re-assertion test and TXEN test.
    #[test]
    fn thre_interrupt_semantics() {
        let mut u = Uart16550::new(B);
        out(&mut u, MCR, MCR_OUT2 | MCR_RTS | MCR_DTR);
        out(&mut u, FCR, 0xC7);
        assert!(!u.irq_level());
        out(&mut u, IER, IER_ETBEI);
        assert!(u.irq_level());
        let iir1 = inb(&mut u, IIR);
        assert_eq!(iir1, 0xC2);
        assert!(!u.irq_level(), "reading IIR cleared the THRE source");
        assert_eq!(inb(&mut u, IIR), 0xC1);
        out(&mut u, IER, 0);
        out(&mut u, IER, IER_ETBEI);
        assert_eq!(inb(&mut u, IIR), 0xC2, "THRE re-asserted (no UART_BUG_THRE)");
        out(&mut u, IER, 0);
        // Writing THR hands the byte out and re-arms THRE (the transmitter is idle again).
        out(&mut u, IER, IER_ETBEI);
        let _ = inb(&mut u, IIR);
        assert_eq!(out(&mut u, B, b'x'), Some(b'x'));
        assert_eq!(inb(&mut u, LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        assert_eq!(inb(&mut u, IIR), 0xC2);
        // Setting ETBEI again while already set is no edge.
        out(&mut u, IER, IER_ETBEI);
        assert_eq!(inb(&mut u, IIR), 0xC1);
        // OUT2 gates the line.
        out(&mut u, B, b'y');
        assert!(u.irq_level());
        out(&mut u, MCR, 0);
        assert!(!u.irq_level());
        out(&mut u, MCR, MCR_OUT2 | MCR_LOOP);
        assert!(!u.irq_level(), "loopback disconnects the OUT pins");
    }

    #[test]
    fn receive_fifo_overrun_and_priorities() {
        let mut u = Uart16550::new(B);
        out(&mut u, MCR, MCR_OUT2);
        out(&mut u, IER, IER_ERBFI | IER_ETBEI | IER_ELSI);
        assert_eq!(inb(&mut u, IIR), 0x02, "16450 mode (no FIFO bits), THRE");
        // Non-FIFO mode: one holding register; the second byte overruns and overwrites.
        assert!(u.push_input(b'a'));
        assert_eq!(u.rx_space(), 0);
        assert!(!u.push_input(b'b'));
        assert_eq!(inb(&mut u, IIR), 0x06, "line status outranks data");
        assert_eq!(inb(&mut u, LSR) & (LSR_DR | LSR_OE), LSR_DR | LSR_OE);
        assert_eq!(inb(&mut u, LSR) & LSR_OE, 0, "reading LSR clears OE");
        assert_eq!(inb(&mut u, IIR), 0x04);
        assert_eq!(inb(&mut u, B), b'b');
        assert_eq!(inb(&mut u, LSR) & LSR_DR, 0);
        // FIFO mode, trigger level 4.
        out(&mut u, FCR, 0x41);
        assert_eq!(u.rx_space(), FIFO_LEN);
        for b in 0..3u8 {
            u.push_input(b);
        }
        assert_eq!(inb(&mut u, IIR), 0xCC, "below the trigger: character timeout");
        u.push_input(3);
        assert_eq!(inb(&mut u, IIR), 0xC4);
        for b in 4..FIFO_LEN as u8 {
            assert!(u.push_input(b));
        }
        assert!(!u.push_input(0xEE), "17th byte overruns");
        let _ = inb(&mut u, LSR);
        for b in 0..FIFO_LEN as u8 {
            assert_eq!(inb(&mut u, B), b, "the FIFO kept its contents");
        }
        assert_eq!(inb(&mut u, B), 0, "empty RBR reads 0");
        assert_eq!(inb(&mut u, IIR), 0xC1, "THRE was consumed by the first IIR read");
        // FCR clear-RX empties the FIFO.
        u.push_input(1);
        out(&mut u, FCR, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(inb(&mut u, LSR) & LSR_DR, 0);
        // Masked sources: nothing pending, line low.
        out(&mut u, IER, 0);
        u.push_input(1);
        assert_eq!(inb(&mut u, IIR), 0xC1);
        assert!(!u.irq_level());
    }

    #[test]
    fn loopback_and_modem_status() {
        let mut u = Uart16550::new(B);
        assert_eq!(inb(&mut u, MSR), 0xB0, "DCD, DSR, CTS asserted by the outside world");
        out(&mut u, IER, IER_EDSSI);
        out(&mut u, MCR, MCR_LOOP);
        assert_eq!(inb(&mut u, IIR), 0x00, "modem status interrupt");
        assert_eq!(inb(&mut u, MSR), 0x0B, "all inputs dropped: DCTS, DDSR, DDCD");
        assert_eq!(inb(&mut u, MSR), 0x00);
        out(&mut u, MCR, MCR_LOOP | MCR_OUT1);
        assert_eq!(inb(&mut u, MSR), 0x40);
        out(&mut u, MCR, MCR_LOOP);
        assert_eq!(inb(&mut u, MSR), MSR_TERI, "RI trailing edge");
        // Loopback: THR goes to the receiver, not to the caller.
        assert_eq!(out(&mut u, B, b'z'), None);
        assert_eq!(inb(&mut u, LSR) & LSR_DR, LSR_DR);
        assert_eq!(inb(&mut u, B), b'z');
    }

    #[test]
    fn divisor_latch_and_linux_early_console() {
        let mut u = Uart16550::new(B);
        // arch/x86/boot/early_serial_console.c early_serial_init(port, 115200).
        out(&mut u, LCR, 0x03);
        out(&mut u, IER, 0);
        out(&mut u, FCR, 0);
        out(&mut u, MCR, 0x03);
        let c = inb(&mut u, LCR);
        out(&mut u, LCR, c | LCR_DLAB);
        out(&mut u, B, 1);
        out(&mut u, IER, 0);
        out(&mut u, LCR, c & !LCR_DLAB);
        assert_eq!(u.divisor(), 1);
        assert_eq!(inb(&mut u, IER), 0, "DLM did not land in IER");
        // serial_putchar: wait for THRE, then write.
        let mut text = Vec::new();
        for &ch in b"ok\n" {
            assert_ne!(inb(&mut u, LSR) & LSR_THRE, 0);
            text.extend(out(&mut u, B, ch));
        }
        assert_eq!(text, b"ok\n");
        // DLAB reads the latch, not RBR/IER.
        out(&mut u, LCR, 0x83);
        assert_eq!((inb(&mut u, B), inb(&mut u, IER)), (1, 0));
        assert_eq!(out(&mut u, B, 0x30), None, "DLL write is no transmission");
        assert_eq!(u.divisor(), 0x30);
    }

    #[test]
    fn any_port_size_value_is_harmless() {
        let mut u = Uart16550::new(B);
        assert_eq!(u.read(0x3F0, 1), 0xFF);
        assert_eq!(u.write(0x3F0, 4, 0xFFFF_FFFF), None);
        // A word write to THR/IER: the low byte is transmitted, the high byte lands in IER.
        assert_eq!(u.write(B, 2, 0x0F41), Some(0x41));
        assert_eq!(inb(&mut u, IER), 0x0F);
        assert_eq!(u.read(B + 6, 4) >> 16, 0xFFFF, "bytes beyond the UART read as all ones");
        for port in B - 2..B + 10 {
            for size in [0, 1, 2, 3, 4, 9] {
                for v in [0u32, 0xFF, 0xFFFF_FFFF, 0x8000_0080] {
                    let _ = u.write(port, size, v);
                    let _ = u.read(port, size);
                    let _ = u.push_input(v as u8);
                    let _ = u.irq_level();
                }
            }
        }
    }
}
