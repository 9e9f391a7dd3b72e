//! scripts/scoreboard.sh --tiny: the overhead scoreboard runs end to end (a native boot and a
//! Vireo boot in QEMU TCG) and its output has the promised structure. No speed figure is
//! asserted: only that every benchmark has native, vireo and ratio lines, that every ratio is
//! a finite positive number, that the JSON parses and that the SVG chart is there.

use std::process::Command;

use vireo_tests::repo_root;

const BENCHES: [&str; 15] = [
    "null",
    "sigsegv",
    "sigfpe",
    "fork",
    "exec",
    "pipe",
    "mmap",
    "pagefault",
    "compute",
    "sysbench-threads",
    "perf-syscall",
    "perf-pipe",
    "perf-messaging",
    "stress-ng-switch",
    "dbench",
];

/// The value after `key=` in a whitespace-separated line.
fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

#[test]
fn scoreboard_tiny() {
    let out_dir = repo_root().join("target/e2e-scratch/scoreboard");
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = Command::new("scripts/scoreboard.sh")
        .arg("--tiny")
        .arg("--out")
        .arg(&out_dir)
        .current_dir(repo_root())
        .output()
        .expect("run scripts/scoreboard.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scoreboard.sh --tiny failed ({}):\n{stdout}\n{stderr}", out.status);

    for b in BENCHES {
        let line = |kind: &str| {
            stdout
                .lines()
                .find(|l| {
                    let mut w = l.split_whitespace();
                    w.next() == Some(b) && w.next() == Some(kind)
                })
                .unwrap_or_else(|| panic!("no `{b} {kind}` line:\n{stdout}"))
        };
        for side in ["native", "vireo"] {
            let l = line(side);
            let ns: f64 = value(l, "ns_per_op")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no ns_per_op number in {l:?}"));
            assert!(ns.is_finite() && ns > 0.0, "{l:?}");
        }
        let l = line("ratio");
        let ratio: f64 = l
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no ratio number in {l:?}"));
        assert!(ratio.is_finite() && ratio > 0.0, "ratio not a finite positive number: {l:?}");
        line("exits/s");
    }

    // The JSON parses and names every benchmark with a finite positive ratio, and the SVG is
    // well-formed XML with an <svg> root (python3's json and xml, which the script itself
    // needs: the tests crate has no JSON parser).
    let json = out_dir.join("scoreboard.json");
    let check = Command::new("python3")
        .arg("-c")
        .arg(
            "import json, math, sys\n\
             d = json.load(open(sys.argv[1]))\n\
             names = [b['name'] for b in d['benchmarks']]\n\
             assert names == sys.argv[2].split(','), names\n\
             for b in d['benchmarks']:\n\
             \x20   assert isinstance(b['ratio'], float) and math.isfinite(b['ratio']) and b['ratio'] > 0, b\n\
             \x20   assert b['native_n'] > 0 and b['vireo_n'] > 0, b\n\
             \x20   assert isinstance(b['exits_per_s'], dict), b\n\
             import xml.etree.ElementTree as E\n\
             assert E.parse(sys.argv[3]).getroot().tag == '{http://www.w3.org/2000/svg}svg'\n",
        )
        .arg(&json)
        .arg(BENCHES.join(","))
        .arg(out_dir.join("scoreboard.svg"))
        .output()
        .expect("run python3");
    assert!(
        check.status.success(),
        "{} does not hold what it should:\n{}",
        json.display(),
        String::from_utf8_lossy(&check.stderr)
    );

    let svg = std::fs::read_to_string(out_dir.join("scoreboard.svg")).expect("read scoreboard.svg");
    assert!(svg.contains("<svg") && svg.contains("</svg>"), "scoreboard.svg has no <svg> element");
}
