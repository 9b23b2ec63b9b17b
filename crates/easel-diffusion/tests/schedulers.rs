//! Scheduler parity with diffusers 0.42.1.
//!
//! * `reference_schedules`: the 14 configurations of
//!   `tests/fixtures/references/schedulers.json` give the same `timesteps`
//!   and `sigmas` as diffusers' `set_timesteps(n)` for n in 1, 4, 20, 25, 50.
//! * The other tests replay `tests/fixtures/generated/scheduler_steps.*`
//!   (made by `tools/gen_scheduler_steps.py`): schedules for many step counts,
//!   every intermediate sample of a pipeline-style loop with a fake denoiser
//!   (Gaussian draws of stochastic schedulers replayed with `RecordedNoise`),
//!   and an image-to-image run through `add_noise` / `set_begin_index`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use easel_diffusion::noise::RecordedNoise;
use easel_diffusion::schedulers::{
    build_scheduler, build_scheduler_class, common::np_linspace, parse_config_json, DdimScheduler,
    Scheduler, TimestepsRequest,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load_json(rel: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(rel)).unwrap();
    parse_config_json(&text).unwrap()
}

fn load_tensors(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(rel), &Device::Cpu).unwrap()
}

fn vec1(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest violation of `|a − b| ≤ atol + rtol |b|`, as a ratio (≤ 1 passes),
/// with the index and values of the worst element.
fn worst(a: &[f64], b: &[f64], atol: f64, rtol: f64) -> (f64, usize, f64, f64) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let mut w = (0.0, 0, 0.0, 0.0);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let r = if x.is_nan() || y.is_nan() {
            if x.is_nan() && y.is_nan() {
                0.0
            } else {
                f64::INFINITY
            }
        } else if x == y {
            0.0
        } else {
            (x - y).abs() / (atol + rtol * y.abs())
        };
        if r > w.0 {
            w = (r, i, x, y);
        }
    }
    w
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn check_close(what: &str, a: &[f64], b: &[f64], atol: f64, rtol: f64, failures: &mut Vec<String>) {
    if a.len() != b.len() {
        failures.push(format!(
            "{what}: length {} vs diffusers {}",
            a.len(),
            b.len()
        ));
        return;
    }
    let (r, i, x, y) = worst(a, b, atol, rtol);
    if r > 1.0 {
        failures.push(format!(
            "{what}: [{i}] = {x} vs diffusers {y} (|diff| = {:e})",
            (x - y).abs()
        ));
    }
}

fn request(case: &Value, n: usize) -> TimestepsRequest {
    let class = case["class"].as_str().unwrap();
    let mut req = TimestepsRequest::steps(n);
    if class.starts_with("FlowMatch")
        && case
            .get("flux_sigmas")
            .and_then(Value::as_bool)
            .unwrap_or(true)
    {
        req.sigmas = Some(np_linspace(1.0, 1.0 / n as f64, n));
    }
    req.mu = case.get("mu").and_then(Value::as_f64);
    req
}

fn build(case: &Value) -> Box<dyn Scheduler> {
    let class = case["class"].as_str().unwrap();
    let config = &case["config"];
    if let Some(eta) = case.get("eta").and_then(Value::as_f64) {
        return Box::new(
            DdimScheduler::from_config(config)
                .unwrap()
                .with_eta(eta)
                .unwrap(),
        );
    }
    build_scheduler(Some(class), config).unwrap_or_else(|e| panic!("{}: {e}", case["name"]))
}

