//! A multiboot (version 1) test kernel written as kernels for `qemu -kernel` are: it runs
//! the same under plain QEMU (`-kernel`, `-append`, `-device isa-debug-exit,iobase=0xf4`)
//! and as a Vireo VM, and says the same there. 32-bit entry code (the multiboot machine
//! state) saves EAX/EBX, identity-maps the first GiB and the one below 4 GiB and enters 64-bit
//! mode; the checks:
//! - `boot_magic`: EAX = 0x2BADB002; `boot_info`: EBX's information has memory sizes, a
//!   memory map with RAM at 1 MiB, a command line and the boot loader's name;
//! - `fw_cfg_signature`, `fw_cfg_id`, `fw_cfg_cpus`, `fw_cfg_ram_size` (the multiboot
//!   memory sizes, to within the 128 KiB QEMU keeps for its ACPI tables), `fw_cfg_file_dir`, `fw_cfg_cmdline` (equal to the multiboot
//!   command line after its first word, the kernel's path or VM name, where fw_cfg has one);
//! - `string_io_ins`: `rep insb` of the fw_cfg signature; `string_io_outs`: a line sent to
//!   COM1 with `rep outsb` (its text appears on the console);
//! - `testdev_ioport`, `testdev_width_echo`, `testdev_iomem`, `testdev_irq`: pc-testdev's
//!   register through ports 0xE0 and 0xE8, its MMIO window, and IRQ 3 raised through port
//!   0x2003 and taken through the 8259 (vector 0x23).
//!
//! Every line goes to COM1 as `mbtest: ...`; at the end `mbtest: N passed, M failed` and the
//! kernel writes 0 (all passed: status 1) or 1 (status 3) to isa-debug-exit at port 0xF4.
//! `mode=fail` on the command line reports a failing check on purpose (status 3);
//! `mode=virtio` adds `virtio_*` checks: hostile descriptor chains against the VM's
//! virtio-console, each of which must put it into "needs reset", then a good request after a
//! reset (`kernel/virtio.rs`).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod kernel {
    use core::fmt::Write;

    mod virtio;

    core::arch::global_asm!(
        r#"
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003
        .section .multiboot, "a"
        .balign 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .section .text.entry, "ax"
        .code32
        .global _start
    _start:
        cli
        cld
        movl %eax, boot_eax
        movl %ebx, boot_ebx
        movl $stack_top, %esp
        /* PML4[0] -> PDPT; PDPT[0] -> PD (the first GiB), PDPT[3] -> PD_HI (the last GiB
           below 4 GiB: pc-testdev's MMIO window); 2 MiB identity pages. */
        movl $pdpt, %eax
        orl $3, %eax
        movl %eax, pml4
        movl $pd, %eax
        orl $3, %eax
        movl %eax, pdpt
        movl $pd_hi, %eax
        orl $3, %eax
        movl %eax, pdpt + 24
        xorl %ecx, %ecx
    1:  movl %ecx, %eax
        shll $21, %eax
        orl $0x83, %eax
        movl %eax, pd(,%ecx,8)
        orl $0xC0000000, %eax
        movl %eax, pd_hi(,%ecx,8)
        incl %ecx
        cmpl $512, %ecx
        jne 1b
        movl $pml4, %eax
        movl %eax, %cr3
        movl %cr4, %eax
        orl $(1 << 5), %eax
        movl %eax, %cr4
        movl $0xC0000080, %ecx
        rdmsr
        orl $(1 << 8), %eax
        wrmsr
        movl %cr0, %eax
        orl $0x80000001, %eax
        movl %eax, %cr0
        lgdt gdt64_ptr
        ljmp $0x08, $long_entry

        .code64
        /* pc-testdev IRQ 3 through the 8259 (vector 0x23): count it, lower the line, EOI. */
        .global irq3_stub
    irq3_stub:
        pushq %rax
        pushq %rdx
        lock incl irq_count
        movw $0x2003, %dx
        xorb %al, %al
        outb %al, %dx
        movb $0x20, %al
        outb %al, $0x20
        popq %rdx
        popq %rax
        iretq
    long_entry:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movq $stack_top, %rsp
        call mbtest_main
    2:  hlt
        jmp 2b

        .section .rodata
        .balign 8
    gdt64:
        .quad 0
        .quad 0x00AF9A000000FFFF
        .quad 0x00CF92000000FFFF
    gdt64_end:
    gdt64_ptr:
        .word gdt64_end - gdt64 - 1
        .long gdt64

        .section .data
        .balign 4
        .global boot_eax
    boot_eax: .long 0
        .global boot_ebx
    boot_ebx: .long 0
        .global irq_count
    irq_count: .long 0

        .section .bss
        .balign 4096
    pml4: .skip 4096
    pdpt: .skip 4096
    pd: .skip 4096
    pd_hi: .skip 4096
    idt: .skip 4096
        .balign 16
        .skip 64 * 1024
    stack_top:
        "#,
        options(att_syntax)
    );

    extern "C" {
        static boot_eax: u32;
        static boot_ebx: u32;
        static irq_count: u32;
        static mut idt: [u64; 512];
        fn irq3_stub();
    }

    const COM1: u16 = 0x3F8;
    const DEBUG_EXIT: u16 = 0xF4;
    const FW_CFG_SELECT: u16 = 0x510;
    const FW_CFG_DATA: u16 = 0x511;

    fn outb(port: u16, v: u8) {
        // SAFETY: port I/O to the emulated PC's devices (COM1, fw_cfg, debug exit); no memory effect.
        unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
    }

    fn outw(port: u16, v: u16) {
        // SAFETY: as in `outb`.
        unsafe { core::arch::asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack)) };
    }

    fn outl(port: u16, v: u32) {
        // SAFETY: as in `outb`.
        unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) };
    }

    fn inl(port: u16) -> u32 {
        let v: u32;
        // SAFETY: as in `outb`.
        unsafe { core::arch::asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack)) };
        v
    }

    fn inb(port: u16) -> u8 {
        let v: u8;
        // SAFETY: as in `outb`.
        unsafe { core::arch::asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack)) };
        v
    }

    struct Serial;

    impl Write for Serial {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            for b in s.bytes() {
                // Wait for the transmitter holding register (LSR bit 5), bounded.
                for _ in 0..100_000 {
                    if inb(COM1 + 5) & 0x20 != 0 {
                        break;
                    }
                }
                outb(COM1, b);
            }
            Ok(())
        }
    }

    /// A NUL-terminated string at a 32-bit physical address (identity-mapped), at most 255 bytes.
    fn cstr(addr: u32) -> &'static str {
        if addr == 0 || addr >= 1 << 30 {
            return "";
        }
        let p = addr as usize as *const u8;
        let mut len = 0;
        // SAFETY: the first GiB is identity-mapped RAM (or reads as all ones); bounded.
        while len < 255 && unsafe { p.add(len).read_volatile() } != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes were just read.
        core::str::from_utf8(unsafe { core::slice::from_raw_parts(p, len) }).unwrap_or("")
    }

    fn u32_at(addr: usize) -> u32 {
        // SAFETY: identity-mapped guest memory the loader filled in; unaligned reads are fine on x86.
        unsafe { (addr as *const u32).read_unaligned() }
    }

    fn u64_at(addr: usize) -> u64 {
        // SAFETY: as in `u32_at`.
        unsafe { (addr as *const u64).read_unaligned() }
    }

    fn fw_cfg(key: u16, buf: &mut [u8]) {
        outw(FW_CFG_SELECT, key);
        for b in buf.iter_mut() {
            *b = inb(FW_CFG_DATA);
        }
    }

    struct Tally {
        passed: u32,
        failed: u32,
    }

    impl Tally {
        fn check(&mut self, name: &str, ok: bool, detail: core::fmt::Arguments<'_>) {
            if ok {
                self.passed += 1;
                let _ = writeln!(Serial, "mbtest: {name} ok {detail}");
            } else {
                self.failed += 1;
                let _ = writeln!(Serial, "mbtest: {name} FAIL {detail}");
            }
        }
    }

    #[no_mangle]
    extern "C" fn mbtest_main() -> ! {
        // SAFETY: written once by the entry code before this function runs.
        let (eax, ebx) = unsafe { (core::ptr::addr_of!(boot_eax).read(), core::ptr::addr_of!(boot_ebx).read()) };
        let mut t = Tally { passed: 0, failed: 0 };
        let _ = writeln!(Serial, "mbtest: start");
        t.check("boot_magic", eax == 0x2BAD_B002, format_args!("eax={eax:#x}"));

        let mbi = ebx as usize;
        let flags = u32_at(mbi);
        let (mem_lower, mem_upper) = (u32_at(mbi + 4), u32_at(mbi + 8));
        let cmdline = if flags & (1 << 2) != 0 { cstr(u32_at(mbi + 16)) } else { "" };
        let loader = if flags & (1 << 9) != 0 { cstr(u32_at(mbi + 64)) } else { "" };
        // The memory map: an available range starting at 1 MiB.
        let mut ram_at_1m = false;
        if flags & (1 << 6) != 0 {
            let (len, addr) = (u32_at(mbi + 44) as usize, u32_at(mbi + 48) as usize);
            let mut off = 0;
            while off + 24 <= len && off < 4096 {
                let e = addr + off;
                let (size, base, kind) = (u32_at(e), u64_at(e + 4), u32_at(e + 20));
                if base == 0x10_0000 && kind == 1 {
                    ram_at_1m = true;
                }
                off += size as usize + 4;
            }
        }
        let want = 1 | (1 << 2) | (1 << 6) | (1 << 9);
        t.check(
            "boot_info",
            ebx != 0
                && flags & want == want
                && mem_lower >= 600
                && mem_upper >= 3 * 1024
                && ram_at_1m
                && !loader.is_empty(),
            format_args!("flags={flags:#x} mem_lower={mem_lower} mem_upper={mem_upper} mmap_ram_at_1m={ram_at_1m}"),
        );
        // The arguments: the command line after its first word (the kernel's path or VM name).
        let args = cmdline.split_once(' ').map_or("", |(_, a)| a.trim());
        let _ = writeln!(Serial, "mbtest: args \"{args}\"");
        let mods = if flags & (1 << 3) != 0 { u32_at(mbi + 20) } else { 0 };
        for i in 0..mods.min(8) {
            let m = u32_at(mbi + 24) as usize + i as usize * 16;
            let (start, end) = (u32_at(m), u32_at(m + 4));
            let _ = writeln!(
                Serial,
                "mbtest: module {i} size={} cmdline=\"{}\"",
                end.wrapping_sub(start),
                cstr(u32_at(m + 8))
            );
        }

        let mut sig = [0u8; 4];
        fw_cfg(0x00, &mut sig);
        t.check("fw_cfg_signature", &sig == b"QEMU", format_args!("{:?}", core::str::from_utf8(&sig).unwrap_or("?")));
        let mut id = [0u8; 4];
        fw_cfg(0x01, &mut id);
        let id = u32::from_le_bytes(id);
        t.check("fw_cfg_id", id & 1 != 0, format_args!("id={id:#x}"));
        let mut cpus = [0u8; 2];
        fw_cfg(0x05, &mut cpus);
        let cpus = u16::from_le_bytes(cpus);
        t.check("fw_cfg_cpus", (1..=255).contains(&cpus), format_args!("cpus={cpus}"));
        let mut ram = [0u8; 8];
        fw_cfg(0x03, &mut ram);
        let ram = u64::from_le_bytes(ram);
        let from_mbi = (mem_upper as u64 + 1024) * 1024;
        // QEMU keeps the top 128 KiB of RAM out of mem_upper (its ACPI tables): within 1 MiB.
        t.check(
            "fw_cfg_ram_size",
            ram >= from_mbi && ram - from_mbi < 1 << 20,
            format_args!("ram={ram} multiboot={from_mbi}"),
        );
        let mut count = [0u8; 4];
        fw_cfg(0x19, &mut count);
        let count = u32::from_be_bytes(count);
        let mut first = [0u8; 64];
        if count > 0 {
            for b in first.iter_mut() {
                *b = inb(FW_CFG_DATA);
            }
        }
        let select = u16::from_be_bytes([first[4], first[5]]);
        t.check(
            "fw_cfg_file_dir",
            count >= 1 && select >= 0x20,
            format_args!("files={count} first_select={select:#x}"),
        );
        let mut size = [0u8; 4];
        fw_cfg(0x14, &mut size);
        let size = u32::from_le_bytes(size) as usize;
        let mut buf = [0u8; 256];
        let n = size.min(buf.len());
        fw_cfg(0x15, &mut buf[..n]);
        let fw_args = core::str::from_utf8(&buf[..n]).unwrap_or("?").trim_end_matches('\0');
        t.check("fw_cfg_cmdline", size == 0 || fw_args == args, format_args!("size={size} \"{fw_args}\""));

        // String I/O: the fw_cfg signature through `rep insb`...
        let mut sig2 = [0u8; 4];
        outw(FW_CFG_SELECT, 0);
        // SAFETY: reads 4 bytes from the fw_cfg data port into `sig2`; RDI, RCX advance.
        unsafe {
            core::arch::asm!("rep insb", inout("rdi") sig2.as_mut_ptr() => _, inout("rcx") 4usize => _, in("dx") FW_CFG_DATA, options(nostack))
        };
        t.check("string_io_ins", &sig2 == b"QEMU", format_args!("{:?}", core::str::from_utf8(&sig2).unwrap_or("?")));
        // ...and a line to COM1 through `rep outsb`.
        let line = b"mbtest: string_io_outs ok rep outsb\n";
        // SAFETY: writes `line` to COM1; RSI, RCX advance.
        unsafe {
            core::arch::asm!("rep outsb", inout("rsi") line.as_ptr() => _, inout("rcx") line.len() => _, in("dx") COM1, options(nostack, readonly))
        };
        t.passed += 1;

        testdev(&mut t);

        if args.split_ascii_whitespace().any(|w| w == "mode=virtio") {
            virtio::run(&mut t, ram);
        }
        if args.split_ascii_whitespace().any(|w| w == "mode=fail") {
            t.check("forced_failure", false, format_args!("mode=fail"));
        }
        let _ = writeln!(Serial, "mbtest: {} passed, {} failed", t.passed, t.failed);
        outb(DEBUG_EXIT, if t.failed == 0 { 0 } else { 1 });
        let _ = writeln!(Serial, "mbtest: isa-debug-exit did not end the machine");
        loop {
            // SAFETY: halting with interrupts off ends this kernel's execution.
            unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
        }
    }

    /// QEMU's pc-testdev: its register through both port windows, its memory window, and an
    /// interrupt raised through its IRQ line 3 and taken through the 8259.
    fn testdev(t: &mut Tally) {
        outl(0xE0, 0x1234_5678);
        let (dword, byte) = (inl(0xE0), inb(0xE1));
        t.check(
            "testdev_ioport",
            dword == 0x1234_5678 && byte == 0x56,
            format_args!("dword={dword:#x} byte={byte:#x}"),
        );
        for (i, b) in [0xAAu8, 0xBB, 0xCC, 0xDD].iter().enumerate() {
            outb(0xE8 + i as u16, *b);
        }
        let echo = inl(0xE8);
        t.check("testdev_width_echo", echo == 0xDDCC_BBAA, format_args!("{echo:#x}"));
        let window = 0xFF00_0100usize as *mut u32;
        // SAFETY: pc-testdev's MMIO window, identity-mapped by the entry code's upper table.
        let back = unsafe {
            window.write_volatile(0xC0FF_EE00);
            window.read_volatile()
        };
        t.check("testdev_iomem", back == 0xC0FF_EE00, format_args!("{back:#x}"));
        // Read-modify-write and flag-setting instructions on device memory (a hypervisor
        // must emulate them, not only MOV): OR, CMP, ADD from memory, XCHG, TEST, SUB.
        let slot = 0xFF00_0200usize;
        let (mut eax, mut ebx): (u32, u32) = (5, 0x1234);
        let (zf_cmp, zf_test, cf_sub): (u8, u8, u8);
        // SAFETY: pc-testdev's MMIO window as above; registers only otherwise.
        unsafe {
            core::arch::asm!(
                "mov dword ptr [{w}], 0x10",
                "or dword ptr [{w}], 0x80",
                "cmp byte ptr [{w}], 0x90",
                "sete {a}",
                "add {x:e}, dword ptr [{w}]",
                "xchg dword ptr [{w}], {y:e}",
                "test dword ptr [{w}], 0x1000",
                "sete {b}",
                "sub dword ptr [{w}], 0x1235",
                "setc {c}",
                w = in(reg) slot,
                a = out(reg_byte) zf_cmp,
                b = out(reg_byte) zf_test,
                c = out(reg_byte) cf_sub,
                x = inout(reg) eax,
                y = inout(reg) ebx,
                options(nostack),
            );
        }
        // SAFETY: as above.
        let left = unsafe { (slot as *const u32).read_volatile() };
        t.check(
            "testdev_iomem_alu",
            zf_cmp == 1 && eax == 0x95 && ebx == 0x90 && zf_test == 0 && cf_sub == 1 && left == 0xFFFF_FFFF,
            format_args!("cmp_zf={zf_cmp} eax={eax:#x} ebx={ebx:#x} test_zf={zf_test} sub_cf={cf_sub} left={left:#x}"),
        );

        // The IDT: vector 0x23 -> irq3_stub (64-bit interrupt gate, selector 0x08).
        let handler = irq3_stub as *const () as usize as u64;
        let low = (handler & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((handler >> 16 & 0xFFFF) << 48);
        // SAFETY: the IDT lives in this kernel's .bss; only this code writes it, before interrupts are on.
        unsafe {
            let idt_base = core::ptr::addr_of_mut!(idt) as *mut u64;
            idt_base.add(0x23 * 2).write_volatile(low);
            idt_base.add(0x23 * 2 + 1).write_volatile(handler >> 32);
            let ptr: [u16; 5] = [
                (256 * 16 - 1) as u16,
                idt_base as u64 as u16,
                (idt_base as u64 >> 16) as u16,
                (idt_base as u64 >> 32) as u16,
                (idt_base as u64 >> 48) as u16,
            ];
            core::arch::asm!("lidt [{}]", in(reg) ptr.as_ptr(), options(nostack, readonly));
        }
        // The 8259 pair: vectors 0x20 and 0x28, everything masked but IRQ 3.
        for (port, v) in
            [(0x20, 0x11), (0xA0, 0x11), (0x21, 0x20), (0xA1, 0x28), (0x21, 4), (0xA1, 2), (0x21, 1), (0xA1, 1)]
        {
            outb(port, v);
        }
        outb(0x21, !(1u8 << 3));
        outb(0xA1, 0xFF);
        outb(0x2003, 1);
        let count = || {
            // SAFETY: a 4-byte counter the interrupt handler increments.
            unsafe { core::ptr::addr_of!(irq_count).read_volatile() }
        };
        let mut spins = 0u32;
        // SAFETY: the IDT handles the one unmasked vector; interrupts go off again after.
        unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
        while count() == 0 && spins < 50_000_000 {
            core::hint::spin_loop();
            spins += 1;
        }
        // SAFETY: interrupts off again.
        unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
        outb(0x21, 0xFF);
        let n = count();
        t.check("testdev_irq", n == 1, format_args!("interrupts={n}"));
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        let _ = writeln!(Serial, "mbtest: panic {info}");
        outb(DEBUG_EXIT, 2);
        loop {
            // SAFETY: as at the end of `mbtest_main`.
            unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
        }
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("vireo-mbtest is a guest kernel: build it with --target x86_64-unknown-none (and objcopy -O elf32-i386 for qemu -kernel)");
    std::process::exit(1);
}
