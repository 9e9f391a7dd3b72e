//! THROWAWAY boot-time microbenchmark of ways to zero memory (command-line word
//! `zerobench=MIB`). Each method zeroes a fresh MIB-sized region (first touch) and then the
//! same region again (second touch); TSC cycles per MiB are printed for both.

use crate::{mm, report};

type Method = unsafe fn(*mut u8, usize);

unsafe fn write_bytes(p: *mut u8, n: usize) {
    unsafe { core::ptr::write_bytes(p, 0, n) }
}

unsafe fn rep_stosq(p: *mut u8, n: usize) {
    unsafe {
        core::arch::asm!("rep stosq", inout("rdi") p => _, inout("rcx") n / 8 => _, in("rax") 0u64, options(nostack))
    }
}

unsafe fn rep_stosb(p: *mut u8, n: usize) {
    unsafe { core::arch::asm!("rep stosb", inout("rdi") p => _, inout("rcx") n => _, in("al") 0u8, options(nostack)) }
}

unsafe fn mov64x8(p: *mut u8, n: usize) {
    unsafe {
        core::arch::asm!(
            "2:",
            "mov qword ptr [{p}], {z}",
            "mov qword ptr [{p} + 8], {z}",
            "mov qword ptr [{p} + 16], {z}",
            "mov qword ptr [{p} + 24], {z}",
            "mov qword ptr [{p} + 32], {z}",
            "mov qword ptr [{p} + 40], {z}",
            "mov qword ptr [{p} + 48], {z}",
            "mov qword ptr [{p} + 56], {z}",
            "add {p}, 64",
            "cmp {p}, {e}",
            "jb 2b",
            p = inout(reg) p => _, e = in(reg) p.add(n), z = in(reg) 0u64, options(nostack)
        )
    }
}

unsafe fn movnti8(p: *mut u8, n: usize) {
    unsafe {
        core::arch::asm!(
            "2:",
            "movnti qword ptr [{p}], {z}",
            "movnti qword ptr [{p} + 8], {z}",
            "movnti qword ptr [{p} + 16], {z}",
            "movnti qword ptr [{p} + 24], {z}",
            "movnti qword ptr [{p} + 32], {z}",
            "movnti qword ptr [{p} + 40], {z}",
            "movnti qword ptr [{p} + 48], {z}",
            "movnti qword ptr [{p} + 56], {z}",
            "add {p}, 64",
            "cmp {p}, {e}",
            "jb 2b",
            "sfence",
            p = inout(reg) p => _, e = in(reg) p.add(n), z = in(reg) 0u64, options(nostack)
        )
    }
}

unsafe fn movdqa4(p: *mut u8, n: usize) {
    let mut save = [0u8; 16];
    unsafe {
        core::arch::asm!(
            "movdqu xmmword ptr [{s}], xmm0",
            "pxor xmm0, xmm0",
            "2:",
            "movdqa xmmword ptr [{p}], xmm0",
            "movdqa xmmword ptr [{p} + 16], xmm0",
            "movdqa xmmword ptr [{p} + 32], xmm0",
            "movdqa xmmword ptr [{p} + 48], xmm0",
            "add {p}, 64",
            "cmp {p}, {e}",
            "jb 2b",
            "movdqu xmm0, xmmword ptr [{s}]",
            p = inout(reg) p => _, e = in(reg) p.add(n), s = in(reg) save.as_mut_ptr(), options(nostack)
        )
    }
}

unsafe fn movntdq4(p: *mut u8, n: usize) {
    let mut save = [0u8; 16];
    unsafe {
        core::arch::asm!(
            "movdqu xmmword ptr [{s}], xmm0",
            "pxor xmm0, xmm0",
            "2:",
            "movntdq xmmword ptr [{p}], xmm0",
            "movntdq xmmword ptr [{p} + 16], xmm0",
            "movntdq xmmword ptr [{p} + 32], xmm0",
            "movntdq xmmword ptr [{p} + 48], xmm0",
            "add {p}, 64",
            "cmp {p}, {e}",
            "jb 2b",
            "sfence",
            "movdqu xmm0, xmmword ptr [{s}]",
            p = inout(reg) p => _, e = in(reg) p.add(n), s = in(reg) save.as_mut_ptr(), options(nostack)
        )
    }
}

/// One 8-byte store per 4 KiB page: the per-page part of the cost.
unsafe fn touch(p: *mut u8, n: usize) {
    let mut off = 0;
    while off < n {
        unsafe { core::ptr::write_volatile(p.add(off) as *mut u64, 0) };
        off += 4096;
    }
}

/// rep stosq one 4 KiB page at a time, pages in reverse order.
unsafe fn stosq_pages_rev(p: *mut u8, n: usize) {
    let mut off = n;
    while off > 0 {
        off -= 4096;
        unsafe { rep_stosq(p.add(off), 4096) };
    }
}

const METHODS: [(&str, Method); 9] = [
    ("write_bytes", write_bytes),
    ("rep_stosq", rep_stosq),
    ("rep_stosb", rep_stosb),
    ("mov64x8", mov64x8),
    ("movnti", movnti8),
    ("movdqa", movdqa4),
    ("movntdq", movntdq4),
    ("touch_4k", touch),
    ("stosq_pages_rev", stosq_pages_rev),
];

pub fn run(cmdline: &str) {
    let Some(mib) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("zerobench="))
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return;
    };
    IN_VM.store(true, core::sync::atomic::Ordering::Relaxed);
    if mib == 0 {
        return;
    }
    let bytes = mib << 20;
    let mut regions = [0u64; METHODS.len()];
    for r in regions.iter_mut() {
        *r = match mm::frames().alloc(bytes as u64, 2 << 20) {
            Ok(a) => a,
            Err(e) => {
                report!("zerobench alloc failed: {e}");
                return;
            }
        };
    }
    let tsc = crate::arch::tsc::rdtsc;
    for round in 0..3 {
        for (i, (name, f)) in METHODS.iter().enumerate() {
            let p = regions[i] as *mut u8;
            report!("zerobench begin round={round} method={name}");
            let t0 = tsc();
            unsafe { f(p, bytes) };
            let t1 = tsc();
            unsafe { f(p, bytes) };
            let t2 = tsc();
            report!(
                "zerobench end round={round} method={name} mib={mib} first_cyc_per_mib={} again_cyc_per_mib={}",
                (t1 - t0) / mib as u64,
                (t2 - t1) / mib as u64
            );
        }
        // Round 1 onwards: the regions are all touched; shift so each method gets another
        // method's region (no effect expected).
        regions.rotate_left(1);
    }
    for r in regions {
        let _ = mm::frames().free(r, bytes as u64);
    }
}

pub static IN_VM: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Extra passes over a chunk just zeroed at a first touch (only with `zerobench=`).
pub fn chunk_extra(host: u64, c: usize, first: u64) {
    if !IN_VM.load(core::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let tsc = crate::arch::tsc::rdtsc;
    let p = host as *mut u8;
    let n = 2 << 20;
    let t0 = tsc();
    unsafe { write_bytes(p, n) };
    let t1 = tsc();
    unsafe { mov64x8(p, n) };
    let t2 = tsc();
    unsafe { touch(p, n) };
    let t3 = tsc();
    unsafe { movntdq4(p, n) };
    let t4 = tsc();
    let rf: u64;
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) rf) };
    report!(
        "zerochunk c={c} first={first} again={} mov64={} touch={} movntdq={} if={}",
        t1 - t0,
        t2 - t1,
        t3 - t2,
        t4 - t3,
        (rf >> 9) & 1
    );
}
