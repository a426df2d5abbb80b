//! Defines `has_epoll` / `has_kqueue`: the backend's feature is on *and* the target OS
//! has the syscall; and `has_accept4`: the target OS has `accept4(2)`. Code and tests
//! use these instead of repeating the OS lists.

use std::env;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_epoll)");
    println!("cargo::rustc-check-cfg=cfg(has_kqueue)");
    println!("cargo::rustc-check-cfg=cfg(has_accept4)");
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let feature = |name: &str| env::var_os(format!("CARGO_FEATURE_{name}")).is_some();
    if feature("EPOLL") && matches!(os.as_str(), "linux" | "android") {
        println!("cargo::rustc-cfg=has_epoll");
    }
    let bsd = ["macos", "ios", "freebsd", "netbsd", "openbsd", "dragonfly"];
    if feature("KQUEUE") && bsd.contains(&os.as_str()) {
        println!("cargo::rustc-cfg=has_kqueue");
    }
    let accept4 = [
        "linux",
        "android",
        "freebsd",
        "netbsd",
        "openbsd",
        "dragonfly",
    ];
    if accept4.contains(&os.as_str()) {
        println!("cargo::rustc-cfg=has_accept4");
    }
}
