//! A VM's interrupt routing: the 8259 pair and the I/O APIC (behind one lock, the "chip"),
//! the vCPUs' local APICs (each behind its own lock), and [`IrqLine`], the object a device
//! drives to raise an ISA interrupt. Whatever the source (a pin through the I/O APIC, an IPI
//! from another local APIC, an MSI later), a delivery ends in [`Interrupts::deliver`], which
//! finds the destination local APICs, sets their request and wakes their vCPUs.
//!
//! Lock order: a device's lock, then the chip, then a local APIC. Nobody takes the chip while
//! holding a local APIC (an EOI broadcast is collected under the APIC lock and handed to
//! [`Interrupts::eoi`] after it is released).

use alloc::{sync::Arc, vec::Vec};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use spin::Mutex;

use super::{
    bus::{BusEffect, Ctx, Device},
    ioapic::{IoApic, IOAPIC_BASE},
    irq::{self, Message},
    lapic::LocalApic,
    pic::Pic8259Pair,
};

/// How a vCPU is woken: called with the host CPU the vCPU is assigned to.
pub type KickFn = fn(host_cpu: usize);

/// A kick that does nothing (host tests, a VM on one CPU that polls).
pub fn no_kick(_host_cpu: usize) {}

/// ISA IRQ -> I/O APIC pin, as the MADT's interrupt source override says (IRQ0 -> GSI 2).
pub const fn isa_pin(irq: u8) -> u8 {
    if irq == 0 {
        2
    } else {
        irq
    }
}

/// The I/O APIC pins that PCI INTx lines reach (GSIs 16-23; the ACPI `_PRT` uses 16-19, see
/// `guest::acpi::pci_intx_gsi`). PCI INTx# is level-triggered, active-low, open-drain with a
/// pull-up (PCI Local Bus Specification 3.0 §2.2.6): an idle line is electrically high, and a
/// device asserts it by pulling it low. The board pulls these pins up at reset, so that the
/// active-low, level-triggered entries Linux programs for them stay quiet until a device
/// asserts its line ([`Interrupts::set_pci_intx`]).
pub const PCI_INTX_PINS: core::ops::Range<u8> = 16..24;

/// One vCPU's local APIC as interrupt sources see it.
pub struct VcpuApic {
    pub lapic: Mutex<LocalApic>,
    /// Something arrived for the vCPU (interrupt, NMI, INIT, SIPI): its host CPU must look.
    pub attention: AtomicBool,
    /// The host CPU the vCPU is assigned to.
    pub host_cpu: AtomicUsize,
    /// A KVM KICK_CPU hypercall woke the vCPU (PV spinlocks): its next HLT, even with
    /// interrupts off, returns at once, and a HLT in progress ends.
    pub pv_unhalt: AtomicBool,
}

struct Chip {
    pic: Pic8259Pair,
    ioapic: Option<IoApic>,
}

pub struct Interrupts {
    chip: Mutex<Chip>,
    /// Index = vCPU index = APIC ID.
    apics: Vec<VcpuApic>,
    /// Whether the VM has local APICs and an I/O APIC (else: 8259 PIC mode, vCPU 0 only).
    apic_mode: bool,
    kick: KickFn,
    /// A device got work from outside the VM (another VM's frame): the VM's next device tick
    /// must look at its devices even before their deadline (`Vm::tick_devices`).
    device_wake: AtomicBool,
}

impl Interrupts {
    /// Routing for `vcpus` vCPUs; `apic_mode`: local APICs and an I/O APIC (else the PIC pair
    /// only, still with local APICs for IPIs when there are several vCPUs).
    pub fn new(vcpus: usize, apic_mode: bool, timer_hz: u64, kick: KickFn) -> Arc<Self> {
        let apics = (0..vcpus.max(1))
            .map(|i| VcpuApic {
                lapic: Mutex::new(LocalApic::new(i as u32, i == 0, timer_hz)),
                attention: AtomicBool::new(false),
                host_cpu: AtomicUsize::new(0),
                pv_unhalt: AtomicBool::new(false),
            })
            .collect();
        let ioapic = apic_mode.then(|| {
            let mut io = IoApic::new(IOAPIC_BASE, 0);
            // The pull-ups of the PCI INTx wires (every entry is masked at reset: no edge).
            for pin in PCI_INTX_PINS {
                io.set_irq(pin, true);
            }
            io
        });
        Arc::new(Self {
            chip: Mutex::new(Chip { pic: Pic8259Pair::new(), ioapic }),
            apics,
            apic_mode,
            kick,
            device_wake: AtomicBool::new(false),
        })
    }

