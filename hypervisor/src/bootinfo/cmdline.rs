//! The hypervisor command line: the text after the kernel path on GRUB's `multiboot2` line.
//!
//! Syntax: whitespace-separated `key=value` tokens. Keys (documented in README.md):
//!
//! | key | values | default | meaning |
//! |---|---|---|---|
//! | `log` | `off` `error` `warn` `info` `debug` `trace` | `info` | console log level |
//! | `exit` | `halt` `qemu` `bochs` | `halt` | what Vireo does when nothing is left to run |
//! | `heap` | size with optional `K`/`M`/`G` suffix, 1M..1G | `16M` | Vireo's heap size |
//! | `cpus` | 1..=256 | all | how many host CPUs Vireo starts and uses (the BSP counts) |
//! | `slice` | `100us`..`1000ms` (`us` or `ms`) | `5ms` | the scheduler's time slice when vCPUs share a host CPU |
//! | `test.fault` | `ud` `gp` `pf` `de` `bp` `stack` | none | test builds only: provoke a CPU exception |
//! | `test.mbi` | `module-overlaps-image` | none | test builds only: corrupt the boot information |
//!
//! Bad input never stops Vireo: an unknown key, a bad value or a malformed token is
//! reported by name through the `diag` callback and ignored; the default stays.

use core::fmt;

/// What Vireo does when it has nothing left to run (or after a fatal error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitMethod {
    /// Halt the CPU forever (bare metal).
    Halt,
    /// QEMU's `isa-debug-exit` device at port 0xF4.
    Qemu,
    /// Bochs's shutdown port 0x8900.
    Bochs,
}

/// A CPU exception a test build can provoke on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestFault {
    /// `ud2`: #UD.
    InvalidOpcode,
    /// Load of a non-canonical address: #GP.
    GeneralProtection,
    /// Write to an unmapped address: #PF.
    PageFault,
    /// Division by zero: #DE.
    DivideError,
    /// `int3`: #BP.
    Breakpoint,
    /// Unbounded recursion into the boot stack's guard page: #PF on the IST stack.
    StackOverflow,
}

/// A deliberate corruption of the boot information, for tests of its validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestMbi {
    /// Pretend the first module overlaps Vireo's own image.
    ModuleOverlapsImage,
}

/// The parsed command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub log: log::LevelFilter,
    pub exit: ExitMethod,
    pub heap_bytes: u64,
    /// Most host CPUs to use (the BSP included); `None`: every enabled CPU the MADT lists.
    pub cpus: Option<u16>,
    /// The scheduler's time slice in microseconds.
    pub slice_us: u64,
    pub test_fault: Option<TestFault>,
    pub test_mbi: Option<TestMbi>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            log: log::LevelFilter::Info,
            exit: ExitMethod::Halt,
            heap_bytes: 16 << 20,
            cpus: None,
            slice_us: 5_000,
            test_fault: None,
            test_mbi: None,
        }
    }
}

/// A problem found in the command line; the token is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Diag<'a> {
    UnknownKey {
        key: &'a str,
    },
    BadValue {
        key: &'a str,
        value: &'a str,
        expected: &'static str,
    },
    /// A token that is not `key=value` (empty key, unbalanced quote, ...).
    Malformed {
        token: &'a str,
    },
    /// A `test.*` key in a build without test hooks.
    TestKeyWithoutHooks {
        key: &'a str,
    },
}

impl fmt::Display for Diag<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Diag::UnknownKey { key } => write!(f, "unknown key '{key}' ignored"),
            Diag::BadValue { key, value, expected } => {
                write!(f, "bad value '{value}' for key '{key}' ignored (expected {expected})")
            }
            Diag::Malformed { token } => write!(f, "malformed token '{token}' ignored (expected key=value)"),
            Diag::TestKeyWithoutHooks { key } => {
                write!(f, "key '{key}' needs a test-hooks build; ignored")
            }
        }
    }
}

const LOG_VALUES: &str = "off|error|warn|info|debug|trace";
const EXIT_VALUES: &str = "halt|qemu|bochs";
const HEAP_VALUES: &str = "a size from 1M to 1G, e.g. 32M";
const SLICE_VALUES: &str = "a time from 100us to 1000ms, e.g. 5ms";

