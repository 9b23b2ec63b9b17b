#!/usr/bin/env bash
# easel on an NVIDIA GPU, beside diffusers on the same GPU, in under 10
# minutes, on a machine with Python + PyTorch and no Rust toolchain.
#
# Input: a bundle from scripts/build-gpu-bundle.sh (built elsewhere with
# --features cuda): bin/easel, tests/parity, tests/offload, bench-models/. Run it from a
# checkout of the repository (for tests/fixtures and tools/bench_diffusers.py)
# or pass --fixtures / use a bundle built with --fixtures.
#
#   1. the engine's fixture parity tests on the GPU, in fp32 and in fp16
#      (EASEL_TEST_DEVICE=cuda, EASEL_TEST_PRECISION=fp32|fp16); then the offload tests (--offload model / sequential give the pixels of none);
#   2. real-size random-weight benchmarks, easel then diffusers, each in
#      its own process: SD 1.5 512² 25 steps fp16, SDXL 1024² 25 steps fp16,
#      FLUX.1 schnell 1024² 4 steps bf16; one warm-up run, one timed run;
#   3. one table: job, tool, seconds per image, seconds per step, peak GPU
#      memory (nvidia-smi's memory.used sampled every 200 ms while the
#      process runs, minus the idle value before it: the same method for
#      both tools, CUDA context included), and torch's own
#      max_memory_allocated for diffusers.
#
# Usage: scripts/gpu-check.sh [--bundle DIR] [--python PY] [--out DIR]
#            [--jobs sd15,sdxl,flux] [--no-parity] [--no-diffusers]
#            [--fixtures DIR] [--budget SECONDS] [--cpu-dry-run]
#   --bundle DIR    the bundle [default: gpu-bundle]
#   --python PY     a Python with torch [default: found: $PYTHON, python3,
#                   then any venv under / with torch in it]
#   --out DIR       logs and the table (gpu-check.md) [default: $OUT, else
#                   gpu-check-out]
#   --budget S      stop starting new steps past S seconds [default: 570]
#   --cpu-dry-run   prove the plumbing on a machine without a GPU: the CPU
#                   binary, tiny fixture models at 64², 2 steps, fp32,
#                   peak RSS instead of GPU memory
#
# The CUDA libraries easel links against (libcublas, libcublasLt,
# libcurand, libcudart of CUDA 13) are taken from the PyTorch venv's
# site-packages/nvidia/*/lib; libcuda comes from the driver (R580 or newer
# for CUDA 13.0's PTX). Exit status: 0 when every step ran and passed.
set -uo pipefail

die() { echo "gpu-check: $*" >&2; exit 2; }
log() { echo "[gpu-check $(date -u +%T) +${SECONDS}s] $*" >&2; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
bundle=gpu-bundle
python=${PYTHON:-}
out=${OUT:-gpu-check-out}
jobs=sd15,sdxl,flux
parity=1 diffusers=1 dry=0 budget=570
fixtures=${EASEL_FIXTURES:-}
while [[ $# -gt 0 ]]; do
    case $1 in
        --bundle) bundle=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --no-parity) parity=0; shift ;;
        --no-diffusers) diffusers=0; shift ;;
        --fixtures) fixtures=$2; shift 2 ;;
        --budget) budget=$2; shift 2 ;;
        --cpu-dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

IFS=, read -r -a job_list <<< "$jobs"
for job in "${job_list[@]}"; do
    [[ $job == sd15 || $job == sdxl || $job == flux ]] || die "--jobs: unknown job '$job' (sd15, sdxl, flux)"
done
easel="$bundle/bin/easel"
[[ -x "$easel" ]] || die "no executable $easel (build it with scripts/build-gpu-bundle.sh; pass --bundle DIR)"
mkdir -p "$out" || die "cannot create --out $out"
out=$(cd "$out" && pwd)
failures=0

# --- Python with torch -------------------------------------------------------
has_torch() { [[ -n "$1" ]] && "$1" -c 'import torch' >/dev/null 2>&1; }
if ! has_torch "$python"; then
    python=
    for c in python3 python; do
        if has_torch "$(command -v "$c")"; then python=$(command -v "$c"); break; fi
    done
