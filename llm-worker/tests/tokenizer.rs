//! Tokenizer parity with transformers 4.31's fast LLaMA tokenizer as Osprey loads it
//! (tests/fixtures/llm/tokenizer, written by tools/make_tokenizer_fixture.py).

use std::path::PathBuf;

use llm_worker::tokenizer::OspreyTokenizer;
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llm/tokenizer")
}

fn tokenizer() -> OspreyTokenizer {
    OspreyTokenizer::from_dir(&fixture_dir()).expect("load the fixture tokenizer")
}

fn read_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture_dir().join(name)).expect("read fixture");
    serde_json::from_str(&text).expect("parse fixture")
}

fn ids_of(v: &Value) -> Vec<i64> {
    v.as_array().expect("id list").iter().map(|x| x.as_i64().expect("id")).collect()
}

/// Asserts after counting, so a failure reports how many matched and the first mismatches.
fn check(what: &str, mismatches: Vec<String>, total: usize) {
    println!("{what}: {}/{total} match", total - mismatches.len());
    assert!(
        mismatches.is_empty(),
        "{what}: {} of {total} differ; first: {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );
}

#[test]
fn special_ids() {
    let tok = tokenizer();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.mask_id(), tok.pos_id()), (1, 2, 32000, 32001));
    assert_eq!(tok.inner().get_vocab_size(true), 32002);
}

#[test]
fn llamacpp_references() {
    let tok = tokenizer();
    let refs = read_json("llamacpp_refs.json");
    let refs = refs.as_array().expect("list");
    let mut bad = Vec::new();
    for r in refs {
        let text = r["text"].as_str().expect("text");
        let want: Vec<i64> = ids_of(&r["ids"]);
        let got: Vec<i64> = tok.encode(text, false).unwrap().into_iter().map(i64::from).collect();
        if got != want {
            bad.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert_eq!(refs.len(), 46);
    check("llama.cpp references", bad, refs.len());
}

#[test]
fn corpus_encode_image_token_and_decode() {
    let tok = tokenizer();
    let corpus = read_json("corpus.json");
    let entries = corpus["entries"].as_array().expect("entries");
    let (mut bad_ids, mut bad_img, mut bad_dec) = (Vec::new(), Vec::new(), Vec::new());
    let (mut n_img, mut n_dec) = (0, 0);
    for e in entries {
        let text = e["text"].as_str().expect("text");
        // Osprey runs the fast tokenizer: its ids where they differ from the slow one's.
        let want = ids_of(e.get("ids_fast").unwrap_or(&e["ids"]));
        let got: Vec<i64> = tok.encode(text, true).unwrap().into_iter().map(i64::from).collect();
        if got != want {
            bad_ids.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        if let Some(img) = e.get("image_token_ids_fast").or(e.get("image_token_ids")) {
            n_img += 1;
            let got = tok.tokenizer_image_token(text).unwrap();
            if got != ids_of(img) {
                bad_img.push(format!("{text:?}: got {got:?}, want {img}"));
            }
        }
        if let Some(dec) = e.get("decoded_fast").or(e.get("decoded")) {
            n_dec += 1;
            // The fixture decodes the slow ids.
            let ids: Vec<u32> = ids_of(&e["ids"]).into_iter().map(|i| i as u32).collect();
            let got = tok.decode(&ids, true).unwrap();
            if got != dec.as_str().expect("decoded") {
                bad_dec.push(format!("{ids:?}: got {got:?}, want {dec}"));
            }
        }
    }
    assert_eq!((entries.len(), n_img, n_dec), (3000, 60, 200));
    check("corpus ids", bad_ids, entries.len());
    check("corpus tokenizer_image_token", bad_img, n_img);
    check("corpus decode", bad_dec, n_dec);
}

#[test]
fn random_decode() {
    let tok = tokenizer();
    let corpus = read_json("corpus.json");
    let cases = corpus["random_decode"].as_array().expect("random_decode");
    let mut bad = Vec::new();
    for c in cases {
        let ids: Vec<u32> = ids_of(&c["ids"]).into_iter().map(|i| i as u32).collect();
        let want = c.get("decoded_fast").unwrap_or(&c["decoded"]).as_str().expect("decoded");
        let got = tok.decode(&ids, true).unwrap();
        if got != want {
            bad.push(format!("{ids:?}: got {got:?}, want {want:?}"));
        }
    }
    assert_eq!(cases.len(), 60);
    check("random decode", bad, cases.len());
}

#[test]
fn osprey_demo_prompt_ids() {
    // The demo's short-description prompt, with the fast tokenizer's lone "▁" before <mask>.
    let tok = tokenizer();
    let prompt = "A chat between a curious human and an artificial intelligence assistant. The assistant \
                  gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n\n\
                  This provides an overview of the picture.\nPlease give me a short description of \
                  <mask><pos>. Using a short phrase. ASSISTANT:";
    let ids = tok.tokenizer_image_token(prompt).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == -200).count(), 1);
    let at = ids.iter().position(|&i| i == 32000).unwrap();
    assert_eq!(&ids[at - 2..at + 3], &[310, 29871, 32000, 32001, 869]);
    assert_eq!(&ids[34..38], &[29871, -200, 29871, 13]);
}

#[test]
fn tokenizer_json_is_used_when_present() {
    // Serialize the rebuilt pipeline, drop it next to added_tokens.json without tokenizer.model,
    // and load that directory: same ids and decode on a slice of the corpus.
    let tok = tokenizer();
    let dir = std::env::temp_dir().join(format!("llm-worker-tokjson-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.inner().to_string(false).unwrap()).unwrap();
    std::fs::copy(fixture_dir().join("added_tokens.json"), dir.join("added_tokens.json")).unwrap();
    let from_json = OspreyTokenizer::from_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let bytes = std::fs::read(fixture_dir().join("tokenizer.model")).unwrap();
    let from_bytes = OspreyTokenizer::from_sentencepiece(&bytes).unwrap();
    let corpus = read_json("corpus.json");
    for e in corpus["entries"].as_array().unwrap().iter().take(300) {
        let text = e["text"].as_str().unwrap();
        let want = tok.encode(text, true).unwrap();
        assert_eq!(from_json.encode(text, true).unwrap(), want, "{text:?}");
        assert_eq!(from_bytes.encode(text, true).unwrap(), want, "{text:?}");
        assert_eq!(from_json.decode(&want, true).unwrap(), tok.decode(&want, true).unwrap());
    }
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let err = OspreyTokenizer::from_dir(&fixture_dir().join("no-such-dir")).unwrap_err();
    assert!(err.to_string().contains("expected tokenizer.json or tokenizer.model"), "{err}");
    let err = OspreyTokenizer::from_sentencepiece(b"\x08\x01garbage").unwrap_err();
    assert!(err.to_string().contains("not a SentencePiece model"), "{err}");
}
