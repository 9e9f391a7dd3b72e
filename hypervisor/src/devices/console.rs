//! A VM's console: bytes from the guest (debug port 0xE9, the console hypercall) are
//! collected into lines and printed on Vireo's serial port prefixed with the VM's name.

use core::fmt::Write;

/// Longest line kept whole (Linux prints CPU flag lists of several hundred bytes).
const LINE_MAX: usize = 1024;

pub struct GuestConsole {
    line: [u8; LINE_MAX],
    len: usize,
}

impl Default for GuestConsole {
    fn default() -> Self {
        Self { line: [0; LINE_MAX], len: 0 }
    }
}

impl GuestConsole {
    /// Adds guest bytes; complete lines (and over-long ones) go to `out(line)`.
    pub fn push(&mut self, bytes: &[u8], out: &mut dyn FnMut(&str)) {
        for &b in bytes {
            self.push_byte(b, out);
        }
    }

    /// Adds one guest byte (a UART's THR write, or one of [`GuestConsole::push`]'s).
    #[inline]
    pub fn push_byte(&mut self, b: u8, out: &mut dyn FnMut(&str)) {
        // Printable ASCII and tab are kept; anything else but CR/LF (escape sequences from
        // a hostile guest) becomes '?', so the guest cannot forge Vireo's own lines.
        let kept = match b {
            b'\n' => return self.flush(out),
            b'\r' => return,
            0x20..=0x7E | b'\t' => b,
            _ => b'?',
        };
        if self.len == LINE_MAX {
            self.flush(out);
        }
        self.line[self.len] = kept;
        self.len += 1;
    }

    /// Emits a partial line, if any.
    pub fn flush(&mut self, out: &mut dyn FnMut(&str)) {
        if self.len > 0 {
            out(core::str::from_utf8(&self.line[..self.len]).unwrap_or("?"));
            self.len = 0;
        }
    }
}

/// Prints one guest line on Vireo's console: `[name] text`.
pub fn print_line(vm: &str, line: &str) {
    crate::console::serial::with_console(|c| {
        let _ = write!(c, "[{vm}] {line}\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_sanitising() {
        let mut c = GuestConsole::default();
        let mut lines = Vec::new();
        c.push(b"hello\r\nwor", &mut |l| lines.push(l.to_string()));
        c.push(b"ld\n\x1b[2Jvireo: fake\n", &mut |l| lines.push(l.to_string()));
        assert_eq!(lines, ["hello", "world", "?[2Jvireo: fake"]);
        let long = vec![b'x'; LINE_MAX + 5];
        c.push(&long, &mut |l| lines.push(l.to_string()));
        c.flush(&mut |l| lines.push(l.to_string()));
        assert_eq!(lines[3].len(), LINE_MAX);
        assert_eq!(lines[4].len(), 5);
    }

    #[test]
    fn byte_by_byte_is_the_same() {
        let input: Vec<u8> =
            b"a\tb\r\n\x1bc\n".iter().copied().chain(core::iter::repeat_n(b'y', 2 * LINE_MAX + 3)).collect();
        let (mut whole, mut bytes) = (GuestConsole::default(), GuestConsole::default());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        whole.push(&input, &mut |l| a.push(l.to_string()));
        for &x in &input {
            bytes.push_byte(x, &mut |l| b.push(l.to_string()));
        }
        whole.flush(&mut |l| a.push(l.to_string()));
        bytes.flush(&mut |l| b.push(l.to_string()));
        assert_eq!(a, b);
        assert_eq!(a[..2], ["a\tb", "?c"]);
    }
}