fi
if [[ -z "$python" ]]; then
    # A venv somewhere: .../lib/python3.X/site-packages/torch/__init__.py
    while IFS= read -r init; do
        c="${init%/lib/python3*}/bin/python"
        if has_torch "$c"; then python=$c; break; fi
    done < <(find / -maxdepth 7 -path '*/site-packages/torch/__init__.py' 2>/dev/null)
fi
if [[ -z "$python" ]]; then
    [[ $diffusers == 1 || $dry == 0 ]] && die "found no Python with torch; pass --python PY"
else
    log "python: $python ($("$python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"
fi

# --- CUDA libraries and the GPU ----------------------------------------------
gpu_mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1; }
if [[ $dry == 0 ]]; then
    command -v nvidia-smi >/dev/null || die "no nvidia-smi: is this a machine with an NVIDIA GPU and driver?"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i 0 | sed 's/^/gpu: /' >&2
    if [[ -n "$python" ]]; then
        libs=$("$python" - <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = []
for r in roots:
    dirs += sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib")))
print(":".join(d for d in dirs if os.path.isdir(d)))
EOF
)
        export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    # What the bundle carries (build-gpu-bundle.sh --curand) comes last.
    if [[ -d "$bundle/lib" ]]; then
        carried=$(cd "$bundle/lib" && pwd)
        export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$carried"
    fi
    missing=$(ldd "$easel" | awk '/not found/ {print $1}' | tr '\n' ' ')
    if [[ -n "$missing" ]]; then
        die "$easel cannot start, missing: $missing(easel is built against CUDA 13: the torch venv's site-packages/nvidia/*/lib must hold these versions; else build the bundle with --curand for libcurand, or put a CUDA 13 toolkit's lib64 on LD_LIBRARY_PATH)"
    fi
fi

# --- fixtures -----------------------------------------------------------------
if [[ -z "$fixtures" ]]; then
    if [[ -d "$bundle/fixtures/models" ]]; then fixtures="$bundle/fixtures"
    else fixtures="$repo/tests/fixtures"; fi
fi
[[ -d "$fixtures/models" ]] || die "no fixtures at $fixtures (run from a checkout or pass --fixtures DIR)"
fixtures=$(cd "$fixtures" && pwd)
export EASEL_FIXTURES="$fixtures"

left() { echo $((budget - SECONDS)); }
# run_timed SECONDS LOG CMD...: CMD under a timeout capped by the budget left.
run_timed() {
    local cap=$1 logfile=$2 t
    shift 2
    t=$(left)
    ((t > cap)) && t=$cap
    if ((t < 20)); then
        echo "skipped: the ${budget}s budget is spent" > "$logfile"
        return 124
    fi
    timeout --kill-after=10 "$t" "$@" > "$logfile" 2>&1
}

# --- 1. parity ---------------------------------------------------------------
declare -a parity_rows=()
if [[ $parity == 1 ]]; then
    if [[ ! -x "$bundle/tests/parity" ]]; then
        log "no $bundle/tests/parity: parity skipped"
        parity_rows+=("| parity | missing executable | - |")
        failures=$((failures + 1))
    else
        device=cuda; [[ $dry == 1 ]] && device=cpu
        for precision in fp32 fp16; do
            log "parity tests on $device in $precision"
            logfile="$out/parity-$precision.log"
            filter=()
            # The dry run proves the plumbing on one case, not the suite.
            [[ $dry == 1 ]] && filter=(sd15_txt2img_euler --exact)
            EASEL_TEST_DEVICE=$device EASEL_TEST_PRECISION=$precision \
                run_timed 200 "$logfile" "$bundle/tests/parity" "${filter[@]}"
            rc=$?
            summary=$(grep -E '^test result:' "$logfile" | tail -1)
            [[ -z "$summary" ]] && summary="no result (exit $rc; see $(basename "$logfile"))"
            ((rc != 0)) && failures=$((failures + 1))
            parity_rows+=("| parity, $device, $precision | ${summary#test result: } | $rc |")
        done
    fi
    # --offload model|sequential: the same pixels as none, with the weights
    # really moving between RAM and the GPU.
    if [[ -x "$bundle/tests/offload" ]]; then
        device=cuda; [[ $dry == 1 ]] && device=cpu
        log "offload tests on $device in fp16"
        logfile="$out/offload.log"
        EASEL_TEST_DEVICE=$device EASEL_TEST_PRECISION=fp16 \
            run_timed 120 "$logfile" "$bundle/tests/offload"
        rc=$?
        summary=$(grep -E '^test result:' "$logfile" | tail -1)
        [[ -z "$summary" ]] && summary="no result (exit $rc; see $(basename "$logfile"))"
        ((rc != 0)) && failures=$((failures + 1))
        parity_rows+=("| offload none/model/sequential, $device, fp16 | ${summary#test result: } | $rc |")
    else
        log "no $bundle/tests/offload: offload tests skipped"
        parity_rows+=("| offload | missing executable | - |")
        failures=$((failures + 1))
    fi