    pub fn apic_mode(&self) -> bool {
        self.apic_mode
    }

    /// Whether vCPUs have a local APIC (APIC mode, or several vCPUs).
    pub fn has_lapics(&self) -> bool {
        self.apic_mode || self.apics.len() > 1
    }

    pub fn vcpus(&self) -> usize {
        self.apics.len()
    }

    pub fn apic(&self, vcpu: usize) -> &VcpuApic {
        &self.apics[vcpu]
    }

    /// Marks vCPU `vcpu` as needing attention and kicks its host CPU.
    pub fn notify(&self, vcpu: usize) {
        let a = &self.apics[vcpu];
        a.attention.store(true, Ordering::Release);
        (self.kick)(a.host_cpu.load(Ordering::Relaxed));
    }

    /// Another host CPU gave one of the VM's devices work: the devices are ticked at vCPU 0's
    /// next look, which the kick brings about at once (an exit, or a halted vCPU's poll).
    pub fn wake_devices(&self) {
        self.device_wake.store(true, Ordering::Release);
        self.notify(0);
    }

    /// Whether [`Interrupts::wake_devices`] was called since the last time (and clears it).
    #[inline]
    pub fn take_device_wake(&self) -> bool {
        self.device_wake.load(Ordering::Relaxed) && self.device_wake.swap(false, Ordering::AcqRel)
    }

    /// Drives ISA line `irq` into the PIC and the I/O APIC.
    pub fn set_isa_irq(&self, irq: u8, level: bool) {
        let mut chip = self.chip.lock();
        let before = chip.pic.int_output();
        chip.pic.set_irq(irq, level);
        let pic_rose = !before && chip.pic.int_output();
        if let Some(io) = chip.ioapic.as_mut() {
            io.set_irq(isa_pin(irq), level);
        }
        self.route_ioapic(&mut chip);
        drop(chip);
        if pic_rose {
            // The PIC's INT output goes to vCPU 0's LINT0 (virtual wire, or PIC mode).
            self.notify(0);
        }
    }

    /// A PCI device asserts (`true`) or releases its INTx line wired to I/O APIC pin `gsi`
    /// (one of [`PCI_INTX_PINS`]; others are ignored): the wire goes low while asserted. Lines
    /// are shared: the caller ORs the devices on one pin ([`IntxLine`] for a single device).
    /// Without an I/O APIC (`apic=off`) PCI interrupts go nowhere.
    pub fn set_pci_intx(&self, gsi: u8, asserted: bool) {
        if !PCI_INTX_PINS.contains(&gsi) {
            return;
        }
        let mut chip = self.chip.lock();
        if let Some(io) = chip.ioapic.as_mut() {
            io.set_irq(gsi, !asserted);
        }
        self.route_ioapic(&mut chip);
    }

    /// Hands the I/O APIC's ready interrupts to their local APICs (chip lock held).
    fn route_ioapic(&self, chip: &mut Chip) {
        let Some(io) = chip.ioapic.as_mut() else { return };
        io.take_deliveries(&mut |d| self.deliver(None, &d.message()));
    }

    /// Delivers an interrupt message from vCPU `from` (an IPI) or from a device (`None`) to
    /// every local APIC it names (lowest priority: one of them, see `irq::route`).
    pub fn deliver(&self, from: Option<usize>, msg: &Message) {
        // All local APICs are locked in index order (one order everywhere: no deadlock) so
        // lowest-priority arbitration sees a consistent picture.
        let mut locked: Vec<_> = self.apics.iter().map(|a| a.lapic.lock()).collect();
        let mask = irq::route(msg, from, locked.iter().map(|g| &**g));
        let mut wake = 0u64;
        for (i, lapic) in locked.iter_mut().enumerate() {
            if mask & (1 << i) != 0 {
                lapic.accept(msg);
                wake |= 1 << i;
            }
        }
        drop(locked);
        for i in 0..self.apics.len().min(64) {
            if wake & (1 << i) != 0 {
                self.notify(i);
            }
        }
    }

    /// Delivers `msg` to the vCPUs in `mask` (bit i = vCPU i), named directly rather than by
    /// an APIC destination (KVM's PV SEND_IPI). Returns how many received it.
    pub fn deliver_mask(&self, mask: u64, msg: &Message) -> usize {
        let mut n = 0;
        for (i, a) in self.apics.iter().enumerate().take(64) {
            if mask & (1 << i) != 0 {
                a.lapic.lock().accept(msg);
                self.notify(i);
                n += 1;
            }
        }
        n
    }

