//! virtio-console (virtio 1.2 §5.3, device type 3), one port, no features: queue 0 is port
//! 0's receiveq (input to the guest; buffers the driver posts stay there, as no input is
//! offered yet), queue 1 its transmitq, whose bytes go to the VM's console the way its UART's
//! do: collected into lines, sanitised, printed as `[vm] line` on Vireo's serial port
//! ([`crate::devices::console`]). Linux makes the port /dev/hvc0.

use alloc::{boxed::Box, string::String};

use super::{queue::QueueError, stream, Queues, VirtioDevice, TYPE_CONSOLE};
use crate::devices::console::GuestConsole;

pub const RECEIVEQ: u16 = 0;
pub const TRANSMITQ: u16 = 1;
/// Queue size offered for both queues.
pub const QUEUE_SIZE: u16 = 128;
/// PCI class: simple communication controller, other (0x0780), as QEMU's virtio-serial.
pub const PCI_CLASS: u32 = 0x07_80_00;
/// Most bytes taken from one transmit chain (a hostile chain may claim 4 GiB).
pub const MAX_CHAIN_BYTES: u64 = 64 << 10;

/// `struct virtio_console_config` (§5.3.4): cols and rows only with VIRTIO_CONSOLE_F_SIZE,
/// max_nr_ports only with VIRTIO_CONSOLE_F_MULTIPORT, emerg_wr only with
/// VIRTIO_CONSOLE_F_EMERG_WRITE; none is offered, so all read 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleConfig {
    pub cols: u16,
    pub rows: u16,
    pub max_nr_ports: u32,
    pub emerg_wr: u32,
}

const _: () = assert!(core::mem::size_of::<ConsoleConfig>() == 12);

/// Where complete output lines go.
pub type LineSink = Box<dyn FnMut(&str) + Send>;

pub struct VirtioConsole {
    console: GuestConsole,
    out: LineSink,
    /// Bytes the guest wrote.
    pub bytes_out: u64,
}

impl VirtioConsole {
    /// A console whose lines go to VM `vm`'s output on Vireo's serial port.
    pub fn new(vm: &str) -> Self {
        let vm = String::from(vm);
        Self::with_sink(Box::new(move |line| crate::devices::console::print_line(&vm, line)))
    }

    /// A console whose lines go to `out`.
    pub fn with_sink(out: LineSink) -> Self {
        Self { console: GuestConsole::default(), out, bytes_out: 0 }
    }

    fn transmit(&mut self, queues: &mut Queues<'_>) -> Result<(), QueueError> {
        queues.disable_notifications(TRANSMITQ)?;
        loop {
            while let Some(chain) = queues.pop(TRANSMITQ)? {
                // The chain's readable stream, in pieces, up to MAX_CHAIN_BYTES.
                let total = chain.readable_len().min(MAX_CHAIN_BYTES);
                let mut buf = [0u8; 256];
                let mut off = 0u64;
                while off < total {
                    let want = usize::try_from(total - off).unwrap_or(buf.len()).min(buf.len());
                    let got = stream::read(&chain, queues.mem(), off, &mut buf[..want])?;
                    if got == 0 {
                        break;
                    }
                    let out = &mut self.out;
                    self.console.push(&buf[..got], &mut |l| out(l));
                    off += got as u64;
                }
                self.bytes_out += off;
                queues.push_used(TRANSMITQ, chain.head, 0)?;
            }
            if !queues.enable_notifications(TRANSMITQ)? {
                return Ok(());
            }
        }
    }
}

impl VirtioDevice for VirtioConsole {
    fn name(&self) -> &'static str {
        "console"
    }

    fn device_type(&self) -> u16 {
        TYPE_CONSOLE
    }

    fn pci_class(&self) -> u32 {
        PCI_CLASS
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config_len(&self) -> u64 {
        core::mem::size_of::<ConsoleConfig>() as u64
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn notify(&mut self, queue: u16, queues: &mut Queues<'_>) -> Result<(), QueueError> {
        match queue {
            TRANSMITQ => self.transmit(queues),
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {
        self.console.flush(&mut |l| (self.out)(l));
    }
}
