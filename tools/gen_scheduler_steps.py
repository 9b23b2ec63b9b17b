"""Generate step-parity reference data for easel's schedulers from diffusers.

For every scheduler configuration of tests/fixtures/references/schedulers.json
plus a few extra configurations defined below (v-prediction, zero terminal
SNR, PRK, SDE / 3rd-order DPM-Solver, UniPC bh1, dynamic flow shifting, ...),
this runs the diffusers scheduler in a pipeline-like loop on a small fixed
latent with a deterministic fake denoiser, and records:

* ``<case>.sched.timesteps`` / ``.sigmas``: ``set_timesteps(n)`` results for
  many step counts n in 1..60, concatenated in the order of the case's
  ``schedule_steps`` (lengths in ``schedule_timesteps_len`` /
  ``schedule_sigmas_len``; sigmas only where the class has them);
* ``<case>.<n>.samples``: the sample after every ``step`` (stacked, one row
  per model call) for n in STEPS, and ``<case>.<n>.noise``: every Gaussian
  draw the scheduler made (its ``randn_tensor`` calls), so a stochastic
  scheduler can be replayed with ``RecordedNoise``;
* ``<case>.img2img.start`` / ``.img2img.final``: an image-to-image run
  (``add_noise`` / ``scale_noise`` at the first kept timestep after
  ``set_begin_index``, then the loop over the rest of the schedule).

The fake denoiser is ``a(t) * x_in + b(t) * E`` with
``a(t) = 0.3 + 0.1 cos(t / 100)``, ``b(t) = 0.5 sin(t / 250 + 0.3) + 0.2``
(scalars in float64, tensors float32) and ``E`` the stored ``model.E`` tensor.
The initial latent is ``init_noise_sigma * latent.init``.

Everything goes to tests/fixtures/generated/scheduler_steps.safetensors and
tests/fixtures/generated/scheduler_steps.json (the case list).

Rerun (from the repository root) with diffusers 0.42.1 / torch 2.x on CPU and
scipy (LMSDiscreteScheduler integrates its coefficients with scipy):

    PYTHONPATH=/path/to/scipy /tmp/refenv/bin/python tools/gen_scheduler_steps.py
"""

import copy
import json
import math
import os

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_flow_match_euler_discrete,
    scheduling_lcm,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "fixtures", "references", "schedulers.json")
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "generated")

STEPS = [1, 2, 3, 4, 10]
SCHEDULE_STEPS = list(range(1, 21)) + [25, 30, 33, 40, 47, 50, 59, 60]
SHAPE = (1, 4, 4, 4)
IMG2IMG_STEPS = 10
IMG2IMG_START = 3

# ---------------------------------------------------------------------------
# Recording every Gaussian draw the schedulers make.
# ---------------------------------------------------------------------------

DRAWS = []


