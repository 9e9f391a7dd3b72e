//! Links the bare-metal binary with Vireo's linker script; host builds (unit tests) are untouched.
use std::{env, path::PathBuf};

fn main() {
    let boot = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../boot");
    for f in ["linker.ld", "entry.S"] {
        println!("cargo:rerun-if-changed={}", boot.join(f).display());
    }
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        let script = boot.join("linker.ld").canonicalize().expect("boot/linker.ld");
        println!("cargo:rustc-link-arg-bin=vireo=-T{}", script.display());
        println!("cargo:rustc-link-arg-bin=vireo=--no-dynamic-linker");
        println!("cargo:rustc-link-arg-bin=vireo=-znoexecstack");
    }
}
