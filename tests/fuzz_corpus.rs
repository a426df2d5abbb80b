//! The deterministic part of the connection fuzzing (issue 5): every seed of the
//! `cargo fuzz` corpus (`fuzz/corpus/connection`), sent whole, cut at every single
//! position and byte by byte; then generated request streams and arbitrary bytes from
//! a fixed proptest seed. The checks themselves are `forkloop::server::fuzz::check`.
#![cfg(feature = "server")]

use forkloop::server::fuzz;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

#[test]
fn every_corpus_seed_holds_however_it_is_split() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/connection");
    let mut seeds: Vec<_> = std::fs::read_dir(dir)
        .expect("the fuzz corpus")
        .map(|e| e.unwrap().path())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 20, "the corpus lost its seeds");
    let mut runs = 0;
    for path in &seeds {
        let data = std::fs::read(path).unwrap();
        let (input, cuts) = fuzz::decode(&data);
        let name = path.file_name().unwrap().to_string_lossy();
        let every_byte: Vec<usize> = (0..input.len()).collect();
        let splits = std::iter::once(cuts)
            .chain(std::iter::once(every_byte))
            .chain((0..input.len()).map(|at| vec![at]));
        for cuts in splits {
            if let Err(e) = fuzz::check(input, &cuts) {
                panic!("seed {name}, cut at {cuts:?}: {e}");
            }
            runs += 1;
        }
    }
    println!(
        "figure: {} corpus seeds, {runs} splits, every check held",
        seeds.len()
    );
}

/// Pieces of requests, valid and not, that a generated stream strings together.
fn token() -> impl Strategy<Value = Vec<u8>> {
    let fixed = prop::sample::select(vec![
        "GET / HTTP/1.1\r\n",
        "GET /later HTTP/1.1\r\n",
        "HEAD / HTTP/1.1\r\n",
        "POST /later HTTP/1.1\r\n",
        "POST / HTTP/1.0\r\n",
        "POST /stream HTTP/1.1\r\n",
        "PUT /stream HTTP/1.0\r\n",
        "Host: x\r\n",
        "Content-Length: 5\r\n",
        "Content-Length: 0\r\n",
        "Content-Length: 99999\r\n",
        "Transfer-Encoding: chunked\r\n",
        "Expect: 100-continue\r\n",
        "Connection: close\r\n",
        "Connection: keep-alive\r\n",
        "\r\n",
        "hello",
        "5\r\nhello\r\n",
        "0\r\n\r\n",
        "ff\r\n",
    ]);
    prop_oneof![
        4 => fixed.prop_map(|s| s.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..16),
    ]
}

fn config() -> Config {
    Config {
        cases: 512,
        rng_seed: RngSeed::Fixed(0x666f_726b_6c6f_6f70),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn generated_request_streams_hold_however_split(
        tokens in prop::collection::vec(token(), 0..40),
        cuts in prop::collection::vec(any::<usize>(), 0..10),
    ) {
        let input = tokens.concat();
        fuzz::check(&input, &cuts).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn arbitrary_bytes_hold_however_split(
        input in prop::collection::vec(any::<u8>(), 0..2000),
        cuts in prop::collection::vec(any::<usize>(), 0..10),
    ) {
        fuzz::check(&input, &cuts).map_err(TestCaseError::fail)?;
    }
}
