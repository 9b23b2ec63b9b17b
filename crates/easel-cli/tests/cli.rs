//! The built `easel` binary end to end on the tiny fixture models.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn easel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run easel")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn rgb8(path: &Path) -> (u32, u32, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let img = easel_core::decode_image(&bytes).unwrap();
    let (w, h) = (img.width, img.height);
    (w, h, img.into_rgb8())
}

/// The largest per-channel difference between two 8-bit images.
fn max_level_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Run `easel generate` with the settings of reference case `case` (its
/// prompt, negative prompt, steps, guidance, size and seed) and `scheduler`,
/// and check the PNG is within one level per channel of diffusers' PNG.
/// Returns the `--json` result.
fn reproduce_reference_png(case: &str, scheduler: &str) -> serde_json::Value {
    let refs = fixtures().join("references");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refs.join(format!("{case}.json"))).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let model = fixtures().join(c["model"].as_str().unwrap());
    let num = |k: &str| c[k].to_string();
    let (steps, guidance, width, height, seed) = (
        num("num_inference_steps"),
        num("guidance_scale"),
        num("width"),
        num("height"),
        num("seed"),
    );
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        c["prompt"].as_str().unwrap(),
        "--steps",
        &steps,
        "--guidance-scale",
        &guidance,
        "--width",
        &width,
        "--height",
        &height,
        "--seed",
        &seed,
        "--scheduler",
        scheduler,
        "--output",
        out.to_str().unwrap(),
        "--json",
    ];
    if let Some(neg) = c["negative_prompt"].as_str() {
        args.extend(["--negative-prompt", neg]);
    }
    let o = easel(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();

    let (w, h, got) = rgb8(&out);
    let (rw, rh, want) = rgb8(&refs.join(format!("{case}.0.png")));
    assert_eq!((w, h), (rw, rh));
    let d = max_level_diff(&got, &want);
    assert!(d <= 1, "{case}: max difference {d} levels");

    // The generation parameters are embedded in the PNG.
    let meta = easel_core::read_png_metadata(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(meta.prompt, c["prompt"].as_str().unwrap());
    assert_eq!(
        meta.negative_prompt.as_deref(),
        c["negative_prompt"].as_str()
    );
    assert_eq!(meta.seed.to_string(), seed);
    assert_eq!(meta.steps.to_string(), steps);
    assert_eq!(
        (meta.width.to_string(), meta.height.to_string()),
        (width, height)
    );
    json
}

/// Issue 2: `easel generate` with the settings of `sd15_txt2img_euler.json`
/// and `--seed 42` reproduces diffusers' PNG within one level per channel.
#[test]
fn generate_reproduces_sd15_euler_reference_png() {
    let json = reproduce_reference_png("sd15_txt2img_euler", "euler");
    assert_eq!(json["images"][0]["seed"], 42);
    assert_eq!(json["scheduler"], "EulerDiscreteScheduler");
    assert_eq!(json["timings"]["step_s"].as_array().unwrap().len(), 4);
}

/// Issue 3: the stochastic Euler ancestral sampler draws its per-step noise
/// from the seeded generator in diffusers' order.
#[test]
fn generate_reproduces_sd15_euler_ancestral_reference_png() {
    let json = reproduce_reference_png("sd15_txt2img_euler_ancestral", "euler_a");
    assert_eq!(json["scheduler"], "EulerAncestralDiscreteScheduler");
}

/// Image i of a batch uses seed + i and equals a single run with that seed.
#[test]
fn batch_images_are_reproducible_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-sd15");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red house",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "40",
        ];
        args.extend_from_slice(extra);
        let o = easel(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    run(&[
        "--seed",
        "100",
        "--batch-size",
        "2",
        "--output-dir",
        dir.path().to_str().unwrap(),
    ]);
    let single = dir.path().join("single.png");
    run(&["--seed", "101", "--output", single.to_str().unwrap()]);
    let (_, _, b0) = rgb8(&dir.path().join("easel-100-0.png"));
    let (_, _, b1) = rgb8(&dir.path().join("easel-100-1.png"));
    let (_, _, s) = rgb8(&single);
    assert!(
        max_level_diff(&b1, &s) <= 1,
        "image 1 of the batch differs from seed 101 alone"
    );
    assert_ne!(b0, b1, "two seeds gave the same image");
}

