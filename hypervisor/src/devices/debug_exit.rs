//! QEMU's `isa-debug-exit` device, as test kernels use it (`-device
//! isa-debug-exit,iobase=0xf4,iosize=0x04`): a write of V to its ports ends the machine with
//! status (V << 1) | 1, so no write can mean status 0. Here it ends the VM with outcome
//! `exited` and that status; reads return 0 (QEMU's device reads as 0 too).

use super::bus::{BusEffect, Ctx, Device, Range};

/// The port base and width test kernels conventionally configure.
pub const DEBUG_EXIT_BASE: u16 = 0xF4;
pub const DEBUG_EXIT_LEN: u16 = 4;

/// The exit status a write of `value` (`size` bytes) gives.
pub fn status(value: u64, size: u8) -> u64 {
    let mask = match size {
        1 => 0xFF,
        2 => 0xFFFF,
        4 => 0xFFFF_FFFF,
        _ => u64::MAX >> 1,
    };
    ((value & mask) << 1) | 1
}

#[derive(Default)]
pub struct DebugExit;

impl DebugExit {
    pub const RANGES: [Range; 1] = [Range::port(DEBUG_EXIT_BASE, DEBUG_EXIT_LEN)];
}

impl Device for DebugExit {
    fn name(&self) -> &'static str {
        "isa-debug-exit"
    }

    fn read(&mut self, _addr: u64, _size: u8, _cx: &Ctx<'_>) -> u64 {
        0
    }

    fn write(&mut self, _addr: u64, size: u8, value: u64, _cx: &Ctx<'_>) -> BusEffect {
        BusEffect::Exit(status(value, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        devices::{
            bus::{device, Bus, Space},
            time::Nanos,
        },
        mm::FrameAllocator,
        vmm::guest_mem::GuestMemory,
    };

    #[test]
    fn a_write_ends_with_qemus_status() {
        assert_eq!(status(0, 1), 1);
        assert_eq!(status(1, 1), 3);
        assert_eq!(status(0x10, 4), 0x21);
        assert_eq!(status(0x1FF, 1), 0x1FF, "only the access width counts");
        assert_eq!(status(0xFFFF_FFFF, 4), 0x1_FFFF_FFFF);
        let mut bus = Bus::new();
        bus.add(device(DebugExit), &DebugExit::RANGES).unwrap();
        let mut frames = FrameAllocator::for_tests();
        let mem = GuestMemory::for_tests(&mut frames);
        let cx = Ctx { now: Nanos::ZERO, mem: &mem };
        assert_eq!(bus.write(Space::Port, 0xF4, 1, 0, &cx), Some(BusEffect::Exit(1)));
        assert_eq!(bus.write(Space::Port, 0xF4, 4, 2, &cx), Some(BusEffect::Exit(5)));
        assert_eq!(bus.read(Space::Port, 0xF5, 1, &cx), Some(0));
        assert_eq!(bus.read(Space::Port, 0xF8, 1, &cx), None);
    }
}
