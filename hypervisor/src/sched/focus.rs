//! Keyboard focus: bytes typed on Vireo's console go to one VM at a time: to its virtio
//! console (`virtio=console`, Linux's hvc0) while the guest's driver is up, else to its UART.
//! Every VM's output stays on the console, each line prefixed with its VM's name.
//!
//! Switching: Ctrl-T then `n` (or Tab) gives the focus to the next VM with a console, Ctrl-T
//! then a digit 1-9 to the VM with that number (in start order), Ctrl-T Ctrl-T sends one
//! Ctrl-T to the focused VM. Vireo prints `vireo: console focus vm=NAME` on every switch.

use alloc::{sync::Weak, vec::Vec};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use spin::Mutex;

use crate::{arch::tsc, report, vmm::vm::Vm};

/// The escape key: Ctrl-T.
pub const ESCAPE: u8 = 0x14;

/// What a typed byte means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// Send this byte to the focused VM.
    Byte(u8),
    /// Focus the next VM.
    Next,
    /// Focus VM number n (0-based).
    Select(usize),
    /// Part of an escape sequence, or an unknown one: nothing to do.
    Nothing,
}

/// The escape-sequence decoder.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decoder {
    escaped: bool,
}

impl Decoder {
    pub fn feed(&mut self, b: u8) -> Key {
        if !self.escaped {
            if b == ESCAPE {
                self.escaped = true;
                return Key::Nothing;
            }
            return Key::Byte(b);
        }
        self.escaped = false;
        match b {
            ESCAPE => Key::Byte(ESCAPE),
            b'n' | b'\t' => Key::Next,
            b'1'..=b'9' => Key::Select((b - b'1') as usize),
            _ => Key::Nothing,
        }
    }
}

static VMS: Mutex<Vec<Weak<Vm>>> = Mutex::new(Vec::new());
static FOCUS: AtomicUsize = AtomicUsize::new(0);
static LAST_POLL: AtomicU64 = AtomicU64::new(0);
static DECODER: Mutex<Decoder> = Mutex::new(Decoder { escaped: false });

/// A VM with a console UART started (the first one gets the focus).
pub fn add(vm: Weak<Vm>) {
    VMS.lock().push(vm);
}

/// Whether some live VM could take keyboard input.
pub fn wants_polling() -> bool {
    VMS.lock().iter().any(|w| w.strong_count() > 0)
}

fn set_focus(vms: &[Weak<Vm>], n: usize) {
    if let Some(vm) = vms.get(n).and_then(Weak::upgrade) {
        FOCUS.store(n, Ordering::Relaxed);
        report!("console focus vm={}", vm.name);
    }
}

/// Moves typed bytes to the focused VM, at most about every millisecond.
pub fn poll_input() {
    let now = crate::vmm::vm::rdtsc();
    if now.wrapping_sub(LAST_POLL.load(Ordering::Relaxed)) < tsc::hz() / 1000 {
        return;
    }
    LAST_POLL.store(now, Ordering::Relaxed);
    let vms = VMS.lock();
    if vms.is_empty() {
        return;
    }
    // A partial line that has stood for 100 ms is probably a prompt: show it.
    for vm in vms.iter().filter_map(Weak::upgrade) {
        if let Some(uart) = &vm.uart {
            uart.lock().flush_if_quiet(vm.now(), 100_000_000);
        }
    }
    let mut decoder = DECODER.lock();
    loop {
        let focus = FOCUS.load(Ordering::Relaxed);
        let target = vms.get(focus).and_then(Weak::upgrade);
        let hvc = target.as_ref().and_then(|vm| vm.virtio_input.clone()).filter(|i| i.is_open());
        // Leave bytes in the host UART while the focused VM's receive FIFO (or its virtio
        // console's input) is full.
        if let Some(vm) = &target {
            let full = match &hvc {
                Some(input) => input.space() == 0,
                None => vm.uart.as_ref().is_some_and(|u| u.lock().uart.rx_space() == 0),
            };
            if full {
                return;
            }
        }
        let Some(byte) = crate::console::serial::try_read_byte() else { return };
        match decoder.feed(byte) {
            Key::Byte(b) => {
                if let Some(input) = &hvc {
                    input.push(&[b]);
                } else if let Some(uart) = target.as_ref().and_then(|vm| vm.uart.as_ref()) {
                    uart.lock().push_input(&[b]);
                }
            }
            Key::Next => {
                let n = vms.len();
                let next = (1..=n).map(|k| (focus + k) % n).find(|&i| vms[i].strong_count() > 0);
                if let Some(i) = next {
                    set_focus(&vms, i);
                }
            }
            Key::Select(i) => set_focus(&vms, i),
            Key::Nothing => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut d = Decoder::default();
        let keys: Vec<Key> = b"a\x14n\x14\x14\x142\x14x\x14\tb".iter().map(|&b| d.feed(b)).collect();
        assert_eq!(
            keys,
            [
                Key::Byte(b'a'),
                Key::Nothing,
                Key::Next,
                Key::Nothing,
                Key::Byte(ESCAPE),
                Key::Nothing,
                Key::Select(1),
                Key::Nothing,
                Key::Nothing,
                Key::Nothing,
                Key::Next,
                Key::Byte(b'b'),
            ]
        );
    }
}