    /// Wakes vCPU `vcpu` from a PV-spinlock HLT (KVM's KICK_CPU).
    pub fn pv_kick(&self, vcpu: usize) {
        if let Some(a) = self.apics.get(vcpu) {
            a.pv_unhalt.store(true, Ordering::Release);
            self.notify(vcpu);
        }
    }

    /// End of interrupt for a level-triggered `vector` (a local APIC's EOI broadcast):
    /// clears the I/O APIC's remote IRR; a line still asserted is delivered again.
    pub fn eoi(&self, vector: u8) {
        let mut chip = self.chip.lock();
        if let Some(io) = chip.ioapic.as_mut() {
            io.eoi(vector);
        }
        self.route_ioapic(&mut chip);
    }

    /// The PIC's pending vector (for vCPU 0 in PIC mode or with LINT0 in ExtINT mode).
    pub fn pic_pending(&self) -> Option<u8> {
        self.chip.lock().pic.pending()
    }

    /// The PIC's interrupt acknowledge cycle.
    pub fn pic_acknowledge(&self) -> Option<u8> {
        self.chip.lock().pic.acknowledge()
    }
}

/// An ISA interrupt line a device drives (into the PIC and, with APICs, the I/O APIC).
pub struct IrqLine {
    irq: Arc<Interrupts>,
    isa: u8,
    level: bool,
}

impl IrqLine {
    pub fn new(irq: Arc<Interrupts>, isa: u8) -> Self {
        Self { irq, isa, level: false }
    }

    /// Sets the line's level (a no-op when unchanged).
    pub fn set(&mut self, level: bool) {
        if level != self.level {
            self.level = level;
            self.irq.set_isa_irq(self.isa, level);
        }
    }

    /// One rising and falling edge (an edge-triggered request, e.g. the PIT's IRQ0).
    pub fn pulse(&mut self) {
        self.set(true);
        self.set(false);
    }
}

/// A PCI function's INTx line, wired to one I/O APIC pin ([`Interrupts::set_pci_intx`]).
pub struct IntxLine {
    irq: Arc<Interrupts>,
    gsi: u8,
    asserted: bool,
}

impl IntxLine {
    pub fn new(irq: Arc<Interrupts>, gsi: u8) -> Self {
        Self { irq, gsi, asserted: false }
    }

    /// Asserts or releases the line (a no-op when unchanged).
    pub fn set(&mut self, asserted: bool) {
        if asserted != self.asserted {
            self.asserted = asserted;
            self.irq.set_pci_intx(self.gsi, asserted);
        }
    }
}

/// The 8259 pair's ports on the bus.
pub struct PicPorts(pub Arc<Interrupts>);

impl Device for PicPorts {
    fn name(&self) -> &'static str {
        "pic"
    }

    fn read(&mut self, addr: u64, size: u8, _cx: &Ctx<'_>) -> u64 {
        self.0.chip.lock().pic.read(addr as u16, size) as u64
    }

    fn write(&mut self, addr: u64, size: u8, value: u64, _cx: &Ctx<'_>) -> BusEffect {
        let before;
        let after;
        {
            let mut chip = self.0.chip.lock();
            before = chip.pic.int_output();
            chip.pic.write(addr as u16, size, value as u32);
            after = chip.pic.int_output();
        }
        if after && !before {
            self.0.notify(0);
        }
        BusEffect::None
    }
}

/// The I/O APIC's page on the bus.
pub struct IoApicMmio(pub Arc<Interrupts>);