fi

# --- diffusers ---------------------------------------------------------------
if [[ $diffusers == 1 && -n "$python" ]]; then
    if ! "$python" -c 'import diffusers, transformers' >/dev/null 2>&1; then
        [[ -d "$bundle/wheels" ]] || die "$python has no diffusers/transformers and $bundle/wheels is missing (build the bundle with --wheels)"
        venv="${TMPDIR:-/tmp}/easel-gpu-check-venv"
        log "installing the carried diffusers/transformers wheels into $venv (over $python's packages)"
        "$python" -m venv --system-site-packages "$venv" || die "cannot create $venv"
        "$venv/bin/pip" install --quiet --no-index --no-deps --find-links "$bundle/wheels" diffusers transformers \
            || die "cannot install the carried wheels"
        python="$venv/bin/python"
        err=$("$python" -c 'import diffusers, transformers' 2>&1) || die "diffusers still does not import: ${err##*$'\n'}"
    fi
    log "diffusers: $("$python" -c 'import diffusers, transformers; print(diffusers.__version__, "transformers", transformers.__version__)')"
fi

# --- 2. benchmarks -----------------------------------------------------------
# job: model folder, width=height, steps, easel precision, torch dtype, extra diffusers args
declare -A job_model job_size job_steps job_prec
if [[ $dry == 1 ]]; then
    job_model=([sd15]="$fixtures/models/tiny-sd15" [sdxl]="$fixtures/models/tiny-sdxl" [flux]="$fixtures/models/tiny-flux-schnell")
    job_size=([sd15]=64 [sdxl]=64 [flux]=64)
    job_steps=([sd15]=2 [sdxl]=2 [flux]=2)
    job_prec=([sd15]=fp32 [sdxl]=fp32 [flux]=fp32)
    device=cpu
else
    job_model=([sd15]="$bundle/bench-models/sd15" [sdxl]="$bundle/bench-models/sdxl" [flux]="$bundle/bench-models/flux-schnell")
    job_size=([sd15]=512 [sdxl]=1024 [flux]=1024)
    job_steps=([sd15]=25 [sdxl]=25 [flux]=4)
    job_prec=([sd15]=fp16 [sdxl]=fp16 [flux]=bf16)
    device=cuda
fi
declare -A torch_dtype=([fp16]=float16 [bf16]=bfloat16 [fp32]=float32)
# Older easel builds had no --device/--precision: allowed in the dry run only.
device_flags=1
if ! "$easel" bench --help 2>/dev/null | grep -q -- '--precision'; then
    [[ $dry == 1 ]] || die "$easel bench has no --device/--precision: rebuild the bundle from a newer checkout"
    device_flags=0
    log "$easel bench has no --device/--precision: the dry run goes without them"
fi

# sample_start / sample_stop: peak nvidia-smi memory.used (MiB) minus idle.
sampler=
sample_start() {
    [[ $dry == 1 ]] && return
    idle=$(gpu_mem)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 > "$1" 2>/dev/null &
    sampler=$!
}
sample_stop() {
    [[ $dry == 1 || -z "$sampler" ]] && { echo "-"; return; }
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; sampler=
    awk -v idle="$idle" 'BEGIN {m = idle} $1 + 0 > m {m = $1 + 0} END {printf "%.2f GiB", (m - idle) / 1024}' "$1"
}
# table_value FILE ROW: the value cell of `| ROW | value |` in easel's bench table.
# "?" where the row is missing (a changed bench table: see the log).
table_value() {
    local v
    v=$(awk -F'|' -v row="$2" '{gsub(/^ +| +$/, "", $2)} $2 == row {gsub(/^ +| +$/, "", $3); print $3; exit}' "$1")
    echo "${v:-?}"
}

