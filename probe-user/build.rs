//! Builds the kernel programs (`probe-ebpf`, nightly, bpfel-unknown-none) and puts the object
//! where `attach.rs` embeds it. `cargo xtask setup` installs the toolchain pieces this needs.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let ebpf_dir = root.join("probe-ebpf");
    let common_dir = root.join("probe-common");
    for path in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join(".cargo/config.toml"),
        common_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = root.join("target").join("probe-ebpf");

    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--release", "--quiet"])
        .current_dir(&ebpf_dir);
    // The outer build's settings (host rustflags, clippy's wrapper, toolchain pin) must not
    // leak into the BPF build.
    let leaks = |key: &str| {
        key.starts_with("CARGO_")
            || key.starts_with("RUSTC")
            || matches!(key, "RUSTFLAGS" | "RUSTDOCFLAGS" | "RUSTUP_TOOLCHAIN")
    };
    for (key, _) in std::env::vars() {
        if leaks(&key) && key != "CARGO_HOME" {
            cargo.env_remove(&key);
        }
    }
    cargo.env("CARGO_TARGET_DIR", &target_dir);
    let status = cargo.status().unwrap_or_else(|e| {
        panic!("could not run `rustup run nightly cargo` to build probe-ebpf ({e}); run `cargo xtask setup`")
    });
    if !status.success() {
        panic!("building probe-ebpf failed; if bpf-linker or nightly rust-src is missing, run `cargo xtask setup`");
    }
    let object = target_dir.join("bpfel-unknown-none/release/probe-ebpf");
    std::fs::copy(&object, out_dir.join("probe-ebpf"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
}
