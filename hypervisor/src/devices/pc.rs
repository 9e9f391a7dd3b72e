//! The PC platform of a Linux VM: the legacy devices wired together (UART on IRQ4, PIT on
//! IRQ0, RTC on IRQ8, all into the 8259 pair), their guest time, and what their port
//! accesses ask the VM to do. Time is the host TSC since the VM started, in nanoseconds.

use super::{
    pci::PciBus,
    pic::Pic8259Pair,
    pit::{Pit8254, PIT_IRQ},
    pm::{Pm, PmConfig, PmEffect, S5_SLP_TYP, SCI_IRQ},
    rtc::{Mc146818, RTC_IRQ},
    time::{earliest, Nanos},
    uart::{Uart16550, COM1_BASE, COM1_IRQ},
};

/// What a port access asks the VM to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEffect {
    None,
    /// A byte the guest transmitted on its console UART.
    ConsoleByte(u8),
    PowerOff,
    Reset,
}

pub struct PcPlatform {
    pub uart: Uart16550,
    pub pic: Pic8259Pair,
    pub pit: Pit8254,
    pub rtc: Mc146818,
    pub pci: PciBus,
    pub pm: Pm,
}

impl PcPlatform {
    /// `unix_secs`: wall-clock time the RTC starts at.
    pub fn new(unix_secs: u64) -> Self {
        Self {
            uart: Uart16550::new(COM1_BASE),
            pic: Pic8259Pair::new(),
            pit: Pit8254::new(),
            rtc: Mc146818::new(unix_secs),
            pci: PciBus::new(),
            pm: Pm::new(PmConfig::default()),
        }
    }

    /// An IN; `None` if no device here claims the port.
    pub fn read(&mut self, port: u16, size: u8, now: Nanos) -> Option<u32> {
        // PCI first: 0xCF8 dword and 0xCFC-0xCFF; 0xCF9 bytes belong to the reset register.
        let v = if self.pci.handles(port, size) {
            self.pci.read(port, size)
        } else if self.pm.contains(port) {
            self.pm.read(port, size, now)
        } else if self.uart.contains(port) {
            self.uart.read(port, size)
        } else if self.pic.contains(port) {
            self.pic.read(port, size)
        } else if self.pit.contains(port) {
            self.pit.read(port, size, now)
        } else if self.rtc.contains(port) {
            self.rtc.read(port, size, now)
        } else {
            return None;
        };
        self.update(now);
        Some(v)
    }

    /// An OUT; `None` if no device here claims the port.
    pub fn write(&mut self, port: u16, size: u8, value: u32, now: Nanos) -> Option<PortEffect> {
        let effect = if self.pci.handles(port, size) {
            self.pci.write(port, size, value);
            PortEffect::None
        } else if self.pm.contains(port) {
            match self.pm.write(port, size, value, now) {
                // Sleep states other than S5 (the DSDT offers only S0 and S5) are ignored.
                PmEffect::PowerOff { slp_typ } if slp_typ == S5_SLP_TYP => PortEffect::PowerOff,
                PmEffect::Reset => PortEffect::Reset,
                _ => PortEffect::None,
            }
        } else if self.uart.contains(port) {
            self.uart.write(port, size, value).map_or(PortEffect::None, PortEffect::ConsoleByte)
        } else if self.pic.contains(port) {
            self.pic.write(port, size, value);
            PortEffect::None
        } else if self.pit.contains(port) {
            self.pit.write(port, size, value, now);
            PortEffect::None
        } else if self.rtc.contains(port) {
            self.rtc.write(port, size, value, now);
            PortEffect::None
        } else {
            return None;
        };
        self.update(now);
        Some(effect)
    }

    /// Brings device timers to `now` and the interrupt lines into the PIC.
    pub fn update(&mut self, now: Nanos) {
        if self.pit.tick(now) > 0 {
            // Edge-triggered IRQ0: one rising edge latches the request (several coalesce,
            // as on real hardware when ticks are missed).
            self.pic.set_irq(PIT_IRQ, true);
            self.pic.set_irq(PIT_IRQ, false);
        }
        self.rtc.tick(now);
        self.pm.tick(now);
        self.pic.set_irq(COM1_IRQ, self.uart.irq_level());
        self.pic.set_irq(RTC_IRQ, self.rtc.irq_level());
        self.pic.set_irq(SCI_IRQ, self.pm.sci_level());
    }

    /// The earliest guest time a device needs attention.
    pub fn next_deadline(&self) -> Option<Nanos> {
        earliest(earliest(self.pit.next_deadline(), self.rtc.next_deadline()), self.pm.next_deadline())
    }
}
