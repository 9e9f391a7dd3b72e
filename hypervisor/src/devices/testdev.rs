//! The self-test device (`guest_abi::hypercall::TEST_DEVICE_PORT`): a 32-bit register that
//! reads back the last value written XOR a constant, proving port I/O round trips; and a
//! test interrupt source (`TEST_IRQ_PORT`) that raises a vector now or after a delay.

use guest_abi::hypercall::{TEST_DEVICE_XOR, TEST_IRQ_DELAY_UNIT};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestDevice {
    last: u32,
}

impl TestDevice {
    pub fn write(&mut self, value: u32) {
        self.last = value;
    }

    pub fn read(&self) -> u32 {
        self.last ^ TEST_DEVICE_XOR
    }
}

/// A request written to the test interrupt port: bits 7:0 vector, bits 31:8 delay in units
/// of `TEST_IRQ_DELAY_UNIT` TSC ticks (0 = raise now).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqRequest {
    pub vector: u8,
    pub delay_tsc: u64,
}

impl IrqRequest {
    /// Decodes a port write; vectors below 32 are exceptions, not interrupts: refused.
    pub fn decode(value: u32) -> Option<Self> {
        let vector = value as u8;
        (vector >= 32).then_some(Self { vector, delay_tsc: (value >> 8) as u64 * TEST_IRQ_DELAY_UNIT })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_irq_decode() {
        let mut d = TestDevice::default();
        d.write(0x1234_5678);
        assert_eq!(d.read(), 0x1234_5678 ^ TEST_DEVICE_XOR);
        assert_eq!(IrqRequest::decode(0x40), Some(IrqRequest { vector: 0x40, delay_tsc: 0 }));
        assert_eq!(IrqRequest::decode(0x0341).unwrap().delay_tsc, 3 * TEST_IRQ_DELAY_UNIT);
        assert_eq!(IrqRequest::decode(0x0E), None);
    }
}
