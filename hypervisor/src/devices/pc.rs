//! The PC platform of a Linux VM, put on its bus: 16550 UART on IRQ4, 8254 PIT on IRQ0,
//! MC146818 RTC on IRQ8, ACPI PM fixed hardware (SCI on IRQ9), PCI configuration space, the
//! 8259 pair, and with APICs the I/O APIC page. Each device drives its own [`IrqLine`]; the
//! local APICs belong to the vCPUs (see `irqchip`).

use alloc::{boxed::Box, sync::Arc};

use spin::Mutex;

use super::{
    bus::{device, Bus, Overlap, Range},
    debug_exit::DebugExit,
    fw_cfg::FwCfg,
    ioapic::{IOAPIC_BASE, IOAPIC_MMIO_SIZE},
    irqchip::{Interrupts, IoApicMmio, IrqLine, PicPorts},
    pc_testdev::PcTestdev,
    pci::{Bdf, PciBus, PciWindow},
    pic::{ELCR_MASTER, MASTER_CMD, SLAVE_CMD},
    pit::{PitDevice, PIT_IRQ},
    pm::{PmConfig, PmDevice, SCI_IRQ},
    rtc::{RtcDevice, RTC_IRQ},
    uart::{ConsoleUart, COM1_BASE, COM1_IRQ},
    virtio::{
        blk::{DiskRef, VirtioBlk},
        console::{ConsoleInput, VirtioConsole},
        netdev::VirtioNet,
        pci::VirtioPci,
    },
};

/// Nanoseconds since boot, for the switches' address ageing.
fn net_clock() -> u64 {
    crate::arch::tsc::to_nanos(crate::arch::tsc::rdtsc())
}

/// What a VM's PCI bus holds beyond the host bridge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciOptions<'a> {
    /// The root bridge's 32-bit memory window `(base, last)` (the DSDT `_CRS` window the guest
    /// assigns BARs from), where memory BARs decode; `None`: no BAR decodes.
    pub mmio32: Option<(u64, u64)>,
    /// A virtio-console at [`VIRTIO_CONSOLE_SLOT`] (00:01.0).
    pub virtio_console: bool,
    /// A virtio-blk on this disk at [`VIRTIO_BLK_SLOT`] (00:02.0).
    pub virtio_blk: Option<DiskRef>,
    /// A virtio-net at [`VIRTIO_NET_SLOT`] (00:03.0) on the named Vireo-wide switch.
    pub net: Option<&'a str>,
}

/// The PCI device number of the virtio-console (function 0, INTA).
pub const VIRTIO_CONSOLE_SLOT: u8 = 1;
/// The PCI device number of the virtio-blk (function 0, INTA).
pub const VIRTIO_BLK_SLOT: u8 = 2;
/// The PCI device number of the virtio-net NIC (function 0, INTA).
pub const VIRTIO_NET_SLOT: u8 = 3;

/// Where a VM's keyboard input goes: its console UART, and its virtio console's input when it
/// has one (`sched::focus` prefers the latter while the guest's driver is up).
pub struct Consoles {
    pub uart: Arc<Mutex<ConsoleUart>>,
    pub virtio_input: Option<Arc<ConsoleInput>>,
}

/// Adds the PC devices of VM `name` to `bus`; returns its consoles (for keyboard input).
/// `unix_secs`: wall-clock time the RTC starts at.
pub fn build(
    bus: &mut Bus,
    irq: &Arc<Interrupts>,
    name: &str,
    unix_secs: u64,
    pci_options: PciOptions<'_>,
) -> Result<Consoles, Overlap> {
    let line = |isa| IrqLine::new(irq.clone(), isa);
    let uart = device(ConsoleUart::new(COM1_BASE, line(COM1_IRQ), name));
    let ranges = uart.lock().ranges();
    bus.add(uart.clone(), &ranges)?;
    bus.add(device(PitDevice::new(line(PIT_IRQ))), &PitDevice::RANGES)?;
    bus.add(device(RtcDevice::new(unix_secs, line(RTC_IRQ))), &RtcDevice::RANGES)?;
    let pm = PmDevice::new(PmConfig::default(), line(SCI_IRQ));
    let ranges = pm.ranges();
    bus.add(device(pm), &ranges)?;
    let mut pci_bus = PciBus::new();
    let mut virtio_input = None;
    if pci_options.virtio_console {
        let gsi = crate::guest::acpi::pci_intx_gsi(VIRTIO_CONSOLE_SLOT, 0) as u8;
        let input = Arc::new(ConsoleInput::new(Some(irq.clone())));
        virtio_input = Some(input.clone());
        let console = VirtioPci::new(Box::new(VirtioConsole::new(name, input)), name, irq.clone(), gsi);
        if let Some(bdf) = Bdf::new(0, VIRTIO_CONSOLE_SLOT, 0) {
            // The slot is free on a new bus.
            let _ = pci_bus.add(bdf, Box::new(console));
        }
    }
    if let Some(DiskRef(disk)) = pci_options.virtio_blk {
        let gsi = crate::guest::acpi::pci_intx_gsi(VIRTIO_BLK_SLOT, 0) as u8;
        let blk = VirtioPci::new(Box::new(VirtioBlk::new(disk)), name, irq.clone(), gsi);
        if let Some(bdf) = Bdf::new(0, VIRTIO_BLK_SLOT, 0) {
            // The slot is free: nothing else goes there.
            let _ = pci_bus.add(bdf, Box::new(blk));
        }
    }
    if let Some(switch) = pci_options.net {
        match crate::devices::virtio::netdev::switch_named(switch) {
            Some(sw) => {
                let gsi = crate::guest::acpi::pci_intx_gsi(VIRTIO_NET_SLOT, 0) as u8;
                let nic = VirtioNet::new(name, sw, irq.clone(), net_clock);
                log::info!("vm {name}: virtio-net at 00:03.0 on switch {switch}, mac {}", nic.mac());
                let nic = VirtioPci::new(Box::new(nic), name, irq.clone(), gsi);
                if let Some(bdf) = Bdf::new(0, VIRTIO_NET_SLOT, 0) {
                    // The slot is free on a new bus.
                    let _ = pci_bus.add(bdf, Box::new(nic));
                }
            }
            None => log::warn!("vm {name}: too many switches: no NIC on {switch}"),
        }
    }
    let pci = device(pci_bus);
    bus.add(pci.clone(), &PciBus::RANGES)?;
    if let Some((base, last)) = pci_options.mmio32 {
        let window = PciWindow::new(pci.clone(), base, last);
        let range = window.range();
        bus.add(device(window), &[range])?;
    }
    bus.add(
        device(PicPorts(irq.clone())),
        &[Range::port(MASTER_CMD, 2), Range::port(SLAVE_CMD, 2), Range::port(ELCR_MASTER, 2)],
    )?;
    if irq.apic_mode() {
        bus.add(device(IoApicMmio(irq.clone())), &[Range::mmio(IOAPIC_BASE, IOAPIC_MMIO_SIZE)])?;
    }
    Ok(Consoles { uart, virtio_input })
}