def _recording(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        DRAWS.append(out.detach().clone().float())
        return out

    return wrapper


for _module in (
    scheduling_ddim,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_flow_match_euler_discrete,
    scheduling_lcm,
):
    _module.randn_tensor = _recording(_module.randn_tensor)


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

SD = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

# UniPC with bh1 or predict_x0=False uses final_sigmas_type "sigma_min": with a
# final sigma of 0, diffusers returns NaN on the last step for those two.
EXTRA = {
    "ddim_v_trailing_zsnr": (
        "DDIMScheduler",
        dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
             clip_sample=False, set_alpha_to_one=False),
        {},
    ),
    "ddim_eta": (
        "DDIMScheduler",
        dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        {"eta": 0.5},
    ),
    "ddim_linspace_clip": ("DDIMScheduler", {"timestep_spacing": "linspace", "clip_sample": True}, {}),
    "pndm_prk": ("PNDMScheduler", dict(SD, skip_prk_steps=False, steps_offset=1), {"min_steps": 4}),
    "pndm_v_trailing": (
        "PNDMScheduler",
        dict(SD, skip_prk_steps=True, prediction_type="v_prediction", timestep_spacing="trailing"),
        {},
    ),
    "euler_v_sigma_min": (
        "EulerDiscreteScheduler",
        dict(SD, prediction_type="v_prediction", final_sigmas_type="sigma_min", timestep_spacing="linspace"),
        {},
    ),
    "euler_exponential_zsnr": (
        "EulerDiscreteScheduler",
        dict(SD, use_exponential_sigmas=True, rescale_betas_zero_snr=True, timestep_spacing="trailing",
             prediction_type="v_prediction"),
        {},
    ),
    "euler_a_v_leading": (
        "EulerAncestralDiscreteScheduler",
        dict(SD, prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1),
        {},
    ),
    "lms_karras": ("LMSDiscreteScheduler", dict(SD, use_karras_sigmas=True), {}),
    "heun_karras_v": (
        "HeunDiscreteScheduler",
        dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"),
        {},
    ),
    "dpmpp_sde_2m": ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++"), {}),
    "dpmpp_3m_sigma_min": (
        "DPMSolverMultistepScheduler",
        dict(SD, solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False),
        {},
    ),
    "dpm_heun_v": (
        "DPMSolverMultistepScheduler",
        dict(SD, algorithm_type="dpmsolver", solver_type="heun", final_sigmas_type="sigma_min",
             prediction_type="v_prediction", timestep_spacing="trailing"),
        {},
    ),
    "dpmpp_lu_leading": (
        "DPMSolverMultistepScheduler",
        dict(SD, use_lu_lambdas=True, timestep_spacing="leading", steps_offset=1),
        {},
    ),
    "unipc_bh1_o3_karras": (
        "UniPCMultistepScheduler",
        dict(SD, solver_type="bh1", solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
        {},
    ),
    "unipc_eps_leading": (
        "UniPCMultistepScheduler",
        dict(SD, predict_x0=False, timestep_spacing="leading", steps_offset=1, disable_corrector=[0],
             final_sigmas_type="sigma_min"),
        {},
    ),
    "lcm_v": ("LCMScheduler", dict(SD, prediction_type="v_prediction", set_alpha_to_one=False), {}),
    "flow_dynamic": (
        "FlowMatchEulerDiscreteScheduler",
        {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
        {"mu": 0.8373},
    ),
    "flow_default_sigmas_shift3": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {"flux_sigmas": False}),
    "flow_stochastic": (
        "FlowMatchEulerDiscreteScheduler",
        {"shift": 1.0, "stochastic_sampling": True},
        {},
    ),
}


def load_cases():
    with open(REFERENCE) as f:
        ref = json.load(f)
    cases = []
    for name, item in ref["schedulers"].items():
        cases.append({"name": name, "class": item["class"], "config": item["config"]})
    for name, (cls, cfg, extra) in EXTRA.items():
        case = {"name": name, "class": cls, "config": cfg}
        case.update(extra)
        cases.append(case)
    for case in cases:
        flow = case["class"].startswith("FlowMatch")
        case.setdefault("flux_sigmas", flow)
        case.setdefault("mu", None)
        case.setdefault("eta", None)
        case.setdefault("min_steps", 1)
        case["max_steps"] = 50 if case["class"] == "LCMScheduler" else 60
    return cases


def make(case):
    cls = getattr(diffusers, case["class"])
    return cls.from_config(copy.deepcopy(case["config"]))


def set_timesteps(sched, case, n):
    kwargs = {}
    if case["class"].startswith("FlowMatch"):
        if case["flux_sigmas"]:
            kwargs["sigmas"] = np.linspace(1.0, 1 / n, n)
        if case["mu"] is not None:
            kwargs["mu"] = case["mu"]
        if "sigmas" in kwargs:
            sched.set_timesteps(device="cpu", **kwargs)
        else:
            sched.set_timesteps(n, device="cpu", **kwargs)
    else:
        sched.set_timesteps(n, device="cpu")


def fake_model(x_in, t, E):
    t = float(t)
    a = 0.3 + 0.1 * math.cos(t / 100.0)
    b = 0.5 * math.sin(t / 250.0 + 0.3) + 0.2
    return a * x_in + b * E


def step(sched, case, out, t, x, gen):
    kwargs = {}
    if case["class"] in (
        "EulerAncestralDiscreteScheduler",
        "LCMScheduler",
        "DPMSolverMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "EulerDiscreteScheduler",
    ):
        kwargs["generator"] = gen
    if case["class"] == "DDIMScheduler":
        kwargs["generator"] = gen
        if case["eta"] is not None:
            kwargs["eta"] = case["eta"]
    return sched.step(out, t, x, return_dict=False, **kwargs)[0]


def run_loop(sched, case, x, timesteps, E, gen):
    samples = []
    for t in timesteps:
        # FlowMatch has no scale_model_input (FluxPipeline feeds the sample as is).
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = fake_model(x_in, t, E)
        x = step(sched, case, out, t, x, gen)
        samples.append(x.clone())
    return x, samples


def main():
    cases = load_cases()
    g = torch.Generator("cpu").manual_seed(0)
    init = torch.randn(SHAPE, generator=g)
    E = torch.randn(SHAPE, generator=g)
    image = 0.5 * torch.randn(SHAPE, generator=g)
    img_noise = torch.randn(SHAPE, generator=g)
    tensors = {"latent.init": init, "model.E": E, "img2img.image": image, "img2img.noise": img_noise}

    for case in cases:
        name = case["name"]
        # Schedules, concatenated over the step counts of `case["schedule_steps"]`.
        case["schedule_steps"] = [n for n in SCHEDULE_STEPS if case["min_steps"] <= n <= case["max_steps"]]
        all_t, all_s, t_len, s_len = [], [], [], []
        for n in case["schedule_steps"]:
            sched = make(case)
            set_timesteps(sched, case, n)
            all_t.append(sched.timesteps.to(torch.float64).float())
            t_len.append(len(sched.timesteps))
            if case["class"] not in ("DDIMScheduler", "PNDMScheduler", "LCMScheduler"):
                all_s.append(sched.sigmas.float())
                s_len.append(len(sched.sigmas))
        tensors[f"{name}.sched.timesteps"] = torch.cat(all_t)
        case["schedule_timesteps_len"] = t_len
        if all_s:
            tensors[f"{name}.sched.sigmas"] = torch.cat(all_s)
            case["schedule_sigmas_len"] = s_len
        # Step loops.
        case["steps"] = [n for n in STEPS if case["min_steps"] <= n <= case["max_steps"]]
        for n in case["steps"]:
            sched = make(case)
            set_timesteps(sched, case, n)
            gen = torch.Generator("cpu").manual_seed(1000 + n)
            DRAWS.clear()
            x = init * float(getattr(sched, "init_noise_sigma", 1.0))
            x, samples = run_loop(sched, case, x, sched.timesteps, E, gen)
            tensors[f"{name}.{n}.samples"] = torch.stack(samples).contiguous()
            if DRAWS:
                tensors[f"{name}.{n}.noise"] = torch.stack(DRAWS).contiguous()
            case[f"noise_draws.{n}"] = len(DRAWS)
        # Image to image.
        sched = make(case)
        set_timesteps(sched, case, IMG2IMG_STEPS)
        order = sched.order
        begin = IMG2IMG_START * order
        timesteps = sched.timesteps[begin:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
        t0 = timesteps[:1]
        if case["class"].startswith("FlowMatch"):
            x = sched.scale_noise(image, t0, img_noise)
        else:
            x = sched.add_noise(image, img_noise, t0)
        tensors[f"{name}.img2img.start"] = x.clone()
        gen = torch.Generator("cpu").manual_seed(77)
        DRAWS.clear()
        x, _ = run_loop(sched, case, x, timesteps, E, gen)
        tensors[f"{name}.img2img.final"] = x.clone()
        if DRAWS:
            tensors[f"{name}.img2img.noise"] = torch.stack(DRAWS).contiguous()
        case["img2img"] = {"steps": IMG2IMG_STEPS, "begin_index": begin}

    os.makedirs(OUT_DIR, exist_ok=True)
    tensors = {k: v.contiguous().float() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT_DIR, "scheduler_steps.safetensors"))
    meta = {
        "generator": "tools/gen_scheduler_steps.py",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "shape": list(SHAPE),
        "schedule_steps": SCHEDULE_STEPS,
        "fake_model": "a(t) * x_in + b(t) * E, a = 0.3 + 0.1 cos(t/100), b = 0.5 sin(t/250 + 0.3) + 0.2",
        "cases": cases,
    }
    with open(os.path.join(OUT_DIR, "scheduler_steps.json"), "w") as f:
        json.dump(meta, f, indent=1, allow_nan=True)
        f.write("\n")


if __name__ == "__main__":
    main()
