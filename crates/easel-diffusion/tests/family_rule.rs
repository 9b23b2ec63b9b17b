//! The model-family rule: which family a model is (and so its facts) is
//! decided once, by the loader (`easel_diffusion::loader::ModelFamily`,
//! from `model_index.json`'s `_class_name`). No code outside
//! `crates/easel-diffusion/src/loader/` compares or matches diffusers
//! pipeline class names (`"StableDiffusion...`, `"Flux...`); it asks the
//! family instead.
//!
//! This test reads the source (`src/`, `examples/`, `benches/`) of every
//! crate of the workspace and fails naming each `file:line` where such a
//! literal is compared (`==`, `!=`, `== Some(..)`, `starts_with`,
//! `ends_with`, `contains`, `strip_prefix`, `eq_ignore_ascii_case`,
//! `matches!`, also when the literal is on the line after the call), used as
//! a `match` pattern, or kept in a `const` / `static` (a class name outside
//! the loader's `SUPPORTED_PIPELINES` is only there to be compared). A
//! lower-case `"flux` / `"stablediffusion` literal counts too when a string
//! method compares it (`name.to_lowercase().contains("flux")` guesses the
//! family from a name). Doc comments, comments, error messages and reported
//! values that merely mention a class name are fine. Integration tests,
//! which check the class a model reports, are not scanned.
//! `EASEL_FAMILY_RULE_ROOT` points it at another `crates/` folder.

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

/// The string methods that compare their argument.
const METHODS: &[&str] = &[
    "starts_with(",
    "ends_with(",
    "contains(",
    "strip_prefix(",
    "strip_suffix(",
    "eq_ignore_ascii_case(",
    "eq(",
];

/// Whether the literal starting at byte `at` of `line` (its opening quote)
/// is compared or matched. `previous` is the last non-blank code line
/// before it, for a literal that starts its line (a call rustfmt wrapped).
/// `exact` is whether the literal has a class name's own case (`"Flux`);
/// a lower-case one counts only as a string method's argument.
fn compared(previous: &str, line: &str, at: usize, exact: bool) -> bool {
    let mut before = line[..at].trim_end();
    if before.is_empty() {
        before = previous.trim_end();
    }
    let before = before.strip_suffix('&').unwrap_or(before).trim_end();
    if METHODS.iter().any(|c| before.ends_with(c)) {
        return true;
    }
    if !exact {
        return false;
    }
    let before_some = before.strip_suffix("Some(").map(str::trim_end);
    if ["==", "!="]
        .iter()
        .any(|op| before.ends_with(op) || before_some.is_some_and(|b| b.ends_with(op)))
        || before.ends_with("matches!(")
    {
        return true;
    }
    // A constant holding a class name.
    let code = line.trim_start();
    if (code.starts_with("const ") || code.starts_with("pub const ") || code.contains(" static "))
        && before.ends_with('=')
        || code.starts_with("static ")
    {
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

/// The offending literals of one line: each class-name prefix, in its own
/// case (`exact`) and lower-cased.
fn offending(previous: &str, line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    PREFIXES.iter().any(|prefix| {
        let lower_prefix = prefix.to_ascii_lowercase();
        lower.match_indices(&lower_prefix).any(|(at, _)| {
            let exact = line[at..].starts_with(prefix);
            compared(previous, line, at, exact)
        })
    })
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
        rs_files(&krate.path().join("benches"), &mut files);
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
        let mut previous = "";
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") || code.is_empty() {
                continue;
            }
            if offending(previous, line) {
                found.push(format!("crates/{}:{}: {}", rel.display(), n + 1, code));
            }
            previous = line;
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
        r#"    if model.class.as_deref() == Some("FluxPipeline") {"#,
        r#"    let sdxl = class != Some("StableDiffusionXLPipeline");"#,
        r#"    if class.eq_ignore_ascii_case("fluxpipeline") {"#,
        r#"    let flux = name.to_lowercase().contains("flux");"#,
        r#"    matches!(class, "FluxPipeline" | "FluxFillPipeline")"#,
        r#"const FLUX_CLASS: &str = "FluxPipeline";"#,
        r#"pub(crate) static SD: &str = "StableDiffusionPipeline";"#,
    ];
    for line in flagged {
        assert!(offending("", line), "not flagged: {line}");
    }
    // A call rustfmt wrapped: the literal starts the next line.
    assert!(offending(
        "    let flux = class.starts_with(",
        r#"        "Flux","#
    ));
    let allowed = [
        r#"    "StableDiffusionPipeline","#,
        r#"            Pipeline::Flux(_) => "FluxPipeline","#,
        r#"        "FluxPipeline""#,
        r#"    assert_eq!(json["pipeline"], "FluxPipeline");"#,
        r#"            "use a FLUX.1 Fill model (FluxFillPipeline)","#,
        r#"        "flux-schnell" => "black-forest-labs/FLUX.1-schnell","#,
        r#"    let name = "flux";"#,
        r#"    let e = format!("{class} is not FluxPipeline");"#,
    ];
    for line in allowed {
        assert!(
            !offending("    fn class_name(&self) -> &'static str {", line),
            "flagged: {line}"
        );
    }
}

/// The scan names `file:line` of each comparison under `src/`, and skips
/// the loader and integration tests.
#[test]
fn the_scan_names_file_and_line_and_skips_the_loader() {
    let root = tempfile::tempdir().unwrap();
    let crates = root.path();
    let write = |path: &str, text: &str| {
        let path = crates.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "easel-cli/src/generate.rs",
        "fn f(c: &str) -> bool {\n    // c.starts_with(\"Flux\") in a comment is fine\n    c.starts_with(\"Flux\")\n}\n",
    );
    write(
        "easel-diffusion/src/loader/family.rs",
        "fn g(c: &str) -> bool { c == \"FluxPipeline\" }\n",
    );
    write(
        "easel-server/tests/api.rs",
        "fn h(c: &str) -> bool { c == \"FluxPipeline\" }\n",
    );
    write(
        "easel-server/src/models.rs",
        "/// Reports \"FluxPipeline\".\nfn class() -> &'static str {\n    \"FluxPipeline\"\n}\n",
    );
    let found = offenders(crates);
    assert_eq!(
        found,
        vec![r#"crates/easel-cli/src/generate.rs:3: c.starts_with("Flux")"#.to_string()]
    );
}
