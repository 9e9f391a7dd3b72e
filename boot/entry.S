/*
 * Vireo's first instructions: multiboot2 header, 32-bit entry, switch to long mode.
 *
 * GRUB enters here in 32-bit protected mode, paging off, EAX = 0x36d76289 and
 * EBX = physical address of the multiboot2 information (Multiboot2 spec §3.3, "I386
 * machine state"); on UEFI GRUB exits boot services and enters the same way.
 * We build a temporary identity map of the first 4 GiB with 2 MiB pages, enable PAE,
 * EFER.LME and paging (SDM Vol. 3A §10.8.5 "Initializing IA-32e Mode"; APM Vol. 2 §14.6),
 * load a 64-bit GDT and far-jump into 64-bit code, which calls vireo_entry(magic, mbi).
 * Rust replaces these tables with its own once it knows the memory map.
 */
    .set MB2_MAGIC,        0xE85250D6
    .set MB2_ARCH_I386,    0
    .set MB2_HEADER_LEN,   mb2_header_end - mb2_header_start

    .set CR0_PE,           1 << 0
    .set CR0_PG,           1 << 31
    .set CR4_PAE,          1 << 5
    .set MSR_EFER,         0xC0000080
    .set EFER_LME,         1 << 8
    .set PTE_PRESENT_RW,   0x3
    .set PTE_HUGE,         0x80
    .set COM1,             0x3F8
    .set BOOT_STACK_SIZE,  64 * 1024

    .section .multiboot2_header, "a"
    .balign 8
mb2_header_start:
    .long MB2_MAGIC
    .long MB2_ARCH_I386
    .long MB2_HEADER_LEN
    .long 0x100000000 - (MB2_MAGIC + MB2_ARCH_I386 + MB2_HEADER_LEN)
    /* End tag: type 0, flags 0, size 8. */
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .section .text.boot, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    movl %eax, boot_magic
    movl %ebx, boot_mbi

    /* Zero .bss (page tables and stacks live there). */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb

    movl $boot_stack_top, %esp

    /* Long mode needs CPUID leaf 0x80000001 EDX[29] (LM). */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb no_long_mode
    movl $0x80000001, %eax
    cpuid
    btl $29, %edx
    jnc no_long_mode

    /* PML4[0] -> PDPT; PDPT[0..3] -> the four page directories. */
    movl $boot_pdpt, %eax
    orl $PTE_PRESENT_RW, %eax
    movl %eax, boot_pml4
    movl $boot_pd, %eax
    orl $PTE_PRESENT_RW, %eax
    xorl %ecx, %ecx
1:  movl %eax, boot_pdpt(,%ecx,8)
    addl $4096, %eax
    incl %ecx
    cmpl $4, %ecx
    jb 1b

    /* 2048 PD entries of 2 MiB each: 0..4 GiB identity. */
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $(PTE_PRESENT_RW | PTE_HUGE), %eax
    movl %eax, boot_pd(,%ecx,8)
    movl $0, boot_pd+4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b

    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode_entry

no_long_mode:
    movl $msg_no_lm, %esi
3:  lodsb
    testb %al, %al
    jz 5f
    movl %eax, %ebx
4:  movw $(COM1 + 5), %dx      /* wait for THR empty (LSR bit 5) */
    inb %dx, %al
    testb $0x20, %al
    jz 4b
    movl %ebx, %eax
    movw $COM1, %dx
    outb %al, %dx
    jmp 3b
5:  cli
    hlt
    jmp 5b

    .code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movabsq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    /* Upper halves of GPRs are undefined after the mode switch: 32-bit loads zero-extend. */
    movl boot_magic(%rip), %edi
    movl boot_mbi(%rip), %esi
    call vireo_entry
6:  cli
    hlt
    jmp 6b

    .section .rodata
    .balign 8
boot_gdt:
    .quad 0                       /* null */
    .quad 0x00AF9A000000FFFF      /* 0x08: 64-bit code, DPL0 (L=1, D=0) */
    .quad 0x00CF92000000FFFF      /* 0x10: data, DPL0 */
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt
msg_no_lm:
    .asciz "vireo: fatal: this CPU has no 64-bit long mode\r\n"

    .section .data
    .balign 4
    .global boot_magic, boot_mbi
boot_magic: .long 0
boot_mbi:   .long 0

    .section .bss
    .balign 4096
boot_pml4:  .skip 4096
boot_pdpt:  .skip 4096
boot_pd:    .skip 4 * 4096
    .global boot_stack_guard, boot_stack_bottom, boot_stack_top
boot_stack_guard:  .skip 4096     /* unmapped by Rust's page tables: overflow faults */
boot_stack_bottom: .skip BOOT_STACK_SIZE
boot_stack_top:
