//! The model-family rule: which family a model is (and so its facts) is
//! decided once, by the loader (`easel_diffusion::loader::ModelFamily`,
//! from `model_index.json`'s `_class_name`). No code outside
//! `crates/easel-diffusion/src/loader/` compares or matches diffusers
//! pipeline class names (`"StableDiffusion...`, `"Flux...`); it asks the
//! family instead.
//!
//! This test reads the source (`src/`, `examples/`) of every crate of the workspace and
//! fails naming each `file:line` where such a literal is compared
//! (`==`, `!=`, `starts_with`, `ends_with`, `contains`, `strip_prefix`,
//! `matches!`) or used as a `match` pattern. Integration tests, which check
//! the class a model reports, are not scanned. `EASEL_FAMILY_RULE_ROOT` points
//! it at another `crates/` folder (to check that it fails on code that breaks
//! the rule).

use std::path::{Path, PathBuf};

/// The class-name prefixes of the diffusers pipelines the engine loads.
const PREFIXES: &[&str] = &["\"StableDiffusion", "\"Flux"];

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether the literal starting at byte `at` of `line` (its opening quote)
/// is compared or matched.
fn compared(line: &str, at: usize) -> bool {
    let before = line[..at].trim_end();
    let before = before.strip_suffix('&').unwrap_or(before).trim_end();
    const CALLS: &[&str] = &[
        "==",
        "!=",
        "starts_with(",
        "ends_with(",
        "contains(",
        "strip_prefix(",
        "strip_suffix(",
        "matches!(",
        "eq(",
    ];
    if CALLS.iter().any(|c| before.ends_with(c)) {
        return true;
    }
    // A match pattern: the literal is followed by `=>`, `|`, or a guard,
    // or it continues an or-pattern of an earlier line.
    let rest = &line[at + 1..];
    let Some(close) = rest.find('"') else {
        return false;
    };
    let after = rest[close + 1..].trim_start_matches(|c: char| c == ')' || c.is_whitespace());
    after.starts_with("=>")
        || (after.starts_with('|') && !after.starts_with("||"))
        || after.starts_with("if ")
        || before.ends_with('|') && !before.ends_with("||")
        || before.ends_with("@ (")
}

/// The `file:line: text` of every offending line under `crates`.
fn offenders(crates: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(crates) else {
        panic!("cannot read {}", crates.display());
    };
    for krate in entries.flatten() {
        rs_files(&krate.path().join("src"), &mut files);
        rs_files(&krate.path().join("examples"), &mut files);
    }
    assert!(!files.is_empty(), "no sources under {}", crates.display());
    files.sort();
    let loader = Path::new("easel-diffusion").join("src").join("loader");
    let mut found = Vec::new();
    for file in files {
        let rel = file.strip_prefix(crates).unwrap_or(&file);
        if rel.starts_with(&loader) || rel.components().any(|c| c.as_os_str() == "fixtures") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for prefix in PREFIXES {
                let hit = line.match_indices(prefix).any(|(at, _)| compared(line, at));
                if hit {
                    found.push(format!("crates/{}:{}: {}", rel.display(), n + 1, code));
                    break;
                }
            }
        }
    }
    found
}

#[test]
fn no_pipeline_class_names_compared_outside_the_loader() {
    let crates = std::env::var_os("EASEL_FAMILY_RULE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    let found = offenders(&crates);
    assert!(
        found.is_empty(),
        "pipeline class names are compared outside crates/easel-diffusion/src/loader/; \
         ask the model's family (easel_diffusion::loader::ModelFamily) instead:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_detector_flags_the_ways_class_names_were_tested() {
    let flagged = [
        r#"    class.starts_with("Flux")"#,
        r#"            Some(c) if c.contains("Flux") => 16,"#,
        r#"        "FluxPipeline" if has_mask => Err(e),"#,
        r#"        "FluxFillPipeline" => Some(50),"#,
        r#"        let s = if class == "FluxFillPipeline" {"#,
        r#"            c @ ("StableDiffusionPipeline""#,
        r#"            | "StableDiffusionImg2ImgPipeline""#,
        r#"        Some("FluxPipeline") => Ok(x),"#,
    ];
    for line in flagged {
        let at = line.find('"').unwrap();
        assert!(compared(line, at), "not flagged: {line}");
    }
    let allowed = [
        r#"    "StableDiffusionPipeline","#,
        r#"            Pipeline::Flux(_) => "FluxPipeline","#,
        r#"    assert_eq!(json["pipeline"], "FluxPipeline");"#,
        r#"            "use a FLUX.1 Fill model (FluxFillPipeline)","#,
    ];
    for line in allowed {
        let at = line.find('"').unwrap();
        assert!(!compared(line, at), "flagged: {line}");
    }
}
