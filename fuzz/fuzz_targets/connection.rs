//! Arbitrary bytes, cut at arbitrary points, through one HTTP connection of a worker.
//! A case is `input`, optionally followed by `\0#cuts\0` and little-endian u16 cut
//! positions (see `forkloop::server::fuzz::decode`); the checks are
//! `forkloop::server::fuzz::check`. The seeds in `corpus/connection` also run, split
//! every way, in `tests/fuzz_corpus.rs` on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (input, cuts) = forkloop::server::fuzz::decode(data);
    if let Err(broken) = forkloop::server::fuzz::check(input, &cuts) {
        panic!("{broken}");
    }
});
