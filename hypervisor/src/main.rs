//! The multiboot2 entry shim. All logic lives in the `vireo` library.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod bare_metal {
    core::arch::global_asm!(include_str!("../../boot/entry.S"), options(att_syntax));

    /// Called by boot/entry.S in 64-bit mode.
    #[no_mangle]
    extern "C" fn vireo_entry(magic: u32, mbi: u32) -> ! {
        vireo::start::kernel_main(magic, mbi)
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        vireo::console::serial::force_unlock();
        vireo::report!("panic {}", info);
        vireo::platform::exit::fail("panic in Vireo")
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("vireo is a bare-metal multiboot2 kernel: build it with --target x86_64-unknown-none");
    std::process::exit(1);
}