/// Bad input: a one-line error naming the field and the allowed values,
/// a non-zero exit, and no file written.
#[test]
fn bad_inputs_fail_clearly_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let model = fixtures().join("models/tiny-sd15");
    let m = model.to_str().unwrap();
    let o_s = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--width", "65"], "width"),
        (vec!["--height", "4096"], "height"),
        (vec!["--steps", "0"], "steps"),
        (vec!["--steps", "61"], "steps"),
        (vec!["--guidance-scale", "31"], "guidance"),
        (vec!["--batch-size", "5"], "batch"),
        (vec!["--scheduler", "nope"], "euler"),
        (vec!["--scheduler", "flow_match_euler"], "flow-matching"),
        (vec!["--quality", "0"], "quality"),
    ];
    for (extra, needle) in cases {
        let mut args = vec![
            "generate", "--model", m, "--prompt", "x", "--output", o_s, "--steps", "1",
        ];
        args.extend(extra.iter().copied());
        let o = easel(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(err.to_lowercase().contains(needle), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} wrote a file");
    }
    // Unknown model, offline: says where it looked.
    let o = easel(&[
        "generate",
        "--model",
        "nobody/nothing",
        "--prompt",
        "x",
        "--output",
        o_s,
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("models--nobody--nothing"),
        "{}",
        stderr(&o)
    );
    // An output directory that does not exist.
    let o = easel(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--output",
        "/nonexistent/dir/x.png",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/dir"), "{}", stderr(&o));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "files left behind: {leftovers:?}");
}

#[test]
fn schedulers_and_models_list() {
    let o = easel(&["schedulers"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for name in [
        "euler",
        "euler_a",
        "ddim",
        "pndm",
        "lms",
        "heun",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "unipc",
        "lcm",
        "flow_match_euler",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{text}"
        );
    }
    let o = easel(&[
        "models",
        "list",
        "--models-dir",
        fixtures().join("models").to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let models: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(models
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["pipeline_class"] == "StableDiffusionXLPipeline"));
}

// ------------------------------------------------------------------ flows

/// `easel flow ...` with no LLM configured from the environment.
fn easel_flow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_easel"))
        .arg("flow")
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("EASEL_LLM_URL")
        .env_remove("EASEL_LLM_MODEL")
        .env_remove("EASEL_DATA_DIR")
        .output()
        .expect("run easel")
}

fn write_flow(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn flow_run_basic_steps_prints_the_run_record() {
    let dir = tempfile::tempdir().unwrap();
    let flow = write_flow(
        dir.path(),
        "titles.json5",
        "{ steps: [
            { id: 'subjects', type: 'List', parameters: { value: ['a fox', 'an owl'] } },
            { id: 'titles', type: 'Template', parameters: { template: [[ '@Map($.results.subjects)', 'A portrait of {{ $$ }} by {{ $.input.artist }}' ]] } },
        ] }",
    );
    let input = write_flow(dir.path(), "input.json", r#"{"artist": "Vermeer"}"#);
    let data = dir.path().join("data");
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--input",
        &format!("@{}", input.display()),
        "--data-dir",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(run["status"], "succeeded");
    assert_eq!(
        run["steps"][1]["result"],
        serde_json::json!([
            "A portrait of a fox by Vermeer",
            "A portrait of an owl by Vermeer"
        ])
    );
    // Without --json: one line per step with status and duration.
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--input",
        r#"{"artist": "Ter Borch"}"#,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("titles (Template): succeeded"), "{text}");
    assert!(text.contains("Ter Borch"), "{text}");
}

#[test]
fn flow_run_generates_one_asset_per_prompt_on_the_fixture_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-sd15");
    let flow = write_flow(
        dir.path(),
        "gen.json5",
        &format!(
            "{{ steps: [
                {{ id: 'prompts', type: 'List', parameters: {{ value: '$.input.prompts' }} }},
                {{ id: 'gen', type: 'ImageGenerator', parameters: {{
                    baseModel: '{}', steps: 2, width: 32, height: 32, outputFormat: 'png',
                    images: [[ '@Map($.results.prompts)', {{ prompt: '$$.text', seed: '$$.seed' }} ]] }} }},
                {{ id: 'first', type: 'Template', parameters: {{ template: '$.results.gen[0].file_url' }} }},
            ] }}",
            model.display()
        ),
    );
    let data = dir.path().join("data");
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--input",
        r#"{"prompts": [{"text": "a red house", "seed": 1}, {"text": "a blue boat", "seed": 2}]}"#,
        "--data-dir",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let gen = &run["steps"][1];
    let job = gen["jobId"].as_str().unwrap();
    let assets = gen["result"].as_array().unwrap();
    assert_eq!(assets.len(), 2, "one asset per prompt");
    for (asset, seed) in assets.iter().zip([1, 2]) {
        assert_eq!(asset["job_id"], job);
        assert_eq!(asset["seed"], seed);
        assert_eq!(asset["file_type"], "image/png");
        let url = asset["file_url"].as_str().unwrap();
        assert!(url.starts_with("file:///"), "{url}");
        let path = PathBuf::from(asset["path"].as_str().unwrap());
        assert!(path.starts_with(data.canonicalize().unwrap().join("assets").join(job)));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            asset["file_size"].as_u64().unwrap()
        );
        assert_eq!(rgb8(&path).0, 32);
    }
    assert_eq!(run["steps"][2]["result"], assets[0]["file_url"]);
}

#[test]
fn flow_run_failures_and_invalid_flows_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-sd15");
    let data = dir.path().join("data");
    let flow = write_flow(
        dir.path(),
        "bad-size.json",
        &format!(
            r#"{{"steps": [{{"id": "gen", "type": "ImageGenerator", "parameters": {{"baseModel": "{}", "images": [{{"prompt": "x", "width": 1001}}]}}}}]}}"#,
            model.display()
        ),
    );
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let run: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(run["status"], "failed");
    let message = run["steps"][0]["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("parameters.images[0].width: 1001"),
        "{message}"
    );

    let flow = write_flow(dir.path(), "unknown.json5", "[{ id: 'a', type: 'Nope' }]");
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("steps[0] (a).type: unknown step type `Nope`"),
        "{}",
        stderr(&o)
    );

    let flow = write_flow(
        dir.path(),
        "llm.json5",
        "[{ id: 'p', type: 'ObjectGenerator', parameters: { description: 'd', schema: { type: 'object' } } }]",
    );
    let o = easel_flow(&["validate", flow.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = easel_flow(&[
        "run",
        flow.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("EASEL_LLM_URL"), "{}", stderr(&o));
}
