//! Output through the debug console port 0xE9 (one exit per byte: simple and independent
//! of the hypercalls under test).

pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            // SAFETY: port 0xE9 is Vireo's debug console; writing it has no other effect.
            unsafe { core::arch::asm!("out 0xE9, al", in("al") b, options(nomem, nostack)) };
        }
        Ok(())
    }
}
