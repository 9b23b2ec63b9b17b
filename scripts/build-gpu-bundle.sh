#!/usr/bin/env bash
# Build what scripts/gpu-check.sh runs on a GPU machine that has no Rust
# toolchain, and put it in one folder:
#
#   BUNDLE/bin/easel             release `easel` built with --features cuda
#   BUNDLE/tests/parity          the engine's fixture parity tests, same build
#   BUNDLE/tests/offload         --offload model|sequential give none's pixels
#   BUNDLE/bench-models/...      the real-size architectures' configs (no weights)
#   BUNDLE/wheels/               (--wheels) diffusers + transformers wheels
#   BUNDLE/fixtures/             (--fixtures) a copy of tests/fixtures
#   BUNDLE/lib/libcurand.so.10   (--curand) for GPU machines whose PyTorch
#                                has no nvidia-curand (about 100 MB)
#   BUNDLE/BUILD.txt             what was built, from which commit, how
#
# and BUNDLE.tar.gz of it (one file, to carry). The fixtures travel in the
# repository already; copy them only when the bundle goes without it.
#
# Usage: scripts/build-gpu-bundle.sh [--out DIR] [--bench-models DIR]
#            [--wheels] [--fixtures] [--cpu]
#   --out DIR           the bundle folder [default: gpu-bundle]
#   --bench-models DIR  where the bench-model configs are
#                       [default: $EASEL_BENCH_MODELS or ../shared/bench-models]
#   --wheels            also download diffusers/transformers wheels (pinned
#                       below) for machines whose PyTorch has no diffusers
#   --fixtures          also copy tests/fixtures into the bundle
#   --curand            also copy the wheels' libcurand.so.10 (easel cannot
#                       start without it; some PyTorch venvs lack it)
#   --cpu               build without --features cuda (to try gpu-check.sh's
#                       --cpu-dry-run on this machine)
#
# The cuda build needs nvcc: tools/cuda-env.sh --link installs NVIDIA's
# wheels and a link-time stub libcuda (never copied into the bundle). Its
# CARGO_TARGET_DIR is $EASEL_CUDA_TARGET [default: target/cuda], apart from
# the CPU builds'. First build: about 6 minutes of candle kernels (2 cores)
# plus the release build of easel.
set -euo pipefail
cd "$(dirname "$0")/.."

DIFFUSERS_VERSION=0.42.1
TRANSFORMERS_VERSION=5.23.0

out=gpu-bundle
bench_models=${EASEL_BENCH_MODELS:-../shared/bench-models}
wheels=0 fixtures=0 cuda=1 curand=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --out) out=$2; shift 2 ;;
        --bench-models) bench_models=$2; shift 2 ;;
        --wheels) wheels=1; shift ;;
        --fixtures) fixtures=1; shift ;;
        --curand) curand=1; shift ;;
        --cpu) cuda=0; shift ;;
        -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
        *) echo "build-gpu-bundle: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if [[ ! -f "$bench_models/sd15/model_index.json" ]]; then
    echo "build-gpu-bundle: no bench-models at '$bench_models' (sd15/model_index.json missing); pass --bench-models DIR" >&2
    exit 2
fi

features=()
if [[ $cuda == 1 ]]; then
    # shellcheck source=tools/cuda-env.sh
    source tools/cuda-env.sh --link
    export CARGO_TARGET_DIR=${EASEL_CUDA_TARGET:-$PWD/target/cuda}
    features=(--features cuda)
fi
target=${CARGO_TARGET_DIR:-target}

start=$SECONDS
cargo build --release -p easel-cli "${features[@]}"
# The parity and offload tests' executables: cargo prints their paths in
# the JSON messages.
executables=$(cargo test --release -p easel-diffusion "${features[@]}" --test parity --test offload \
    --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] in ("parity", "offload") and m.get("executable"):
        print(m["target"]["name"], m["executable"])
')
parity=$(awk '$1 == "parity" {print $2}' <<<"$executables")
offload=$(awk '$1 == "offload" {print $2}' <<<"$executables")
if [[ -z "$parity" || -z "$offload" ]]; then
    echo "build-gpu-bundle: cargo built no parity or offload test executable" >&2
    exit 1
fi
echo "build-gpu-bundle: built in $((SECONDS - start)) s" >&2

rm -rf "$out" "$out.tar.gz"
mkdir -p "$out/bin" "$out/tests" "$out/bench-models"
cp "$target/release/easel" "$out/bin/easel"
cp "$parity" "$out/tests/parity"
cp "$offload" "$out/tests/offload"
strip "$out/bin/easel" "$out/tests/parity" "$out/tests/offload" 2>/dev/null || true
for m in sd15 sdxl flux-schnell; do
    cp -rL "$bench_models/$m" "$out/bench-models/$m"
done
if [[ $fixtures == 1 ]]; then
    cp -rL tests/fixtures "$out/fixtures"
fi
# Copies of read-only sources (shared/) stay removable by the next build.
chmod -R u+w "$out"
if [[ $curand == 1 && $cuda == 1 ]]; then
    mkdir -p "$out/lib"
    cp -L "$CUDA_ROOT/lib/libcurand.so.10" "$out/lib/"
fi
if [[ $wheels == 1 ]]; then
    # Pure-Python wheels, without dependencies: the GPU machine's PyTorch
    # environment has most of them; gpu-check.sh installs these on top of it
    # and names any that are still missing.
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$out/wheels" \
        "diffusers==$DIFFUSERS_VERSION" "transformers==$TRANSFORMERS_VERSION"
fi
{
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%FT%TZ) on $(uname -m)"
    echo "features: ${features[*]:-(default: CPU only)}"
    [[ $cuda == 1 ]] && echo "CUDA: $(nvcc --version | tail -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
    echo "easel links against:"
    ldd "$out/bin/easel" | awk '{print "  " $1}' | grep -vE 'linux-vdso|ld-linux' || true
} > "$out/BUILD.txt"
tar -C "$(dirname "$out")" -czf "$out.tar.gz" "$(basename "$out")"
du -sh "$out" "$out.tar.gz" >&2
cat "$out/BUILD.txt" >&2