/// `N` followed by `us` or `ms`, in microseconds.
fn parse_duration_us(value: &str) -> Option<u64> {
    let (digits, scale) = match value.strip_suffix("ms") {
        Some(d) => (d, 1000),
        None => (value.strip_suffix("us")?, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

const CPUS_VALUES: &str = "a number from 1 to 256";
/// Most host CPUs the `cpus=` key accepts.
pub const MAX_HOST_CPUS: u16 = 256;
const FAULT_VALUES: &str = "ud|gp|pf|de|bp|stack";
const MBI_VALUES: &str = "module-overlaps-image";

/// Parses `text`; every problem goes to `diag`. `test_hooks` says whether this build
/// honours the `test.*` keys.
pub fn parse<'a>(text: &'a str, test_hooks: bool, mut diag: impl FnMut(Diag<'a>)) -> Config {
    let mut config = Config::default();
    for token in text.split_ascii_whitespace() {
        let Some((key, raw_value)) = token.split_once('=') else {
            diag(Diag::Malformed { token });
            continue;
        };
        let value = match unquote(raw_value) {
            Some(v) if !key.is_empty() => v,
            _ => {
                diag(Diag::Malformed { token });
                continue;
            }
        };
        let bad = |expected| Diag::BadValue { key, value, expected };
        match key {
            "log" => match parse_level(value) {
                Some(level) => config.log = level,
                None => diag(bad(LOG_VALUES)),
            },
            "exit" => match value {
                "halt" => config.exit = ExitMethod::Halt,
                "qemu" => config.exit = ExitMethod::Qemu,
                "bochs" => config.exit = ExitMethod::Bochs,
                _ => diag(bad(EXIT_VALUES)),
            },
            "heap" => match parse_size(value) {
                Some(bytes) if (1 << 20..=1 << 30).contains(&bytes) => config.heap_bytes = bytes,
                _ => diag(bad(HEAP_VALUES)),
            },
            "cpus" => match value.parse::<u16>() {
                Ok(n) if (1..=MAX_HOST_CPUS).contains(&n) && value.bytes().all(|b| b.is_ascii_digit()) => {
                    config.cpus = Some(n)
                }
                _ => diag(bad(CPUS_VALUES)),
            },
            "slice" => match parse_duration_us(value) {
                Some(us) if (100..=1_000_000).contains(&us) => config.slice_us = us,
                _ => diag(bad(SLICE_VALUES)),
            },
            "test.fault" | "test.mbi" if !test_hooks => diag(Diag::TestKeyWithoutHooks { key }),
            "test.fault" => match parse_fault(value) {
                Some(fault) => config.test_fault = Some(fault),
                None => diag(bad(FAULT_VALUES)),
            },
            "test.mbi" => match value {
                "module-overlaps-image" => config.test_mbi = Some(TestMbi::ModuleOverlapsImage),
                _ => diag(bad(MBI_VALUES)),
            },
            _ => diag(Diag::UnknownKey { key }),
        }
    }
    config
}

/// Strips one pair of surrounding double quotes; `None` if quotes are unbalanced.
fn unquote(value: &str) -> Option<&str> {
    let quotes = value.bytes().filter(|&b| b == b'"').count();
    match quotes {
        0 => Some(value),
        2 if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') => Some(&value[1..value.len() - 1]),
        _ => None,
    }
}

fn parse_level(value: &str) -> Option<log::LevelFilter> {
    use log::LevelFilter::*;
    Some(match value {
        "off" => Off,
        "error" => Error,
        "warn" => Warn,
        "info" => Info,
        "debug" => Debug,
        "trace" => Trace,
        _ => return None,
    })
}

fn parse_fault(value: &str) -> Option<TestFault> {
    use TestFault::*;
    Some(match value {
        "ud" => InvalidOpcode,
        "gp" => GeneralProtection,
        "pf" => PageFault,
        "de" => DivideError,
        "bp" => Breakpoint,
        "stack" => StackOverflow,
        _ => return None,
    })
}

/// Parses `123`, `64K`, `16M`, `2G` (binary units, case-insensitive) without overflow.
pub fn parse_size(value: &str) -> Option<u64> {
    let (digits, shift) = match value.as_bytes().last()? {
        b'k' | b'K' => (&value[..value.len() - 1], 10),
        b'm' | b'M' => (&value[..value.len() - 1], 20),
        b'g' | b'G' => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(text: &str, hooks: bool) -> (Config, Vec<String>) {
        let mut diags = Vec::new();
        let config = parse(text, hooks, |d| diags.push(d.to_string()));
        (config, diags)
    }

    #[test]
    fn empty_gives_defaults() {
        let (c, d) = parse_all("", false);
        assert_eq!(c, Config::default());
        assert!(d.is_empty());
        let (c, d) = parse_all("   \t ", false);
        assert_eq!(c, Config::default());
        assert!(d.is_empty());
    }

    #[test]
    fn known_keys() {
        let (c, d) = parse_all("log=debug exit=qemu heap=32M", false);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(c.log, log::LevelFilter::Debug);
        assert_eq!(c.exit, ExitMethod::Qemu);
        assert_eq!(c.heap_bytes, 32 << 20);
        let (c, _) = parse_all("exit=\"bochs\"", false);
        assert_eq!(c.exit, ExitMethod::Bochs);
    }

    #[test]
    fn bad_input_is_reported_by_name_and_ignored() {
        let (c, d) = parse_all("log=loud frobnicate=1 exit=qemu =x novalue heap=99999999999G q=\"open", false);
        assert_eq!(c.log, log::LevelFilter::Info, "bad value keeps the default");
        assert_eq!(c.exit, ExitMethod::Qemu, "good keys still apply");
        assert_eq!(c.heap_bytes, Config::default().heap_bytes);
        assert_eq!(
            d,
            vec![
                "bad value 'loud' for key 'log' ignored (expected off|error|warn|info|debug|trace)",
                "unknown key 'frobnicate' ignored",
                "malformed token '=x' ignored (expected key=value)",
                "malformed token 'novalue' ignored (expected key=value)",
                "bad value '99999999999G' for key 'heap' ignored (expected a size from 1M to 1G, e.g. 32M)",
                "malformed token 'q=\"open' ignored (expected key=value)",
            ]
        );
    }

    #[test]
    fn heap_bounds() {
        assert_eq!(parse_all("heap=512K", false).1.len(), 1);
        assert_eq!(parse_all("heap=2G", false).1.len(), 1);
        assert_eq!(parse_all("heap=1G", false).0.heap_bytes, 1 << 30);
        assert_eq!(parse_all("heap=1048576", false).0.heap_bytes, 1 << 20);
    }

    #[test]
    fn cpus_key() {
        assert_eq!(parse_all("", false).0.cpus, None, "default: every CPU");
        assert_eq!(parse_all("", false).0.slice_us, 5_000);
        assert_eq!(parse_all("slice=250us", false).0.slice_us, 250);
        assert_eq!(parse_all("slice=20ms", false).0.slice_us, 20_000);
        for bad in ["slice=5", "slice=50us", "slice=2000ms", "slice=ms", "slice=-1ms"] {
            let (c, d) = parse_all(bad, false);
            assert_eq!(c.slice_us, 5_000, "{bad}");
            assert_eq!(d.len(), 1, "{bad}");
        }
        let (c, d) = parse_all("cpus=1", false);
        assert!(d.is_empty());
        assert_eq!(c.cpus, Some(1));
        assert_eq!(parse_all("cpus=256", false).0.cpus, Some(256));
        assert_eq!(parse_all("cpus=\"4\"", false).0.cpus, Some(4));
        for bad in ["cpus=0", "cpus=257", "cpus=-1", "cpus=+2", "cpus=", "cpus=two", "cpus=99999999"] {
            let (c, d) = parse_all(bad, false);
            assert_eq!(c.cpus, None, "{bad}");
            assert_eq!(d.len(), 1, "{bad}");
            assert!(d[0].contains("key 'cpus'") && d[0].contains("1 to 256"), "{bad}: {d:?}");
        }
        let (c, _) = parse_all("cpus=2 cpus=0", false);
        assert_eq!(c.cpus, Some(2), "a bad value keeps the earlier good one");
    }

    #[test]
    fn test_keys_need_hooks() {
        let (c, d) = parse_all("test.fault=ud", false);
        assert_eq!(c.test_fault, None);
        assert_eq!(d, vec!["key 'test.fault' needs a test-hooks build; ignored"]);
        let (c, d) = parse_all("test.fault=pf test.mbi=module-overlaps-image", true);
        assert!(d.is_empty());
        assert_eq!(c.test_fault, Some(TestFault::PageFault));
        assert_eq!(c.test_mbi, Some(TestMbi::ModuleOverlapsImage));
        let (_, d) = parse_all("test.fault=nope", true);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("3g"), Some(3 << 30));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("1.5M"), None);
        assert_eq!(parse_size("18446744073709551615K"), None);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A tiny deterministic fuzz over awkward characters (UTF-8 included).
        let alphabet = ["=", "\"", " ", "log", "exit", "héap", "x", "=", "\t", "test.fault", "ü", "9G"];
        let mut state = 0x1234_5678_u32;
        for _ in 0..2000 {
            let mut s = String::new();
            for _ in 0..8 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                s.push_str(alphabet[(state as usize) % alphabet.len()]);
            }
            let _ = parse_all(&s, true);
        }
    }
}
