//! Port I/O routing for a VM. Unknown ports behave like an empty ISA bus: reads return all
//! ones, writes are ignored.

use guest_abi::hypercall::{TEST_DEVICE_PORT, TEST_IRQ_PORT};

/// The debug console port Bochs and QEMU guests conventionally write bytes to.
pub const DEBUG_CONSOLE_PORT: u16 = 0xE9;

/// What a port write asks the VM to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEffect {
    None,
    ConsoleByte(u8),
    TestDevice(u32),
    TestIrq(u32),
}

/// Routes an OUT of `size` bytes.
pub fn write(port: u16, size: u8, value: u32) -> PortEffect {
    match (port, size) {
        (DEBUG_CONSOLE_PORT, 1) => PortEffect::ConsoleByte(value as u8),
        (TEST_DEVICE_PORT, 4) => PortEffect::TestDevice(value),
        (TEST_IRQ_PORT, 4) => PortEffect::TestIrq(value),
        _ => PortEffect::None,
    }
}

/// The value an IN of `size` bytes reads, given the test device's current value.
pub fn read(port: u16, size: u8, test_device: u32) -> u32 {
    let all_ones = match size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    };
    match (port, size) {
        (TEST_DEVICE_PORT, 4) => test_device,
        _ => all_ones,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing() {
        assert_eq!(write(0xE9, 1, 0x41), PortEffect::ConsoleByte(b'A'));
        assert_eq!(write(0xE9, 2, 0x41), PortEffect::None);
        assert_eq!(write(0xF4, 1, 0), PortEffect::None, "the emulator's exit port is not the guest's");
        assert_eq!(read(0x80, 1, 0), 0xFF);
        assert_eq!(read(0x1234, 2, 0), 0xFFFF);
        assert_eq!(read(TEST_DEVICE_PORT, 4, 7), 7);
    }
}
