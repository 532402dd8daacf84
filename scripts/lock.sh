#!/usr/bin/env bash
# Regenerates the hashed locks that `make setup` / `make setup-gpu` install (= `make lock`):
#
#   scripts/lock.sh            # all three locks
#   scripts/lock.sh cpu|cuda|gpu-kernels
#
#   requirements-cpu.lock          torch 2.13.0+cpu (the machine's wheel in CPU_WHEELS) + everything else from PyPI
#   requirements-cuda.lock         torch 2.13.0 as PyPI serves it on Linux x86-64 (nvidia-*, triton), PyPI only
#   requirements-gpu-kernels.lock  the sdists of causal-conv1d and mamba-ssm (PyPI has no wheels of them) + the
#                                  wheels their build and import need that the cuda lock lacks
#
# Inputs: pyproject.toml (ranges), constraints.txt (the verified pins), this file (the selection of extras and
# the kernel pins). Each lock is compiled with the previous locks as preferences, so an unchanged run
# reproduces them, and the cuda lock keeps the cpu lock's versions of every package the two share.
# Environment:
#   UV          a uv binary (default: uv $UV_VERSION installed from PyPI into ${TMPDIR:-/tmp}/lab-uv-$UV_VERSION)
#   CPU_WHEELS  folder holding torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl (default /opt/wheels,
#               where this CI image keeps it; elsewhere download it from PyTorch's CPU index yourself)
set -euo pipefail

cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
CPU_WHEELS=${CPU_WHEELS:-/opt/wheels}
PYPI=https://pypi.org/simple
EXTRAS=(--extra cluster --extra eval --extra test --group setup)   # `energy` is left out: see pyproject.toml
# Target of every lock: what `make setup` runs on (Linux x86-64, glibc 2.28+, CPython 3.11).
TARGET=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
# The kernels' versions (scripts/build_gpu_kernels.sh reads them back from the lock) and what they need beside
# the cuda lock: einops (imported by mamba_ssm), ninja (torch's extension builder; without it a serial build).
KERNEL_PINS=(causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1 einops==0.8.2 ninja==1.13.2)

die() { echo "error: lock.sh: $*" >&2; exit 1; }

# uv must not pick up a user's index, find-links or constraints: the locks name PyPI and this repo's files only.
for var in $(compgen -e | grep '^UV_' || true); do unset "$var"; done

if [ -z "${UV:-}" ]; then
    uv_venv=${TMPDIR:-/tmp}/lab-uv-$UV_VERSION
    [ -x "$uv_venv/bin/uv" ] || { python3 -m venv "$uv_venv" && "$uv_venv/bin/python" -m pip install -q "uv==$UV_VERSION"; } \
        || die "could not install uv==$UV_VERSION from PyPI into $uv_venv"
    UV=$uv_venv/bin/uv
fi
"$UV" --version | grep -q " $UV_VERSION" || echo "lock.sh: warning: $("$UV" --version) is not uv $UV_VERSION; the output may differ"

torch_pin=$(grep -E '^torch==' constraints.txt) || die "constraints.txt has no torch== line"
torch_version=${torch_pin#torch==}

# compile FLAVOUR OUTPUT ARGS...: uv pip compile with the header naming this script and, below it, the exact
# uv command (tests/test_packaging.py reads the extras from it).
compile() {
    local flavour=$1 out=$2; shift 2
    local args=(--generate-hashes "${TARGET[@]}" --no-config --default-index "$PYPI" "$@" -o "$out")
    "$UV" pip compile -q --custom-compile-command "scripts/lock.sh  (= make lock)" "${args[@]}"
    local shown=("${args[@]}")
    sed -i "2a #    flavour $flavour: uv $UV_VERSION pip compile ${shown[*]}" "$out"
}

# Seed OUTPUT with the entries of BASE (as uv's preferences), plus OUTPUT's own entries that BASE lacks,
# so shared packages follow BASE and the rest keep their previous pins.
seed_preferences() {
    python3 - "$1" "$2" <<'EOF'
import re, sys
from pathlib import Path
base, out = map(Path, sys.argv[1:])
def entries(path):
    blocks, name = {}, None
    for line in path.read_text().splitlines() if path.exists() else []:
        if re.match(r"[A-Za-z0-9]", line):
            name = re.split(r"[=\[ ;]", line, maxsplit=1)[0].lower().replace("_", "-")
            blocks[name] = []
        if name:
            blocks[name].append(line)
    return blocks
own, shared = entries(out), entries(base)
merged = {**{n: b for n, b in own.items() if n not in shared}, **{n: b for n, b in shared.items() if n != "torch"}}
if "torch" in own:
    merged["torch"] = own["torch"]
out.write_text("".join(line + "\n" for name in sorted(merged) for line in merged[name]))
EOF
}

lock_cpu() {
    local wheel=$CPU_WHEELS/torch-$torch_version+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    [ -f "$wheel" ] || die "no $wheel: set CPU_WHEELS to a folder holding PyTorch's CPU build of torch $torch_version"
    # torch==X in constraints.txt admits X+cpu (PEP 440 ignores a local label when the pin has none); uv takes the
    # +cpu file from CPU_WHEELS, being the higher version. Checked below, never assumed.
    compile cpu requirements-cpu.lock pyproject.toml "${EXTRAS[@]}" -c constraints.txt --find-links "$CPU_WHEELS"
    grep -q "^torch==$torch_version+cpu " requirements-cpu.lock || die "requirements-cpu.lock did not get torch $torch_version+cpu"
    echo "lock.sh: wrote requirements-cpu.lock ($(grep -c '^[a-z]' requirements-cpu.lock) packages)"
}

lock_cuda() {
    [ -f requirements-cpu.lock ] || die "requirements-cpu.lock is missing: run scripts/lock.sh cpu first"
    seed_preferences requirements-cpu.lock requirements-cuda.lock
    compile cuda requirements-cuda.lock pyproject.toml "${EXTRAS[@]}" -c constraints.txt
    grep -q "^torch==$torch_version " requirements-cuda.lock || die "requirements-cuda.lock did not get PyPI's torch $torch_version"
    grep -q '^triton==' requirements-cuda.lock || die "requirements-cuda.lock has no triton: not the CUDA build of torch?"
    echo "lock.sh: wrote requirements-cuda.lock ($(grep -c '^[a-z]' requirements-cuda.lock) packages)"
}

lock_gpu_kernels() {
    # --no-deps: their own requirement lists name torch, transformers and Mamba3-only packages that must not
    # replace the cuda lock's (build_gpu_kernels.sh installs them with --no-deps for the same reason).
    # the pins come on standard input ("-"): KERNEL_PINS above is their one home
    printf '%s\n' "${KERNEL_PINS[@]}" | compile gpu-kernels requirements-gpu-kernels.lock - --no-deps
    sed -i '3s|$|   ("-" is standard input: KERNEL_PINS in scripts/lock.sh)|' requirements-gpu-kernels.lock
    echo "lock.sh: wrote requirements-gpu-kernels.lock (${KERNEL_PINS[*]})"
}

case "${1:-all}" in
    cpu) lock_cpu ;;
    cuda) lock_cuda ;;
    gpu-kernels) lock_gpu_kernels ;;
    all) lock_cpu; lock_cuda; lock_gpu_kernels ;;
    *) die "unknown lock '$1' (cpu, cuda, gpu-kernels or nothing for all)" ;;
esac
