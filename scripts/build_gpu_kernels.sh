#!/usr/bin/env bash
# Fused CUDA kernels for the SSM arch (causal-conv1d, mamba-ssm), built from source against the torch
# that is installed, for the GPU that is present. Neither package is needed on a CPU machine.
#
#   scripts/build_gpu_kernels.sh download [DIR]  # where PyPI is reachable: requirements-gpu-kernels.lock's files,
#                                                # hash-checked (kernel sdists, einops, ninja), + the pure-Python
#                                                # wheels lab.bench needs beyond a stock CUDA image
#   scripts/build_gpu_kernels.sh build [DIR]     # on the GPU machine, offline: compile wheels into DIR/built,
#                                                # install them and the carried wheels, then check
#   scripts/build_gpu_kernels.sh install [DIR]   # a later, fresh machine of the same kind: install DIR/built
#   scripts/build_gpu_kernels.sh check           # does a Mamba2 model take the fused path here?
#
# DIR defaults to .whl/ (git-ignored; carry it to the GPU machine). Environment:
#   PYTHON                  interpreter holding the CUDA torch (default: python3)
#   TORCH_CUDA_ARCH_LIST    archs to compile for (default: the visible GPU's, e.g. "9.0" on H100/H200)
#   MAX_JOBS                parallel compile jobs (default: cores / 4; nvcc runs 4 threads per job)
# The versions and sha256 hashes are requirements-gpu-kernels.lock's (PyPI serves only sdists of both
# kernels; scripts/lock.sh pins them). `make setup-gpu` runs download + build into the cuda .venv.
#
# Why it is done this way:
# - The packages' setup.py would download a prebuilt wheel from GitHub; offline that fails, so
#   *_FORCE_BUILD=TRUE compiles instead. setup.py imports torch: --no-build-isolation builds against the
#   installed CUDA torch (isolation would pull a CPU torch from PyPI).
# - setup.py hard-codes -gencode for ~9 archs (sm_75 ... sm_121); each multiplies the build time of the
#   selective-scan kernels. Only TORCH_CUDA_ARCH_LIST's archs are kept (torch adds those flags itself).
# - `import mamba_ssm` imports its compiled selective_scan_cuda, so MAMBA_SKIP_CUDA_BUILD cannot be used;
#   Mamba2's training path itself runs Triton kernels plus causal-conv1d's CUDA conv.
# - The wheels are installed with --no-deps: mamba-ssm lists torch, transformers, tilelang, quack-kernels;
#   none may be replaced, and the last two are optional imports (Mamba3 only).
# - transformers binds the kernels when modeling_mamba2 is imported (it tries `import mamba_ssm` once);
#   `check` runs in a fresh interpreter for that reason.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
CMD=${1:-}
DIR=${2:-${WHEELHOUSE:-$ROOT/.whl}}
PYTHON=${PYTHON:-python3}
KERNELS_LOCK=$ROOT/requirements-gpu-kernels.lock
locked_version() { sed -n "s/^$1==\([^ ]*\).*/\1/p" "$KERNELS_LOCK"; }
CAUSAL_CONV1D_VERSION=$(locked_version causal-conv1d)
MAMBA_SSM_VERSION=$(locked_version mamba-ssm)
# Pure-Python pins lab.bench needs that a stock CUDA image lacks (or has at another version).
BENCH_WHEELS=(transformers==5.23.0 hydra-core==1.4.0rc3 omegaconf==2.4.1rc1)

die() { echo "build_gpu_kernels: $*" >&2; exit 1; }
say() { echo "build_gpu_kernels: $*"; }

download() {
    mkdir -p "$DIR"
    # metadata generation runs setup.py; skipping its CUDA part lets it run without nvcc or a GPU
    # --require-hashes: every file must match the lock (the kernels exist on PyPI as sdists only)
    CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
        "$PYTHON" -m pip download --no-deps --require-hashes --no-build-isolation -d "$DIR" -r "$KERNELS_LOCK" \
        || die "could not fetch requirements-gpu-kernels.lock's files with their hashes from the package index"
    # the GPU image's python is 3.12; these are pure Python, so one wheel fits any platform
    "$PYTHON" -m pip download --no-deps --only-binary :all: --python-version 3.12 -d "$DIR" \
        "${BENCH_WHEELS[@]}"
    say "fetched into $DIR:"; ls -1 "$DIR"
}

cuda_facts() {
    "$PYTHON" - <<'EOF' || die "$PYTHON has no CUDA torch or sees no GPU"
import torch
assert torch.cuda.is_available() and torch.version.cuda, "no CUDA"
major, minor = torch.cuda.get_device_capability()
print(torch.__version__, torch.version.cuda, f"{major}.{minor}", torch.cuda.get_device_name())
EOF
}

