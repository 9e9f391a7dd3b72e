//! Device models a VM reaches through port I/O (and, later, MMIO).

pub mod bus;
pub mod console;
pub mod debug_exit;
pub mod fw_cfg;
pub mod ioapic;
pub mod irq;
pub mod irqchip;
pub mod lapic;
pub mod msix;
pub mod pc;
pub mod pc_testdev;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod pm;
pub mod ports;
pub mod rtc;
pub mod switch;
pub mod testdev;
pub mod time;
pub mod uart;
pub mod virtio;
