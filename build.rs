//! Tells the tests whether the shared labeled data (`../shared/data`, never committed) is beside
//! this checkout. Tests that read it carry
//! `#[cfg_attr(wattgate_no_shared_data, ignore = "...")]`, so on a plain clone `cargo test`
//! lists them as ignored, with the reason, and counts them in its summary. Under `CI=true` the
//! flag is never set: those tests run, and fail naming the missing file, so CI cannot pass by
//! skipping them.
//!
//! No `rerun-if-changed` on the data directory: a path that does not exist would rerun this
//! script, and rebuild the crate, on every build. Cargo's default (rerun when a file of the
//! package changes) applies instead; after adding `../shared` to an existing build, `touch
//! build.rs` to pick it up.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(wattgate_no_shared_data)");
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default();
    let data = std::path::Path::new(&manifest).join("../shared/data/routing");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !data.is_dir() && !ci {
        println!("cargo::rustc-cfg=wattgate_no_shared_data");
        println!(
            "cargo::warning=../shared/data is not beside this checkout: the tests that read it are ignored (listed as such by cargo test)"
        );
    }
}
