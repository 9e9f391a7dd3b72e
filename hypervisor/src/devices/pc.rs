//! The PC platform of a Linux VM: the legacy devices wired together (UART on IRQ4, PIT on
//! IRQ0, RTC on IRQ8, all into the 8259 pair), their guest time, and what their port
//! accesses ask the VM to do. Time is the host TSC since the VM started, in nanoseconds.

use super::{
    ioapic::{DeliveryMode, IoApic, IOAPIC_BASE},
    lapic::{LocalApic, DEFAULT_TIMER_HZ, MSR_APIC_BASE, MSR_TSC_DEADLINE, X2APIC_MSR_FIRST, X2APIC_MSR_LAST},
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
    /// The local APIC and I/O APIC (`apic=on` on the VM line); without them the guest runs
    /// in 8259 PIC mode.
    pub apic: Option<(LocalApic, IoApic)>,
}

/// ISA IRQ -> I/O APIC pin, as the MADT's interrupt source overrides say (IRQ0 -> GSI 2).
const fn isa_pin(irq: u8) -> u8 {
    if irq == 0 {
        2
    } else {
        irq
    }
}

impl PcPlatform {
    /// `unix_secs`: wall-clock time the RTC starts at.
    pub fn new(unix_secs: u64, apic: bool) -> Self {
        Self {
            uart: Uart16550::new(COM1_BASE),
            pic: Pic8259Pair::new(),
            pit: Pit8254::new(),
            rtc: Mc146818::new(unix_secs),
            pci: PciBus::new(),
            pm: Pm::new(PmConfig::default()),
            apic: apic.then(|| (LocalApic::new(0, true, DEFAULT_TIMER_HZ), IoApic::new(IOAPIC_BASE, 0))),
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

    /// Drives ISA line `irq` into the PIC and, with APICs, the I/O APIC.
    fn set_isa_irq(&mut self, irq: u8, level: bool) {
        self.pic.set_irq(irq, level);
        if let Some((_, ioapic)) = self.apic.as_mut() {
            ioapic.set_irq(isa_pin(irq), level);
        }
    }

    /// Brings device timers to `now` and the interrupt lines into the PIC (and I/O APIC).
    pub fn update(&mut self, now: Nanos) {
        if self.pit.tick(now) > 0 {
            // Edge-triggered IRQ0: one rising edge latches the request (several coalesce,
            // as on real hardware when ticks are missed).
            self.set_isa_irq(PIT_IRQ, true);
            self.set_isa_irq(PIT_IRQ, false);
        }
        self.rtc.tick(now);
        self.pm.tick(now);
        self.set_isa_irq(COM1_IRQ, self.uart.irq_level());
        self.set_isa_irq(RTC_IRQ, self.rtc.irq_level());
        self.set_isa_irq(SCI_IRQ, self.pm.sci_level());
        self.route_apic(now);
    }

    /// I/O APIC deliveries into the local APIC (one vCPU: every destination is it), the
    /// local APIC's level-triggered EOIs back to the I/O APIC, and the APIC timer.
    fn route_apic(&mut self, now: Nanos) {
        let Some((lapic, ioapic)) = self.apic.as_mut() else { return };
        lapic.tick(now);
        while let Some(vector) = lapic.eoi_broadcast_vector() {
            ioapic.eoi(vector);
        }
        // IPIs the one vCPU sent: only those that address it arrive.
        while let Some(msg) = lapic.take_ipi() {
            if lapic.matches(msg.dest, true) {
                lapic.accept(&msg);
            }
        }
        ioapic.take_deliveries(&mut |d| {
            if matches!(d.mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) {
                lapic.set_irr(d.vector, d.level);
            }
        });
    }

    /// The vector the vCPU would take now: the local APIC's when it is enabled, the PIC's
    /// when the APIC passes it on (disabled, or LINT0 in ExtINT mode).
    pub fn pending_interrupt(&self) -> Option<u8> {
        match &self.apic {
            Some((lapic, _)) if lapic.hw_enabled() && lapic.sw_enabled() && !lapic.accepts_pic_interrupts() => {
                lapic.pending()
            }
            Some((lapic, _)) if lapic.hw_enabled() && lapic.sw_enabled() => {
                lapic.pending().or_else(|| self.pic.pending())
            }
            _ => self.pic.pending(),
        }
    }

    /// The interrupt acknowledge cycle for [`PcPlatform::pending_interrupt`].
    pub fn acknowledge(&mut self) -> Option<u8> {
        match self.apic.as_mut() {
            Some((lapic, _)) if lapic.hw_enabled() && lapic.sw_enabled() && lapic.pending().is_some() => {
                lapic.acknowledge()
            }
            Some((lapic, _)) if lapic.hw_enabled() && lapic.sw_enabled() && !lapic.accepts_pic_interrupts() => None,
            _ => self.pic.acknowledge(),
        }
    }

    /// A guest access to guest-physical `gpa` outside RAM: the local APIC's page or the
    /// I/O APIC's. `value` is `Some` for writes. Returns `None` if no device is there.
    pub fn mmio(&mut self, gpa: u64, size: u8, value: Option<u32>, now: Nanos) -> Option<u32> {
        let (lapic, ioapic) = self.apic.as_mut()?;
        let result = if ioapic.contains(gpa) {
            let offset = gpa - ioapic.base();
            match value {
                Some(v) => {
                    ioapic.mmio_write(offset, size, v);
                    0
                }
                None => ioapic.mmio_read(offset, size),
            }
        } else if lapic.mmio_base().is_some_and(|base| (base..base + 0x1000).contains(&gpa)) {
            let offset = (gpa & 0xFFF) as u32;
            match value {
                Some(v) => {
                    lapic.mmio_write(offset, v, now);
                    0
                }
                None => lapic.mmio_read(offset, now),
            }
        } else {
            return None;
        };
        self.route_apic(now);
        Some(result)
    }

    /// RDMSR of an APIC MSR (IA32_APIC_BASE, x2APIC 0x800-0x8FF, TSC_DEADLINE); `None` if
    /// `msr` is not one or there is no APIC; `Some(Err(()))` means #GP.
    pub fn msr_read(&mut self, msr: u32, now: Nanos) -> Option<Result<u64, ()>> {
        let (lapic, _) = self.apic.as_mut()?;
        match msr {
            MSR_TSC_DEADLINE => Some(Ok(lapic.read_tsc_deadline(now))),
            MSR_APIC_BASE | X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => Some(lapic.msr_read(msr, now).map_err(|_| ())),
            _ => None,
        }
    }

    /// WRMSR of an APIC MSR; `at` is the guest time a TSC_DEADLINE value stands for.
    pub fn msr_write(&mut self, msr: u32, value: u64, at: Nanos, now: Nanos) -> Option<Result<(), ()>> {
        let (lapic, _) = self.apic.as_mut()?;
        let r = match msr {
            MSR_TSC_DEADLINE => {
                lapic.write_tsc_deadline(value, at, now);
                Ok(())
            }
            MSR_APIC_BASE | X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => lapic.msr_write(msr, value, now).map_err(|_| ()),
            _ => return None,
        };
        self.route_apic(now);
        Some(r)
    }

    /// The earliest guest time a device needs attention.
    pub fn next_deadline(&self) -> Option<Nanos> {
        let lapic = self.apic.as_ref().and_then(|(l, _)| l.next_deadline());
        earliest(earliest(earliest(self.pit.next_deadline(), self.rtc.next_deadline()), self.pm.next_deadline()), lapic)
    }
}
