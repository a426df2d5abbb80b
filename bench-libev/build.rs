//! Compiles the libev shim (src/shim.c) and links libev when its header is there, and
//! sets `has_libev`; otherwise warns loudly and builds the crate without it, so that a
//! machine without libev-dev still builds and tests the workspace.

use std::env;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_libev)");
    println!("cargo::rerun-if-changed=src/shim.c");
    println!("cargo::rerun-if-env-changed=FORKLOOP_NO_LIBEV");
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" {
        return; // the benches are Linux-only (raw epoll), and so is the shim
    }
    if env::var_os("FORKLOOP_NO_LIBEV").is_some() {
        println!("cargo::warning=FORKLOOP_NO_LIBEV is set: the libev bench contenders are skipped");
        return;
    }
    // try_compile: a missing ev.h is an Err here, not a failed build.
    match cc::Build::new()
        .file("src/shim.c")
        .opt_level(2)
        .warnings(true)
        .cargo_warnings(false)
        .try_compile("forkloop_libev_shim")
    {
        Ok(()) => {
            println!("cargo::rustc-link-lib=ev");
            println!("cargo::rustc-cfg=has_libev");
        }
        Err(e) => println!(
            "cargo::warning=libev not found ({e}): the libev bench contenders are skipped \
             (Debian: apt-get install libev-dev)"
        ),
    }
}