/// Adds QEMU's test devices that kernels written for `qemu -kernel` use: `isa-debug-exit`
/// at port 0xF4, `fw_cfg` at 0x510 (RAM size `ram`, `cpus`, kernel command line `cmdline`,
/// VM `name`) and `pc-testdev` (ports 0xE0-0xEB, 0x2000-0x2017, MMIO at 0xFF00_0000).
pub fn add_qemu_test_devices(
    bus: &mut Bus,
    irq: &Arc<Interrupts>,
    ram: u64,
    cpus: u16,
    cmdline: &str,
    name: &str,
) -> Result<(), Overlap> {
    bus.add(device(DebugExit), &DebugExit::RANGES)?;
    bus.add(device(FwCfg::new(ram, cpus, cmdline, name)), &FwCfg::RANGES)?;
    bus.add(device(PcTestdev::new(irq)), &PcTestdev::RANGES)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{
        bus::{BusEffect, Ctx, Space},
        irqchip::no_kick,
        time::Nanos,
    };
    use crate::{mm::FrameAllocator, vmm::guest_mem::GuestMemory};

    #[test]
    fn the_pc_answers_on_its_ports() {
        let irq = Interrupts::new(1, true, 1_000_000_000, no_kick);
        let mut bus = Bus::new();
        build(
            &mut bus,
            &irq,
            "t",
            0,
            PciOptions { mmio32: Some((0xC000_0000, 0xFEBF_FFFF)), virtio_console: true, virtio_blk: None, net: None },
        )
        .unwrap();
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let cx = Ctx { now: Nanos::ZERO, mem: &mem };
        // UART scratch register round trip.
        bus.write(Space::Port, 0x3FF, 1, 0x5A, &cx).unwrap();
        assert_eq!(bus.read(Space::Port, 0x3FF, 1, &cx), Some(0x5A));
        // The PCI host bridge's vendor/device ID.
        bus.write(Space::Port, 0xCF8, 4, 0x8000_0000, &cx).unwrap();
        assert_eq!(bus.read(Space::Port, 0xCFC, 4, &cx), Some(0x1237_8086));
        // 0xCF9 is the reset register, not PCI: bit 2 resets.
        assert_eq!(bus.write(Space::Port, 0xCF9, 1, 0x06, &cx), Some(BusEffect::Reset));
        // S5 through PM1a_CNT.
        assert_eq!(bus.write(Space::Port, 0x604, 2, (5 << 10) | (1 << 13), &cx), Some(BusEffect::PowerOff));
        // The I/O APIC's version register.
        bus.write(Space::Mmio, IOAPIC_BASE, 4, 1, &cx).unwrap();
        assert_eq!(bus.read(Space::Mmio, IOAPIC_BASE + 0x10, 4, &cx).map(|v| v & 0xFF), Some(0x20));
        assert!(bus.read(Space::Port, 0x80, 1, &cx).is_none());
        // The PCI window answers (no BAR there yet: all ones).
        assert_eq!(bus.read(Space::Mmio, 0xC000_0000, 4, &cx), Some(0xFFFF_FFFF));
        // The virtio-console at 00:01.0; with its BAR placed and memory decoding on, its
        // common configuration says 2 queues.
        bus.write(Space::Port, 0xCF8, 4, 0x8000_0800, &cx).unwrap();
        assert_eq!(bus.read(Space::Port, 0xCFC, 4, &cx), Some(0x1043_1AF4));
        bus.write(Space::Port, 0xCF8, 4, 0x8000_0810, &cx).unwrap();
        bus.write(Space::Port, 0xCFC, 4, 0xC000_8000, &cx).unwrap();
        bus.write(Space::Port, 0xCF8, 4, 0x8000_0804, &cx).unwrap();
        bus.write(Space::Port, 0xCFC, 2, 0x0006, &cx).unwrap();
        assert_eq!(bus.read(Space::Mmio, 0xC000_8012, 2, &cx), Some(2));
    }
}