# Keep only the target archs among a setup.py's hard-coded `-gencode arch=compute_XX,code=sm_XX` pairs.
restrict_archs() {
    "$PYTHON" - "$1" "$TORCH_CUDA_ARCH_LIST" <<'EOF'
import re, sys
path, wanted = sys.argv[1], {a.replace(".", "").rstrip("a") for a in re.split(r"[;\s]+", sys.argv[2]) if a}
source = open(path).read()
pair = re.compile(r'^([ \t]*)cc_flag\.append\("-gencode"\)\n[ \t]*cc_flag\.append\("arch=compute_(\d+)a?,code=sm_\d+a?"\)\n', re.M)
kept = []
def keep_or_drop(match):
    if match.group(2) in wanted:
        kept.append(match.group(2))
        return match.group(0)
    return f"{match.group(1)}pass  # sm_{match.group(2)} dropped by build_gpu_kernels.sh\n"
open(path, "w").write(pair.sub(keep_or_drop, source))
print(f"  {path}: hard-coded archs kept {kept or 'none'}; TORCH_CUDA_ARCH_LIST={sys.argv[2]!r} added by torch")
EOF
}

build() {
    command -v nvcc >/dev/null || die "nvcc not on PATH (the CUDA toolkit's compiler is needed)"
    read -r torch_version torch_cuda capability gpu_name < <(cuda_facts | tail -1) || true
    [ -n "${capability:-}" ] || die "could not read the GPU's compute capability"
    nvcc_cuda=$(nvcc --version | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p')
    [ "${nvcc_cuda%%.*}" = "${torch_cuda%%.*}" ] || \
        die "nvcc is CUDA $nvcc_cuda but torch was built with CUDA $torch_cuda: the extensions would not load"
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$capability}
    export MAX_JOBS=${MAX_JOBS:-$(( $(nproc) / 4 > 0 ? $(nproc) / 4 : 1 ))}
    export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE
    say "torch $torch_version (CUDA $torch_cuda), nvcc $nvcc_cuda, $gpu_name"
    say "compiling for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with MAX_JOBS=$MAX_JOBS"

    # ninja (parallel extension builds; without it torch compiles one file after another) and einops
    # (imported by mamba_ssm), fetched and hash-checked by `download`
    local helpers=("$DIR"/ninja-*.whl "$DIR"/einops-*.whl)
    [ -f "${helpers[0]}" ] && [ -f "${helpers[1]}" ] || die "no ninja/einops wheels in $DIR: run '$0 download' first"
    "$PYTHON" -m pip install -q --no-deps --no-index "${helpers[@]}"
    local work="$DIR/src" out="$DIR/built"
    rm -rf "$work"; mkdir -p "$work" "$out"
    for sdist in "$DIR/causal_conv1d-$CAUSAL_CONV1D_VERSION.tar.gz" "$DIR/mamba_ssm-$MAMBA_SSM_VERSION.tar.gz"; do
        [ -f "$sdist" ] || die "missing $sdist: run '$0 download' where PyPI is reachable, then carry $DIR"
        tar -xzf "$sdist" -C "$work"
        local src="$work/$(basename "$sdist" .tar.gz)"
        restrict_archs "$src/setup.py"
        say "compiling $(basename "$src") (several minutes; the log is $DIR/build.log)"
        "$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-index -w "$out" "$src" >>"$DIR/build.log" 2>&1 \
            || die "build of $(basename "$src") failed; see the end of $DIR/build.log"
        # mamba-ssm's setup imports nothing of causal-conv1d, but its import does: install as we go
        "$PYTHON" -m pip install --no-deps --no-index --force-reinstall "$out"/"$(basename "$src" | cut -d- -f1)"-*.whl
    done
    install_carried
    check
}

install_carried() {
    # the pure-Python wheels fetched by `download` (skipped where absent)
    local wheels=()
    for spec in "${BENCH_WHEELS[@]}" einops; do
        name=${spec%%==*}; name=${name//-/_}
        for w in "$DIR"/${name}-*.whl; do [ -f "$w" ] && wheels+=("$w"); done
    done
    [ ${#wheels[@]} -eq 0 ] || "$PYTHON" -m pip install --no-deps --no-index "${wheels[@]}"
}

install() {
    ls "$DIR"/built/*.whl >/dev/null 2>&1 || die "no built wheels in $DIR/built: run '$0 build' first"
    "$PYTHON" -m pip install --no-deps --no-index "$DIR"/built/*.whl
    install_carried
    check
}

check() {
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - <<'EOF'
import torch
from transformers import AutoModelForCausalLM, Mamba2Config
from lab.models.kernels import ssm_fast_path

if not torch.cuda.is_available():
    raise SystemExit("check: this torch sees no CUDA device; the kernels run on CUDA only")
config = Mamba2Config(hidden_size=256, expand=2, num_heads=8, head_dim=64, n_groups=1, state_size=64,
                      chunk_size=64, num_hidden_layers=2, vocab_size=512)
model = AutoModelForCausalLM.from_config(config).cuda()
report = ssm_fast_path(model)
print("ssm fast path:", report.ok, "-", report.reason)
tokens = torch.randint(0, 512, (2, 256), device="cuda")
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss = model(input_ids=tokens, labels=tokens).loss
loss.backward()
print(f"one training step on {torch.cuda.get_device_name()}: loss {loss.item():.4f}")
raise SystemExit(0 if report.ok else 1)
EOF
}

case "$CMD" in
    download) download ;;
    build) build ;;
    install) install ;;
    check) check ;;
    *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; [ -z "$CMD" ] && exit 0 || exit 2 ;;
esac