impl Device for IoApicMmio {
    fn name(&self) -> &'static str {
        "ioapic"
    }

    fn read(&mut self, addr: u64, size: u8, _cx: &Ctx<'_>) -> u64 {
        let mut chip = self.0.chip.lock();
        match chip.ioapic.as_mut() {
            Some(io) => io.mmio_read(addr - io.base(), size) as u64,
            None => u64::MAX,
        }
    }

    fn write(&mut self, addr: u64, size: u8, value: u64, _cx: &Ctx<'_>) -> BusEffect {
        let mut chip = self.0.chip.lock();
        if let Some(io) = chip.ioapic.as_mut() {
            let base = io.base();
            io.mmio_write(addr - base, size, value as u32);
        }
        self.0.route_ioapic(&mut chip);
        BusEffect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::ioapic::{IOREGSEL, IOWIN, REG_REDTBL};

    fn write_rte(irq: &Interrupts, pin: u8, value: u64) {
        let mut chip = irq.chip.lock();
        let io = chip.ioapic.as_mut().unwrap();
        io.mmio_write(IOREGSEL, 4, (REG_REDTBL + 2 * pin) as u32);
        io.mmio_write(IOWIN, 4, value as u32);
        io.mmio_write(IOREGSEL, 4, (REG_REDTBL + 2 * pin + 1) as u32);
        io.mmio_write(IOWIN, 4, (value >> 32) as u32);
    }

    fn enable(irq: &Interrupts, vcpu: usize) {
        let mut l = irq.apic(vcpu).lapic.lock();
        l.mmio_write(0xF0, 0x1FF, crate::devices::time::Nanos::ZERO);
    }

    #[test]
    fn ioapic_pin_reaches_the_named_vcpu() {
        let irq = Interrupts::new(2, true, 1_000_000_000, no_kick);
        enable(&irq, 0);
        enable(&irq, 1);
        // IRQ4 -> vector 0x34, physical destination APIC 1, edge.
        write_rte(&irq, 4, 0x34 | (1u64 << 56));
        let mut line = IrqLine::new(irq.clone(), 4);
        line.set(true);
        assert_eq!(irq.apic(1).lapic.lock().pending(), Some(0x34));
        assert_eq!(irq.apic(0).lapic.lock().pending(), None);
        assert!(irq.apic(1).attention.load(Ordering::Relaxed));
        assert!(!irq.apic(0).attention.load(Ordering::Relaxed));
    }

    /// Linux's entry for a PCI GSI from `_PRT`: level-triggered, active-low, vector 0x41 to
    /// APIC 0. An idle line (pulled up) delivers nothing when the entry is unmasked; an asserted
    /// one is delivered, again after each EOI while it stays asserted, and no more once released.
    #[test]
    fn pci_intx_is_level_active_low() {
        use crate::devices::ioapic::{RTE_LEVEL, RTE_MASKED, RTE_POLARITY_LOW};
        let irq = Interrupts::new(1, true, 1_000_000_000, no_kick);
        enable(&irq, 0);
        let pending = || irq.apic(0).lapic.lock().pending();
        for pin in PCI_INTX_PINS {
            write_rte(&irq, pin, 0x41 | RTE_LEVEL | RTE_POLARITY_LOW | RTE_MASKED);
            write_rte(&irq, pin, 0x41 | RTE_LEVEL | RTE_POLARITY_LOW);
        }
        irq.set_pci_intx(16, false);
        assert_eq!(pending(), None, "idle PCI lines are quiet");
        let mut line = IntxLine::new(irq.clone(), 17);
        line.set(true);
        assert_eq!(pending(), Some(0x41));
        let take = || {
            let mut l = irq.apic(0).lapic.lock();
            assert_eq!(l.acknowledge(), Some(0x41));
            l.eoi();
        };
        take();
        assert_eq!(pending(), None, "remote IRR holds it until the EOI reaches the I/O APIC");
        irq.eoi(0x41);
        assert_eq!(pending(), Some(0x41), "still asserted: delivered again");
        take();
        line.set(false);
        irq.eoi(0x41);
        assert_eq!(pending(), None, "released");
        // Pins outside 16-23 are not PCI's.
        irq.set_pci_intx(4, true);
        irq.set_pci_intx(24, true);
        assert_eq!(pending(), None);
        // apic=off: nowhere to go, nothing breaks.
        let pic = Interrupts::new(1, false, 1_000_000_000, no_kick);
        IntxLine::new(pic.clone(), 16).set(true);
        assert_eq!(pic.pic_pending(), None);
    }

    #[test]
    fn pic_mode_wakes_vcpu0() {
        let irq = Interrupts::new(1, false, 1_000_000_000, no_kick);
        // ICW1-4 on the master: vectors 0x20.., then unmask IRQ 1.
        let mut pic = PicPorts(irq.clone());
        let mut frames = crate::mm::FrameAllocator::for_tests();
        let mem = crate::vmm::guest_mem::GuestMemory::for_tests(&mut frames);
        let cx = Ctx { now: crate::devices::time::Nanos::ZERO, mem: &mem };
        for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 4), (0x21, 1), (0x21, 0xFD)] {
            pic.write(port, 1, v, &cx);
        }
        IrqLine::new(irq.clone(), 1).set(true);
        assert_eq!(irq.pic_pending(), Some(0x21));
        assert!(irq.apic(0).attention.load(Ordering::Relaxed));
    }
}