declare -a bench_rows=()
for job in "${job_list[@]}"; do
    model=${job_model[$job]} size=${job_size[$job]} steps=${job_steps[$job]} prec=${job_prec[$job]}
    label="$job ${size}² ${steps} steps $prec"
    guidance=(--guidance-scale 7.5)
    [[ $job == flux ]] && guidance=()

    log "easel: $label"
    logfile="$out/easel-$job.log"
    placement=()
    ((device_flags)) && placement=(--device "$device" --precision "$prec")
    sample_start "$out/easel-$job.mem"
    run_timed 180 "$logfile" "$easel" bench --model "$model" --random-weights --offline \
        "${placement[@]}" --width "$size" --height "$size" --steps "$steps" \
        "${guidance[@]}" --runs 1 --no-peak
    rc=$?
    mem=$(sample_stop "$out/easel-$job.mem")
    if ((rc == 0)); then
        [[ $dry == 1 ]] && mem="$(table_value "$logfile" 'peak RSS') (RSS)"
        bench_rows+=("| $label | easel | $(table_value "$logfile" total) | $(table_value "$logfile" 'denoising step (mean)') | $mem | - |")
    else
        failures=$((failures + 1))
        bench_rows+=("| $label | easel | failed (exit $rc, easel-$job.log) | - | $mem | - |")
    fi

    [[ $diffusers == 1 && -n "$python" ]] || continue
    log "diffusers: $label"
    logfile="$out/diffusers-$job.log"
    extra=()
    [[ $job == flux ]] && extra=(--max-sequence-length 256)
    sample_start "$out/diffusers-$job.mem"
    run_timed 180 "$logfile" "$python" "$repo/tools/bench_diffusers.py" --model "$model" \
        --device "$device" --dtype "${torch_dtype[$prec]}" --width "$size" --height "$size" \
        --steps "$steps" "${guidance[@]}" "${extra[@]}" --runs 1 --threads "$(nproc)" \
        --json "$out/diffusers-$job.json"
    rc=$?
    mem=$(sample_stop "$out/diffusers-$job.mem")
    if ((rc == 0)); then
        row=$("$python" - "$out/diffusers-$job.json" "$mem" "$dry" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
gib = 1 << 30
mem, dry = sys.argv[2], sys.argv[3] == "1"
if dry:
    mem = f"{r['peak_rss_bytes'] / gib:.2f} GiB (RSS)"
alloc = f"{r['peak_allocated_bytes'] / gib:.2f} GiB" if "peak_allocated_bytes" in r else "-"
print(f"| {r['seconds_per_image']:.3f} | {r['seconds_per_step']:.3f} | {mem} | {alloc} |")
EOF
)
        bench_rows+=("| $label | diffusers | ${row#| }")
    else
        failures=$((failures + 1))
        bench_rows+=("| $label | diffusers | failed (exit $rc, diffusers-$job.log) | - | $mem | - |")
    fi
done

# --- 3. the table -------------------------------------------------------------
{
    echo "## gpu-check $(date -u +%F)"
    echo
    if [[ $dry == 1 ]]; then
        echo "**CPU dry run** (tiny fixture models, 64², 2 steps, fp32): proves the plumbing, times nothing of interest."
    else
        echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader -i 0);" \
            "easel $(head -1 "$bundle/BUILD.txt" 2>/dev/null || echo '(no BUILD.txt)');" \
            "random weights; one warm-up run, one timed run."
    fi
    echo
    if ((${#parity_rows[@]})); then
        echo "| parity tests | result | exit |"
        echo "| --- | --- | --- |"
        printf '%s\n' "${parity_rows[@]}"
        echo
    fi
    if [[ $dry == 1 ]]; then
        echo "| job | tool | s / image | s / step | peak memory (RSS) | torch peak allocated |"
    else
        echo "| job | tool | s / image | s / step | peak GPU memory (nvidia-smi, 200 ms samples, minus idle) | torch peak allocated |"
    fi
    echo "| --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${bench_rows[@]}"
    echo
    echo "Took ${SECONDS} s; logs in $out. Failures: $failures."
} | tee "$out/gpu-check.md"
((failures == 0))
