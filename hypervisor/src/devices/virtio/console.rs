//! virtio-console (virtio 1.2 §5.3, device type 3), one port, no features: queue 1 is port
//! 0's transmitq, whose bytes go to the VM's console the way its UART's do: collected into
//! lines, sanitised, printed as `[vm] line` on Vireo's serial port
//! ([`crate::devices::console`]); queue 0 its receiveq, filled with the bytes typed on
//! Vireo's console while the VM has the keyboard focus ([`ConsoleInput`], `sched::focus`:
//! a VM with a virtio console gets its input there, not on its UART). Linux makes the port
//! /dev/hvc0: with `console=hvc0` the guest's console needs no exit per byte either way.

use alloc::{boxed::Box, collections::VecDeque, string::String, sync::Arc};
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;

use super::{queue::QueueError, stream, Queues, VirtioDevice, TYPE_CONSOLE};
use crate::devices::{console::GuestConsole, irqchip::Interrupts};

/// Typed bytes a console holds for its guest at most (more wait in the host's UART).
pub const INPUT_MAX: usize = 4096;

/// Keyboard input on its way to a VM's virtio console: filled by the focus poll (on host CPU
/// 0), drained into the receive queue on the VM's own vCPU at its next device tick.
pub struct ConsoleInput {
    bytes: Mutex<VecDeque<u8>>,
    /// Bytes came and the device has not looked yet.
    wake: AtomicBool,
    /// The driver is up with its receive queue (bytes for a console nobody reads would pile up).
    open: AtomicBool,
    irq: Option<Arc<Interrupts>>,
}

impl ConsoleInput {
    /// Input for the VM woken through `irq` (`None`: nothing to wake, for tests).
    pub fn new(irq: Option<Arc<Interrupts>>) -> Self {
        ConsoleInput {
            bytes: Mutex::new(VecDeque::new()),
            wake: AtomicBool::new(false),
            open: AtomicBool::new(false),
            irq,
        }
    }

    /// Whether the guest's driver is up: typed bytes go here rather than to the UART.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Room for more bytes.
    pub fn space(&self) -> usize {
        INPUT_MAX.saturating_sub(self.bytes.lock().len())
    }

    /// Queues `bytes` for the guest; returns how many fitted (at most [`INPUT_MAX`] wait).
    pub fn push(&self, bytes: &[u8]) -> usize {
        let n = {
            let mut q = self.bytes.lock();
            let n = bytes.len().min(INPUT_MAX.saturating_sub(q.len()));
            q.extend(&bytes[..n]);
            n
        };
        if n > 0 && !self.wake.swap(true, Ordering::AcqRel) {
            if let Some(irq) = &self.irq {
                irq.wake_devices();
            }
        }
        n
    }
}

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
    input: Arc<ConsoleInput>,
    /// Bytes the guest wrote.
    pub bytes_out: u64,
    /// Bytes given to the guest.
    pub bytes_in: u64,
}

impl VirtioConsole {
    /// A console whose lines go to VM `vm`'s output on Vireo's serial port, whose input comes
    /// through `input`.
    pub fn new(vm: &str, input: Arc<ConsoleInput>) -> Self {
        let vm = String::from(vm);
        Self::with_sink(Box::new(move |line| crate::devices::console::print_line(&vm, line)), input)
    }

    /// A console whose lines go to `out`.
    pub fn with_sink(out: LineSink, input: Arc<ConsoleInput>) -> Self {
        Self { console: GuestConsole::default(), out, input, bytes_out: 0, bytes_in: 0 }
    }

    /// Moves waiting input into the driver's receive buffers while both last (one chain takes
    /// as many bytes as it holds). Without a buffer the bytes wait, and the driver's next kick
    /// on the receiveq is asked for (EVENT_IDX, §2.7.10).
    fn receive(&mut self, queues: &mut Queues<'_>) -> Result<(), QueueError> {
        self.input.wake.store(false, Ordering::Release);
        loop {
            if self.input.bytes.lock().is_empty() {
                return Ok(());
            }
            let Some(chain) = queues.pop(RECEIVEQ)? else {
                if queues.enable_notifications(RECEIVEQ)? {
                    continue;
                }
                return Ok(());
            };
            let mut buf = [0u8; 256];
            let room = chain.writable_len().min(MAX_CHAIN_BYTES);
            let mut written = 0u64;
            while written < room {
                let n = {
                    let mut q = self.input.bytes.lock();
                    let n = q.len().min(buf.len()).min(usize::try_from(room - written).unwrap_or(usize::MAX));
                    for (b, v) in buf.iter_mut().zip(q.drain(..n)) {
                        *b = v;
                    }
                    n
                };
                if n == 0 {
                    break;
                }
                stream::write(&chain, queues.mem(), written, &buf[..n])?;
                written += n as u64;
            }
            self.bytes_in += written;
            queues.push_used(RECEIVEQ, chain.head, written as u32)?;
        }
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
            RECEIVEQ => self.receive(queues),
            _ => Ok(()),
        }
    }

    fn activate(&mut self, _features: u64) {
        self.input.open.store(true, Ordering::Release);
    }

    fn reset(&mut self) {
        self.console.flush(&mut |l| (self.out)(l));
        // The driver is gone: typed bytes go to the UART again, and what waited is dropped.
        self.input.open.store(false, Ordering::Release);
        self.input.bytes.lock().clear();
        self.input.wake.store(false, Ordering::Release);
    }

    fn pending_queues(&self) -> u64 {
        if self.input.wake.load(Ordering::Acquire) {
            1 << RECEIVEQ
        } else {
            0
        }
    }
}
