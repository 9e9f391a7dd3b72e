//! The `log` backend: `[LEVEL] target: message` on the serial console.

use core::fmt::Write;
use log::{LevelFilter, Log, Metadata, Record};

use super::serial;

struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

impl Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let target = record.target().strip_prefix("vireo::").unwrap_or(record.target());
        serial::with_console(|c| {
            let _ = write!(c, "[{:<5}] {}: {}\r\n", record.level(), target, record.args());
        });
    }

    fn flush(&self) {}
}

/// Installs the logger (once) and sets the level.
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
