//! The tokenizers against transformers: every fixture tokenizer, in both
//! layouts, on a list of prompts; expected ids from
//! `tools/gen_tokenizer_ids.py` (`tests/fixtures/generated/tokenizer_ids.json`).

use std::path::{Path, PathBuf};

use easel_diffusion::tokenizer::{ClipTokenizer, T5Tokenizer, TokenizedPrompt};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The folder a case loads from: the fixture folder itself, or a temporary
/// folder assembled from the listed files.
fn case_dir(case: &Value, tmp: &mut Vec<tempfile::TempDir>) -> PathBuf {
    match &case["files"] {
        Value::Object(files) => {
            let dir = tempfile::tempdir().unwrap();
            for (name, src) in files {
                std::fs::copy(
                    fixtures().join(src.as_str().unwrap()),
                    dir.path().join(name),
                )
                .unwrap();
            }
            let path = dir.path().to_path_buf();
            tmp.push(dir);
            path
        }
        _ => fixtures().join(case["dir"].as_str().unwrap()),
    }
}

#[test]
fn ids_match_transformers() {
    let path = fixtures().join("generated/tokenizer_ids.json");
    let data: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let prompts: Vec<&str> = data["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let cases = data["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 20,
        "expected every fixture tokenizer, got {}",
        cases.len()
    );

    let mut tmp = Vec::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases {
        let dir = case_dir(case, &mut tmp);
        let name = format!(
            "{} [{}] max_length {}",
            case["dir"].as_str().unwrap(),
            case["layout"].as_str().unwrap(),
            case["max_length"]
        );
        let max_length = case["max_length"].as_u64().unwrap() as usize;
        let pad_id = case["pad_id"].as_u64().unwrap() as u32;
        let encode: Box<dyn Fn(&str) -> TokenizedPrompt> = match case["kind"].as_str().unwrap() {
            "clip" => {
                let tok = ClipTokenizer::from_dir(&dir)
                    .unwrap_or_else(|e| panic!("{name}: loading: {e}"));
                assert_eq!(tok.max_length(), max_length, "{name}");
                assert_eq!(tok.pad_id(), pad_id, "{name}: pad id");
                assert_eq!((tok.bos_id(), tok.eos_id()), (49406, 49407), "{name}");
                Box::new(move |p| tok.encode_detailed(p).unwrap())
            }
            "t5" => {
                let tok =
                    T5Tokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: loading: {e}"));
                assert_eq!(tok.pad_id(), pad_id, "{name}: pad id");
                assert_eq!(tok.eos_id(), 1, "{name}");
                Box::new(move |p| tok.encode_detailed(p, max_length).unwrap())
            }
            other => panic!("unknown kind {other}"),
        };
        for (prompt, expected) in prompts.iter().zip(case["results"].as_array().unwrap()) {
            let got = encode(prompt);
            checked += 1;
            let ids: Vec<u32> = expected["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let untruncated = expected["untruncated_len"].as_u64().unwrap() as usize;
            let removed = expected["truncated_text"].as_str();
            if got.ids != ids {
                failures.push(format!(
                    "{name}: {prompt:?}\n  expected {ids:?}\n  got      {:?}",
                    got.ids
                ));
                continue;
            }
            if got.untruncated_len != untruncated
                || got.truncated() != (untruncated > max_length)
                || got.len != untruncated.min(max_length)
            {
                failures.push(format!(
                    "{name}: {prompt:?}: untruncated length {} (len {}), expected {untruncated}",
                    got.untruncated_len, got.len
                ));
            }
            if got.truncated_text.as_deref() != removed {
                failures.push(format!(
                    "{name}: {prompt:?}: truncated text {:?}, expected {removed:?}",
                    got.truncated_text
                ));
            }
        }
    }
    eprintln!("checked {checked} encodings of {} cases", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {checked} encodings differ from transformers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_photo_of_a_cat() {
    let tok = ClipTokenizer::from_dir(fixtures().join("models/tiny-sd15/tokenizer")).unwrap();
    let out = tok.encode_detailed("a photo of a cat").unwrap();
    assert_eq!(&out.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(out.ids[7..].iter().all(|&id| id == 49407));
    assert_eq!(out.ids.len(), 77);
    assert_eq!(out.len, 7);
    assert!(!out.truncated());
    assert_eq!(out.attention_mask().iter().sum::<u32>(), 7);

    // SD 2.x pads with `!` (id 0).
    let tok = ClipTokenizer::from_dir(fixtures().join("models/tiny-sd2-v/tokenizer")).unwrap();
    let ids = tok.encode("a photo of a cat").unwrap();
    assert_eq!(&ids[..8], &[49406, 320, 1125, 539, 320, 2368, 49407, 0]);
    assert_eq!(tok.pad_token(), "!");
}

#[test]
fn truncation_keeps_eos() {
    let tok = ClipTokenizer::from_dir(fixtures().join("models/tiny-sd15/tokenizer")).unwrap();
    let prompt = "a photo of a cat, ".repeat(20);
    let out = tok.encode_detailed(&prompt).unwrap();
    assert_eq!(out.ids.len(), 77);
    assert_eq!(out.ids[0], 49406);
    assert_eq!(out.ids[76], 49407);
    assert!(out.truncated());
    assert!(out.untruncated_len > 77);
    assert!(out
        .truncated_text
        .as_deref()
        .unwrap()
        .contains("photo of a cat"));

    let t5 = T5Tokenizer::from_dir(fixtures().join("generated/t5-spiece")).unwrap();
    let ids = t5.encode(&prompt, 16).unwrap();
    assert_eq!(ids.len(), 16);
    assert_eq!(ids[15], 1);
    assert!(
        t5.encode("x", 1).is_err(),
        "no room for the prompt beside </s>"
    );
}

#[test]
fn bad_folders_are_errors() {
    let empty = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(empty.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no tokenizer.json"), "{err}");
    let err = T5Tokenizer::from_dir(empty.path()).unwrap_err().to_string();
    assert!(err.contains("no tokenizer.json"), "{err}");

    // A CLIP folder is not a T5 tokenizer, and the other way round.
    let err = T5Tokenizer::from_dir(fixtures().join("models/tiny-sd2-v/tokenizer"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("Unigram"), "{err}");
    let err = ClipTokenizer::from_dir(fixtures().join("generated/t5-spiece"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("BPE"), "{err}");

    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("tokenizer.json"), "{not json").unwrap();
    assert!(ClipTokenizer::from_dir(broken.path()).is_err());
    std::fs::write(broken.path().join("tokenizer_config.json"), "[1, 2]").unwrap();
    assert!(ClipTokenizer::from_dir(broken.path()).is_err());
}
