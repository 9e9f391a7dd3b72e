//! Links the kernel at its fixed load address (bare-metal builds only).
use std::{env, path::PathBuf};

fn main() {
    let script = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bin=vireo-mbtest=-T{}", script.display());
    }
}
