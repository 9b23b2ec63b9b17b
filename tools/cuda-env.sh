# shellcheck shell=bash
# Source this to build easel's `cuda` feature without a CUDA toolkit:
#
#     source tools/cuda-env.sh            # cargo check --features cuda
#     source tools/cuda-env.sh --link     # + a stub libcuda, for cargo build
#
# Installs (once, cached) NVIDIA's CUDA 13.0 wheels pinned in
# tools/cuda-requirements.txt into a virtual environment outside the
# repository, lays out a CUDA root from them (bin/nvcc, include, nvvm, lib)
# and exports PATH, CUDA_ROOT, CUDA_HOME and CUDA_COMPUTE_CAP (default 80:
# PTX the driver JIT-compiles on sm_80 and newer; 90 for H100/H200 only).
#
# `--link` also compiles a stub libcuda.so.1 into $CUDA_ROOT/lib/stubs and
# adds it to LIBRARY_PATH: libcuda comes with the NVIDIA driver, never with
# a wheel, and the final link of a `cuda` binary needs it. The stub is for
# linking only: every call in it fails with CUDA_ERROR_STUB_LIBRARY. Never
# ship it; the GPU machine's driver provides the real one.
#
# EASEL_CUDA_DIR overrides where the venv and the root go (default
# ${TMPDIR:-/tmp}/easel-cuda-<hash of the pins>, so new pins make a new one).

_easel_cuda_env() {
    local here req dir venv sp cu root link=0 cudarc f b
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    req="$here/cuda-requirements.txt"
    [[ "${1:-}" == "--link" ]] && link=1
    # Named after the pins (comments aside): new pins, a new venv.
    dir=${EASEL_CUDA_DIR:-${TMPDIR:-/tmp}/easel-cuda-$(grep -v '^#' "$req" | sha256sum | cut -c1-12)}
    venv="$dir/venv"
    root="$dir/root"
    if [[ ! -f "$venv/.easel-installed" ]]; then
        echo "cuda-env: installing the pinned CUDA wheels into $venv" >&2
        rm -rf "$venv"
        python3 -m venv "$venv" || return 1
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" || return 1
        touch "$venv/.easel-installed"
    fi
    sp=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    cu="$sp/nvidia/cu13"
    if [[ ! -x "$cu/bin/nvcc" ]]; then
        echo "cuda-env: no nvcc in $cu/bin (wrong wheels in $venv?)" >&2
        return 1
    fi
    if [[ ! -d "$root/lib" ]]; then
        mkdir -p "$root/lib"
        for f in bin include nvvm; do ln -sfn "$cu/$f" "$root/$f"; done
        # The wheels ship libX.so.N only; the linker looks for libX.so.
        for f in "$cu"/lib/*.so.*; do
            b=$(basename "$f")
            ln -sfn "$f" "$root/lib/$b"
            ln -sfn "$f" "$root/lib/${b%%.so.*}.so"
        done
    fi
    if [[ $link == 1 && ! -f "$root/lib/stubs/libcuda.so.1" ]]; then
        # One C function per driver entry point cudarc declares (its pinned
        # version, from Cargo.lock): each returns CUDA_ERROR_STUB_LIBRARY (34).
        cudarc=$(awk '/^name = "cudarc"$/ {getline; gsub(/[^0-9.]/, ""); print}' "$here/../Cargo.lock")
        cudarc=$(find "${CARGO_HOME:-$HOME/.cargo}"/registry/src -maxdepth 2 -type d \
            -name "cudarc-$cudarc" 2>/dev/null | head -1)
        if [[ -z "$cudarc" ]]; then
            echo "cuda-env: cudarc's sources are not in the cargo registry; run 'cargo fetch' first" >&2
            return 1
        fi
        mkdir -p "$root/lib/stubs"
        {
            echo '/* Link-time stand-in for the driver library; see tools/cuda-env.sh. */'
            echo 'static const char *N = "CUDA_ERROR_STUB_LIBRARY", *S = "stub libcuda: no NVIDIA driver";'
            echo 'int cuGetErrorName(int e, const char **p) { (void)e; if (p) *p = N; return 0; }'
            echo 'int cuGetErrorString(int e, const char **p) { (void)e; if (p) *p = S; return 0; }'
            grep -ohE '^ *pub (unsafe )?fn cu[A-Za-z0-9_]+' "$cudarc"/src/driver/sys/*.rs \
                | grep -oE 'cu[A-Za-z0-9_]+$' | sort -u | grep -vxE 'cuGetError(Name|String)' \
                | sed 's/.*/int &(void) { return 34; }/'
        } > "$root/lib/stubs/libcuda_stub.c"
        cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so.1" \
            "$root/lib/stubs/libcuda_stub.c" || return 1
        ln -sfn libcuda.so.1 "$root/lib/stubs/libcuda.so"
    fi
    export CUDA_ROOT="$root" CUDA_HOME="$root"
    export PATH="$root/bin:$PATH"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
    # Parallel nvcc jobs for candle's kernels: one per core.
    export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
    if [[ $link == 1 ]]; then
        export LIBRARY_PATH="$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
    fi
}
_easel_cuda_env "$@"
