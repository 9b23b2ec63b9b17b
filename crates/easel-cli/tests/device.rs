//! `--device` / `EASEL_DEVICE` on the commands that run the engine: bad
//! names refused with the allowed ones, `bench` saying where it ran, and
//! (on a build without the `cuda` feature) an explicit CUDA device
//! stopping `generate`, `flow run` and `easel serve` at start-up with the
//! fix, never a silent CPU run.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// `easel ARGS` with `env` set (and no device or config from the caller's
/// environment).
fn easel(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_easel"));
    c.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("EASEL_DEVICE")
        .env_remove("EASEL_CONFIG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run easel")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tiny_sd15() -> String {
    fixtures()
        .join("models/tiny-sd15")
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_device_name_that_is_not_one_is_refused_with_the_allowed_ones() {
    let model = tiny_sd15();
    for (args, env) in [
        (vec!["--device", "gpu"], vec![]),
        (vec![], vec![("EASEL_DEVICE", "gpu")]),
    ] {
        let mut all = vec!["generate", "-m", &model, "-p", "x"];
        all.extend(args);
        let o = easel(&all, &env);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("--device")
                && e.contains("`gpu` is not a device")
                && e.contains("auto, cpu, cuda, cuda:N"),
            "{e}"
        );
    }
}

#[test]
fn bench_prints_the_device_it_ran_on() {
    let o = easel(
        &[
            "bench",
            "--model",
            &tiny_sd15(),
            "--random-weights",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "1",
            "--runs",
            "0",
            "--no-peak",
        ],
        &[("EASEL_DEVICE", "CPU")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(", device cpu, "), "{out}");
}

/// A build without `cuda`: `--device cuda` / `cuda:N` stops each command
/// before any model loads, saying how to get CUDA.
#[cfg(not(feature = "cuda"))]
mod cpu_only_build {
    use super::*;

    fn assert_needs_cuda(o: &Output, device: &str) {
        assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
        let e = stderr(o);
        assert!(
            e.contains(&format!("`{device}` needs CUDA"))
                && e.contains("--features cuda")
                && e.contains("--device"),
            "{e}"
        );
    }

    #[test]
    fn generate_refuses_an_explicit_cuda_device() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.png");
        let model = tiny_sd15();
        let args = [
            "generate",
            "-m",
            &model,
            "-p",
            "x",
            "--steps",
            "1",
            "-o",
            out.to_str().unwrap(),
        ];
        let mut with_flag = args.to_vec();
        with_flag.extend(["--device", "cuda"]);
        assert_needs_cuda(&easel(&with_flag, &[]), "cuda:0");
        assert_needs_cuda(&easel(&args, &[("EASEL_DEVICE", "cuda:1")]), "cuda:1");
        assert!(!out.exists());
    }

    #[test]
    fn flow_run_refuses_an_explicit_cuda_device() {
        let dir = tempfile::tempdir().unwrap();
        let flow = dir.path().join("flow.json");
        std::fs::write(
            &flow,
            r#"{"steps": [{"id": "a", "type": "Constant", "parameters": {"value": 1}}]}"#,
        )
        .unwrap();
        let data = dir.path().join("data");
        let o = easel(
            &[
                "flow",
                "run",
                flow.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
                "--device",
                "cuda:0",
            ],
            &[],
        );
        assert_needs_cuda(&o, "cuda:0");
    }

    /// `easel serve` stops at start-up (exit 1, nothing served), naming
    /// the setting; a device listed twice is refused too.
    #[test]
    fn serve_refuses_an_explicit_cuda_device_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let serve = |extra: &[&str], env: &[(&str, &str)]| {
            let mut args = vec![
                "serve",
                "--no-auth",
                "--bind",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().unwrap(),
            ];
            args.extend(extra);
            easel(&args, env)
        };
        let o = serve(&["--device", "cuda"], &[]);
        assert_needs_cuda(&o, "cuda:0");
        assert!(
            stderr(&o).contains("device (--device, EASEL_DEVICE)"),
            "{}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("listening"), "{}", stderr(&o));
        // One bad entry of a list is named by its index.
        let o = serve(&["--device", "cpu,cuda:1"], &[]);
        assert_needs_cuda(&o, "cuda:1");
        assert!(
            stderr(&o).contains("device (--device, EASEL_DEVICE)[1]: "),
            "{}",
            stderr(&o)
        );
        // From the environment and from the config file.
        assert_needs_cuda(&serve(&[], &[("EASEL_DEVICE", "cuda:0")]), "cuda:0");
        let config = dir.path().join("easel.toml");
        std::fs::write(&config, "device = [\"cuda:0\", \"cuda:1\"]\n").unwrap();
        let o = serve(&["--config", config.to_str().unwrap()], &[]);
        assert_needs_cuda(&o, "cuda:0");
        for (extra, env) in [
            (vec!["--device", "cpu", "--device", "CPU"], vec![]),
            (vec![], vec![("EASEL_DEVICE", "cuda,cuda:0")]),
        ] {
            let o = serve(&extra, &env);
            assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
            assert!(stderr(&o).contains("is listed twice"), "{}", stderr(&o));
        }
    }
}