#[test]
fn reference_schedules() {
    let spec = load_json("references/schedulers.json");
    let tensors = load_tensors("references/schedulers.safetensors");
    let steps: Vec<usize> = spec["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, item) in spec["schedulers"].as_object().unwrap() {
        let class = item["class"].as_str().unwrap();
        let case = serde_json::json!({"name": name, "class": class, "config": item["config"]});
        for &n in &steps {
            let mut s = build_scheduler_class(class, &item["config"]).unwrap();
            s.set_timesteps(&request(&case, n))
                .unwrap_or_else(|e| panic!("{name} n={n}: {e}"));
            let t_ref = vec1(&tensors[&format!("{name}.{n}.timesteps")]);
            check_close(
                &format!("{name}.{n}.timesteps"),
                s.timesteps(),
                &t_ref,
                1e-5,
                1e-5,
                &mut failures,
            );
            match (tensors.get(&format!("{name}.{n}.sigmas")), s.sigmas()) {
                (Some(r), Some(ours)) => check_close(
                    &format!("{name}.{n}.sigmas"),
                    ours,
                    &vec1(r),
                    1e-5,
                    1e-5,
                    &mut failures,
                ),
                (None, None) => {}
                (r, o) => failures.push(format!(
                    "{name}.{n}: sigmas present in reference: {}, here: {}",
                    r.is_some(),
                    o.is_some()
                )),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 14 * steps.len());
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

struct Generated {
    meta: Value,
    tensors: HashMap<String, Tensor>,
}

fn generated() -> Generated {
    Generated {
        meta: load_json("generated/scheduler_steps.json"),
        tensors: load_tensors("generated/scheduler_steps.safetensors"),
    }
}

fn fake_model(x_in: &Tensor, t: f64, e: &Tensor) -> Tensor {
    let a = 0.3 + 0.1 * (t / 100.0).cos();
    let b = 0.5 * (t / 250.0 + 0.3).sin() + 0.2;
    (x_in.affine(a, 0.0).unwrap() + e.affine(b, 0.0).unwrap()).unwrap()
}

fn draws(g: &Generated, key: &str) -> RecordedNoise {
    match g.tensors.get(key) {
        Some(t) => {
            let k = t.dim(0).unwrap();
            RecordedNoise::new((0..k).map(|i| t.get(i).unwrap()).collect())
        }
        None => RecordedNoise::new(Vec::new()),
    }
}

/// Run the pipeline loop over `timesteps`, returning every sample after `step`.
fn run_loop(
    s: &mut dyn Scheduler,
    mut x: Tensor,
    timesteps: &[f64],
    e: &Tensor,
    noise: &mut RecordedNoise,
) -> Vec<Tensor> {
    let mut out = Vec::new();
    for &t in timesteps {
        let x_in = s.scale_model_input(&x, t).unwrap();
        let mo = fake_model(&x_in, t, e);
        x = s.step(&mo, t, &x, noise).unwrap();
        out.push(x.clone());
    }
    out
}

#[test]
fn generated_schedules() {
    let g = generated();
    let mut failures = Vec::new();
    for case in g.meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let ns: Vec<usize> = case["schedule_steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let t_all = vec1(&g.tensors[&format!("{name}.sched.timesteps")]);
        let s_all = g.tensors.get(&format!("{name}.sched.sigmas")).map(vec1);
        let (mut t_off, mut s_off) = (0, 0);
        for (k, &n) in ns.iter().enumerate() {
            let mut s = build(case);
            s.set_timesteps(&request(case, n))
                .unwrap_or_else(|e| panic!("{name} n={n}: {e}"));
            let t_len = case["schedule_timesteps_len"][k].as_u64().unwrap() as usize;
            check_close(
                &format!("{name}.sched.{n}.timesteps"),
                s.timesteps(),
                &t_all[t_off..t_off + t_len],
                1e-5,
                1e-5,
                &mut failures,
            );
            t_off += t_len;
            if let Some(s_all) = &s_all {
                let s_len = case["schedule_sigmas_len"][k].as_u64().unwrap() as usize;
                check_close(
                    &format!("{name}.sched.{n}.sigmas"),
                    s.sigmas().unwrap_or(&[]),
                    &s_all[s_off..s_off + s_len],
                    1e-5,
                    1e-5,
                    &mut failures,
                );
                s_off += s_len;
            } else {
                assert!(s.sigmas().is_none(), "{name}: unexpected sigmas");
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn step_parity() {
    let g = generated();
    let init = &g.tensors["latent.init"];
    let e = &g.tensors["model.E"];
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for case in g.meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        for n in case["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
        {
            let reference = &g.tensors[&format!("{name}.{n}.samples")];
            let noise_key = format!("{name}.{n}.noise");

            // 1. Step by step: every step starts from diffusers' own previous
            //    sample (so each comparison sees one step's rounding only) and
            //    must agree to 1e-5 absolute + 1e-5 relative + 1e-6 of the
            //    largest |value| entering the step. The last term matters only
            //    at large σ: zero-SNR schedules start at σ = 4096, where one
            //    float32 ulp of σ (torch's float32 sqrt is not correctly
            //    rounded there) moves the cancelling step's result by ~1e-3.
            let mut s = build(case);
            s.set_timesteps(&request(case, n)).unwrap();
            let mut x = init.affine(s.init_noise_sigma(), 0.0).unwrap();
            let mut noise = draws(&g, &noise_key);
            let ts = s.timesteps().to_vec();
            let mut case_worst = 0.0f64;
            for (k, &t) in ts.iter().enumerate() {
                let x_in = s.scale_model_input(&x, t).unwrap();
                let mo = fake_model(&x_in, t, e);
                let ours = vec1(&s.step(&mo, t, &x, &mut noise).unwrap());
                let theirs_t = reference.get(k).unwrap();
                let theirs = vec1(&theirs_t);
                let atol = 1e-5 + 1e-6 * max_abs(&vec1(&x));
                let (r, ..) = worst(&ours, &theirs, atol, 1e-5);
                case_worst = case_worst.max(r);
                check_close(
                    &format!("{name}.{n}.samples[{k}]"),
                    &ours,
                    &theirs,
                    atol,
                    1e-5,
                    &mut failures,
                );
                x = theirs_t;
            }
            assert_eq!(
                noise.remaining(),
                0,
                "{name} n={n}: recorded draws left unused"
            );

            // 2. Free-running, as a pipeline does: the whole trajectory from
            //    the scheduler's own samples, 1e-4 relative at every step.
            let mut s = build(case);
            s.set_timesteps(&request(case, n)).unwrap();
            let x0 = init.affine(s.init_noise_sigma(), 0.0).unwrap();
            let mut noise = draws(&g, &noise_key);
            let samples = run_loop(s.as_mut(), x0.clone(), &ts, e, &mut noise);
            let mut scale = max_abs(&vec1(&x0));
            let mut run_worst = 0.0f64;
            for (k, ours) in samples.iter().enumerate() {
                let theirs = vec1(&reference.get(k).unwrap());
                let atol = 1e-4 + 1e-6 * scale;
                let (r, ..) = worst(&vec1(ours), &theirs, atol, 1e-4);
                run_worst = run_worst.max(r);
                check_close(
                    &format!("{name}.{n}.run[{k}]"),
                    &vec1(ours),
                    &theirs,
                    atol,
                    1e-4,
                    &mut failures,
                );
                scale = scale.max(max_abs(&theirs));
            }
            report.push(format!(
                "{name}.{n}: step {case_worst:.3}, run {run_worst:.3}"
            ));
        }
    }
    eprintln!("worst error / tolerance per case:\n{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn img2img_parity() {
    let g = generated();
    let e = &g.tensors["model.E"];
    let image = &g.tensors["img2img.image"];
    let img_noise = &g.tensors["img2img.noise"];
    let mut failures = Vec::new();
    for case in g.meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let n = case["img2img"]["steps"].as_u64().unwrap() as usize;
        let begin = case["img2img"]["begin_index"].as_u64().unwrap() as usize;
        let mut s = build(case);
        s.set_timesteps(&request(case, n)).unwrap();
        assert_eq!(begin, 3 * s.order());
        let ts = s.timesteps()[begin..].to_vec();
        s.set_begin_index(begin);
        let start = s.add_noise(image, img_noise, ts[0]).unwrap();
        check_close(
            &format!("{name}.img2img.start"),
            &vec1(&start),
            &vec1(&g.tensors[&format!("{name}.img2img.start")]),
            1e-5,
            1e-5,
            &mut failures,
        );
        let mut noise = draws(&g, &format!("{name}.img2img.noise"));
        let samples = run_loop(s.as_mut(), start, &ts, e, &mut noise);
        assert_eq!(noise.remaining(), 0, "{name}: recorded draws left unused");
        check_close(
            &format!("{name}.img2img.final"),
            &vec1(samples.last().unwrap()),
            &vec1(&g.tensors[&format!("{name}.img2img.final")]),
            1e-5,
            1e-5,
            &mut failures,
        );
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every configuration runs for 1 to 60 steps with finite results; the only
/// refusals are diffusers' own (LCM beyond `original_inference_steps`, PRK
/// below 4 steps), with a clear error.
#[test]
fn every_step_count_runs() {
    let g = generated();
    let e = &g.tensors["model.E"];
    let init = &g.tensors["latent.init"];
    for case in g.meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let min = case["min_steps"].as_u64().unwrap() as usize;
        let max = case["max_steps"].as_u64().unwrap() as usize;
        for n in 1..=60 {
            let mut s = build(case);
            let res = s.set_timesteps(&request(case, n));
            if n < min || n > max {
                let err = res
                    .expect_err(&format!("{name} n={n} should be refused"))
                    .to_string();
                assert!(err.contains("num_inference_steps"), "{name} n={n}: {err}");
                continue;
            }
            res.unwrap_or_else(|err| panic!("{name} n={n}: {err}"));
            assert_eq!(s.timesteps().len(), expected_calls(case, n), "{name} n={n}");
            let x = init.affine(s.init_noise_sigma(), 0.0).unwrap();
            let mut noise = FreshNoise(easel_diffusion::noise::TorchGenerator::new(n as u64));
            let ts = s.timesteps().to_vec();
            let mut x = x;
            for &t in &ts {
                let x_in = s.scale_model_input(&x, t).unwrap();
                x = s.step(&fake_model(&x_in, t, e), t, &x, &mut noise).unwrap();
            }
            assert!(
                vec1(&x).iter().all(|v| v.is_finite()),
                "{name} n={n}: non-finite result"
            );
        }
    }
}

fn expected_calls(case: &Value, n: usize) -> usize {
    match case["class"].as_str().unwrap() {
        "HeunDiscreteScheduler" => 2 * n - 1,
        "PNDMScheduler" => {
            if case["config"]["skip_prk_steps"].as_bool().unwrap_or(false) {
                if n == 1 {
                    1
                } else {
                    n + 1
                }
            } else {
                12 + n - 3
            }
        }
        _ => n,
    }
}

struct FreshNoise(easel_diffusion::noise::TorchGenerator);

impl easel_diffusion::noise::NoiseSource for FreshNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> easel_diffusion::Result<Tensor> {
        self.0.randn_tensor(shape, device)
    }
}

/// The fixture models' own scheduler configs build with every scheduler of
/// their family (and refuse the other family's).
#[test]
fn fixture_model_configs_build() {
    use easel_diffusion::schedulers::{load_config_file, scheduler_names, SchedulerFamily};
    let models = fixtures().join("models");
    let mut seen = 0;
    for entry in std::fs::read_dir(&models).unwrap() {
        let path = entry
            .unwrap()
            .path()
            .join("scheduler/scheduler_config.json");
        if !path.exists() {
            continue;
        }
        seen += 1;
        let config = load_config_file(&path).unwrap();
        let own = build_scheduler(None, &config).unwrap();
        let family = own.family();
        assert_eq!(
            family == SchedulerFamily::FlowMatch,
            config["_class_name"]
                .as_str()
                .unwrap()
                .starts_with("FlowMatch")
        );
        for info in scheduler_names() {
            let built = build_scheduler(Some(info.name), &config);
            if info.family != family {
                assert!(
                    built.is_err(),
                    "{}: {} should be refused",
                    path.display(),
                    info.name
                );
                continue;
            }
            let mut s = built.unwrap_or_else(|e| panic!("{}: {}: {e}", path.display(), info.name));
            let mut req = TimestepsRequest::steps(8);
            if family == SchedulerFamily::FlowMatch {
                req.sigmas = Some(np_linspace(1.0, 1.0 / 8.0, 8));
                req.mu = Some(0.8);
            }
            s.set_timesteps(&req).unwrap();
            // PNDM repeats one timestep, Heun doubles them.
            assert!((8..=20).contains(&s.timesteps().len()), "{}", info.name);
        }
    }
    assert!(seen >= 5, "only {seen} model configs found");
}
