//! Vireo's console: COM1, the `log` backend, and the structured `vireo:` report lines that
//! tests and tools parse.
//!
//! Two kinds of output share the serial line:
//! - human logs through the `log` crate (`[INFO ] ...`), filtered by the `log=` key;
//! - structured report lines (`vireo: key=value ...`) through [`report!`](crate::report),
//!   printed whatever the log level, because tests and scripts rely on them.

pub mod logger;
pub mod ring;
pub mod serial;

use core::fmt::{self, Write};

/// Writes one structured report line: `vireo: <formatted text>`.
pub fn report_line(args: fmt::Arguments<'_>) {
    serial::with_console(|c| {
        let _ = c.write_str("vireo: ");
        let _ = c.write_fmt(args);
        let _ = c.write_str("\r\n");
    });
}

/// Prints a structured `vireo: ...` line on the console, whatever the log level.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => { $crate::console::report_line(format_args!($($arg)*)) };
}

/// Formats a byte count the way the banner prints it (`512MiB`, `1536KiB`, `12B`).
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (unit, name) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{}", self.0 / unit, name);
            }
        }
        if self.0 >= 1 << 20 {
            return write!(f, "{}KiB", self.0 >> 10);
        }
        write!(f, "{}B", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::Bytes;

    #[test]
    fn byte_formatting() {
        assert_eq!(format!("{}", Bytes(512 << 20)), "512MiB");
        assert_eq!(format!("{}", Bytes(3 << 30)), "3GiB");
        assert_eq!(format!("{}", Bytes((512 << 20) + 4096)), "524292KiB");
        assert_eq!(format!("{}", Bytes(12)), "12B");
        assert_eq!(format!("{}", Bytes(8192)), "8KiB");
        assert_eq!(format!("{}", Bytes(0)), "0B");
    }
}
