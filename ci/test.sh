#!/usr/bin/env bash
# The project's test command (see README): everything CI checks, in order.
# Installs what it needs on a fresh machine (rustup components and targets); a check
# that cannot run here says SKIPPED loudly instead of failing or passing silently.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }
skipped() { printf '\n*** SKIPPED: %s ***\n\n' "$*"; }

step "toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# cli/tests/systemd.rs hands sockets over with systemd's own systemd-socket-activate
# where it can (Debian's systemd package); without it those two tests say SKIPPED, and
# socket activation is tested through a shell only.
step "systemd-socket-activate, for the socket activation tests"
if command -v systemd-socket-activate >/dev/null 2>&1 || [ -x /usr/bin/systemd-socket-activate ]; then
  echo "found"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] &&
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; then
  echo "installed Debian's systemd package"
else
  skipped "systemd-socket-activate is missing and apt-get could not install systemd; cli/tests/systemd.rs skips its two tests"
fi

# The benches run libev beside forkloop (bench-libev/: a C shim over Debian's
# libev-dev). Without it everything still builds and passes, and the benches skip the
# libev rows; here the shim's own test (in the all-features step) is what is lost.
step "libev-dev, for the benches' libev rows (bench-libev/)"
if [ -f /usr/include/ev.h ]; then
  echo "found"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] &&
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libev-dev >/dev/null; then
  echo "installed Debian's libev-dev package"
else
  skipped "libev-dev is missing and apt-get could not install it; bench-libev builds without its shim and the benches skip their libev rows"
fi

step "cargo fmt --check"
cargo fmt --all --check

step "clippy, all targets, all features"
cargo clippy --workspace --all-targets --all-features -- -D warnings

# -p forkloop: at the root, `cargo test` also builds the CLI package, which turns on
# the native backend; the library's own defaults are tested alone here. The server is
# opt-in, so it is added here to run its tests on the portable backends (the
# all-features step runs them again on epoll).
# `cargo test` runs the doctests too: every major public item has a runnable example.
step "tests and doctests: the library's default features (poll, select) plus server"
cargo test -p forkloop --features server

for feature in poll select epoll mio polling; do
  step "tests: --no-default-features --features $feature"
  cargo test -p forkloop --no-default-features --features "$feature"
done
# kqueue cannot run on Linux, so alone it would leave no usable backend here; its rows
# still show (ignored, with the reason) when it is compiled in beside the defaults.
step "tests: --features kqueue (on top of the defaults)"
cargo test -p forkloop --features kqueue

step "tests: all features"
cargo test --workspace --all-features

step "tests under cargo nextest (each test in its own process)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features
else
  skipped "cargo-nextest is not installed"
fi

# The RFC 9112/9110 conformance suite of our own (cli/tests/conformance.rs) ran with
# the tests above; this is a third-party tool's verdict on the same binary.
step "HTTP/1.1 conformance: httplint against forkloop serve"
cargo build -p forkloop-cli
ci/http-conformance.sh target/debug/forkloop

for target in x86_64-unknown-freebsd x86_64-apple-darwin; do
  step "kqueue cross-check: clippy for $target"
  if rustup target list --installed | grep -qx "$target" || rustup target add "$target"; then
    cargo clippy --workspace --target "$target" --all-features --lib --tests --examples -- -D warnings
  else
    skipped "rustup could not install $target; kqueue is not type-checked for it"
  fi
done

# The fuzzing itself needs nightly (cd fuzz && cargo +nightly fuzz run connection); its
# corpus runs on stable in tests/fuzz_corpus.rs. Here the target is only type-checked.
step "fuzz target: cargo check"
if command -v c++ >/dev/null 2>&1; then
  cargo fmt --manifest-path fuzz/Cargo.toml --check
  CARGO_TARGET_DIR=target cargo check --manifest-path fuzz/Cargo.toml
else
  skipped "no C++ compiler for libfuzzer-sys; the fuzz target is not type-checked"
fi

step "cargo doc, warnings denied"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps

# Each crate as crates.io would get it: cargo packs it and builds it from its .crate
# (resolving the path dependencies among the workspace's members), so a file missing
# from a package's `include` fails here; --all-features so that code behind a feature
# (the server, the mio and polling glue) is built from the .crate too. A clean clone
# needs no --allow-dirty: the steps above write only under target/. The warning that
# the fuzz_corpus test is ignored is expected (Cargo.toml: include).
step "cargo package: every crate builds from its .crate"
# cargo extracts the packed workspace crates into ~/.cargo/registry/src/-<hash>/ (the
# hash is of target/package's path) and never extracts a name-version again: on a
# machine that packed this workspace before, from the same path, the verification would
# build the old sources. Only our own crates' extractions go.
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/forkloop-*
cargo package --workspace --all-features

printf '\nci/test.sh: all checks passed\n'
