"""Packaging that tells the truth: pyproject's ranges, the hashed locks `make setup` installs, the torch probe.

Two locks, one per torch flavour, both written by scripts/lock.sh (= make lock): requirements-cpu.lock (torch
2.13.0+cpu, what this CI image installs) and requirements-cuda.lock (torch 2.13.0 as PyPI serves it on Linux
x86-64, with nvidia-* and triton); requirements-gpu-kernels.lock holds the kernel sdists of `make setup-gpu`.
The fast tests read the files (and, for the installed lock's completeness, the installed packages' metadata)
and run scripts/torch_flavour.py on faked machines. The slow ones ask the package registry (PyPI only).
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
from packaging import tags
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from lab import PROJECT_ROOT

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
LOCKS = {flavour: PROJECT_ROOT / f"requirements-{flavour}.lock" for flavour in ("cpu", "cuda")}
KERNELS_LOCK = PROJECT_ROOT / "requirements-gpu-kernels.lock"
CONSTRAINTS = PROJECT_ROOT / "constraints.txt"
PROBE = PROJECT_ROOT / "scripts" / "torch_flavour.py"
TORCH_VERSION = Version("2.13.0")
# The platform the locks are compiled for (scripts/lock.sh: --python-platform x86_64-manylinux_2_28, --python-version 3.11).
LOCK_TARGET = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
               "os_name": "posix", "python_version": "3.11", "python_full_version": "3.11.0",
               "implementation_name": "cpython", "platform_python_implementation": "CPython"}
# Extras deliberately outside the locks, with the reason (pyproject.toml says the same).
LEFT_OUT_OF_LOCK = {"energy": "codecarbon brings nvidia-ml-py and a dozen packages nothing else needs"}
CUDA_PACKAGE = re.compile(r"^(nvidia-|cuda-|triton$|pytorch-triton)")


def parse_lock(text: str) -> dict[str, dict]:
    """name -> {"req", "hashes", "line"} for each entry of a pip requirements file with hashes."""
    entries: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():  # a new entry: "name==version \" (options may follow on the next lines)
            req = Requirement(line.rstrip("\\ ").split(" --hash")[0])
            current = {"req": req, "hashes": [], "line": line}
            entries[canonicalize_name(req.name)] = current
        current["hashes"] += re.findall(r"--hash=(\w+):([0-9a-f]+)", line)
    return entries


def pinned_version(entry: dict) -> Version:
    (spec,) = entry["req"].specifier
    assert spec.operator == "==", f"{entry['line']}: not an exact pin"
    return Version(spec.version)


def lock_header_args(text: str) -> list[str]:
    """The uv command scripts/lock.sh ran for this lock (its header's third line, after the script's name)."""
    command = next(line for line in text.splitlines() if line.startswith("#") and " pip compile " in line)
    return shlex.split(command.split(" pip compile ", 1)[1])


@pytest.fixture(scope="module")
def locks() -> dict[str, dict[str, dict]]:
    return {flavour: parse_lock(path.read_text()) for flavour, path in LOCKS.items()}


def locked_selection(flavour: str = "cpu") -> tuple[list[str], list[str]]:
    """The extras and dependency groups a lock was compiled with, read from its header."""
    args = lock_header_args(LOCKS[flavour].read_text())
    extras = [args[i + 1] for i, a in enumerate(args) if a == "--extra"]
    groups = [args[i + 1] for i, a in enumerate(args) if a == "--group"]
    return extras, groups


def top_level_requirements() -> list[Requirement]:
    extras, groups = locked_selection()
    project = PYPROJECT["project"]
    lines = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e]),
             *(r for g in groups for r in PYPROJECT["dependency-groups"][g])]
    return [Requirement(line) for line in lines]


def applies(req: Requirement, extra: str = "") -> bool:
    return req.marker is None or req.marker.evaluate({**LOCK_TARGET, "extra": extra})


@pytest.mark.parametrize("path", [*LOCKS.values(), KERNELS_LOCK], ids=lambda p: p.name)
def test_every_lock_entry_is_an_exact_pin_with_sha256_hashes(path):
    lock = parse_lock(path.read_text())
    assert len(lock) > (50 if path in LOCKS.values() else 3)
    for name, entry in lock.items():
        pinned_version(entry)
        assert entry["hashes"], f"{name}: no --hash in {path.name}"
        assert all(algo == "sha256" and len(digest) == 64 for algo, digest in entry["hashes"]), name


@pytest.mark.parametrize("path", [*LOCKS.values(), KERNELS_LOCK], ids=lambda p: p.name)
def test_each_lock_header_names_the_one_command_that_writes_it(path):
    header = path.read_text().splitlines()[:3]
    assert "scripts/lock.sh" in header[1] and "make lock" in header[1]
    args = lock_header_args(path.read_text())
    assert args[args.index("-o") + 1] == path.name
    assert "--generate-hashes" in args and "https://pypi.org/simple" in args
    # only the cpu lock may look beyond PyPI: at the folder holding the one +cpu wheel
    assert ("--find-links" in args) is (path == LOCKS["cpu"])


def test_the_old_single_lock_is_gone():
    assert not (PROJECT_ROOT / "requirements.lock").exists()


def test_the_cpu_lock_is_the_cpu_build_of_torch_and_nothing_from_cuda(locks):
    torch = pinned_version(locks["cpu"]["torch"])
    assert torch.public == str(TORCH_VERSION) and torch.local == "cpu"
    assert len(locks["cpu"]["torch"]["hashes"]) == 1, "the hash should admit the one +cpu file"
    assert not [name for name in locks["cpu"] if CUDA_PACKAGE.match(name)]


def test_the_cuda_lock_is_pypis_torch_with_its_nvidia_packages_and_triton(locks):
    cuda = locks["cuda"]
    assert pinned_version(cuda["torch"]) == TORCH_VERSION and pinned_version(cuda["torch"]).local is None
    assert "triton" in cuda
    assert len([name for name in cuda if name.startswith("nvidia-")]) >= 10


def test_both_locks_agree_on_every_package_they_share_except_torch(locks):
    cpu, cuda = locks["cpu"], locks["cuda"]
    differing = {name for name in set(cpu) & set(cuda) if pinned_version(cpu[name]) != pinned_version(cuda[name])}
    assert differing == {"torch"}
    assert set(cpu) - set(cuda) == set()
    assert {name for name in set(cuda) - set(cpu) if not CUDA_PACKAGE.match(name)} == set()


def test_both_locks_come_from_the_same_selection():
    assert locked_selection("cpu") == locked_selection("cuda")
    cpu_args, cuda_args = (lock_header_args(LOCKS[f].read_text()) for f in ("cpu", "cuda"))
    strip = lambda args: [a for i, a in enumerate(args) if a != "--find-links" and args[i - 1] != "--find-links"
                          and a not in ("requirements-cpu.lock", "requirements-cuda.lock")]
    assert strip(cpu_args) == strip(cuda_args)


def test_every_extra_is_in_the_locks_or_left_out_for_a_stated_reason():
    extras, groups = locked_selection()
    assert set(PYPROJECT["project"]["optional-dependencies"]) - set(extras) == set(LEFT_OUT_OF_LOCK)
    assert set(groups) == set(PYPROJECT["dependency-groups"])


def admits_without_pre(specifier: SpecifierSet, version: Version) -> bool:
    """pip without --pre: a range admits a pre-release only where one of its clauses names a pre-release."""
    names_a_pre = any(Version(clause.version).is_prerelease for clause in specifier if "*" not in clause.version)
    return specifier.contains(version, prereleases=names_a_pre)


@pytest.mark.parametrize("flavour", LOCKS)
def test_each_lock_holds_every_requirement_of_pyproject_within_its_range(locks, flavour):
    lock = locks[flavour]
    for req in top_level_requirements():
        if not applies(req):
            continue
        name = canonicalize_name(req.name)
        assert name in lock, f"pyproject.toml requires {req}; {LOCKS[flavour].name} lacks {name}"
        assert admits_without_pre(req.specifier, pinned_version(lock[name])), \
            f"{name}=={pinned_version(lock[name])} is outside pyproject.toml's {req.specifier or 'any'} (without --pre)"


def dependency_closure() -> dict[str, set[str]]:
    """Every package lab[locked extras] needs on the lock's platform, from the installed packages' metadata."""
    needed: dict[str, set[str]] = {}
    todo = [(req, "") for req in top_level_requirements()]
    while todo:
        req, extra = todo.pop()
        if not applies(req, extra):
            continue
        name = canonicalize_name(req.name)
        new_extras = set(req.extras) - needed.get(name, {"-"})
        if name in needed and not new_extras:
            continue
        needed.setdefault(name, set()).update(req.extras)
        for line in importlib.metadata.requires(name) or []:
            sub = Requirement(line)
            todo += [(sub, e) for e in ["", *req.extras]]
    return needed


def installed_flavour() -> str:
    """The lock this interpreter's packages came from: the torch build says which."""
    return "cpu" if Version(importlib.metadata.version("torch")).local == "cpu" else "cuda"


def test_the_installed_lock_is_exactly_the_installed_dependency_closure(locks):
    """The lock of the installed flavour against the installed metadata (the other flavour's torch pulls
    nvidia-*/triton, which the agreement test and the slow registry check cover)."""
    lock = locks[installed_flavour()]
    closure = dependency_closure()
    assert sorted(set(closure) - set(lock)) == [], "needed but not locked"
    assert sorted(set(lock) - set(closure)) == [], "locked but nothing needs it"
    drifted = {n: importlib.metadata.version(n) for n in lock
               if Version(importlib.metadata.version(n)) != pinned_version(lock[n])}
    assert drifted == {}, f"installed versions differ from {LOCKS[installed_flavour()].name}: run `make setup`"


def constraint_pins() -> list[Requirement]:
    return [Requirement(line) for line in CONSTRAINTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("flavour", LOCKS)
def test_constraints_pin_the_versions_of_both_locks(locks, flavour):
    pins = constraint_pins()
    assert {"torch", "transformers", "hydra-core", "lm-eval"} <= {canonicalize_name(p.name) for p in pins}
    for pin in pins:
        (spec,) = pin.specifier
        assert spec.operator == "==", pin
        # torch's pin names no build (==2.13.0 admits 2.13.0+cpu, PEP 440); every other pin is the lock's version
        locked = pinned_version(locks[flavour][canonicalize_name(pin.name)])
        assert pin.specifier.contains(locked) and locked.public == spec.version, (pin, locked)
    (torch_pin,) = [p for p in pins if p.name == "torch"]
    assert Version(next(iter(torch_pin.specifier)).version) == TORCH_VERSION


@pytest.mark.parametrize(("system", "machine", "expected"), [
    ("linux", "x86_64", True), ("linux", "aarch64", True), ("darwin", "arm64", True), ("darwin", "x86_64", True),
    ("win32", "AMD64", True), ("linux", "ppc64le", False), ("linux", "s390x", False), ("linux", "armv7l", False),
    ("win32", "ARM64", False),
])
def test_fastokens_marker_is_the_set_of_its_wheels(system, machine, expected):
    (line,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("fastokens")]
    marker: Marker = Requirement(line).marker
    assert marker.evaluate({"sys_platform": system, "platform_machine": machine}) is expected


def make_dry_run(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`make -n -B` of the given targets with .venv put under tmp_path (the probe itself runs: it holds $(MAKE))."""
    return subprocess.run(["make", "-n", "-B", "--no-print-directory", f"VENV={tmp_path / 'venv'}", *args],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def recipe_commands(output: str) -> list[str]:
    """make -n's output, one shell command a line (backslash-continued lines joined)."""
    return output.replace("\\\n", " ").splitlines()


def pip_installs(commands: list[str]) -> list[str]:
    return [c for c in commands if " -m pip install " in c]


@pytest.mark.parametrize("flavour", LOCKS)
def test_make_setup_installs_torch_first_then_its_lock_all_hash_checked(tmp_path, flavour):
    done = make_dry_run(tmp_path, "setup", env={"TORCH": flavour})
    assert done.returncode == 0, done.stderr
    commands = recipe_commands(done.stdout)
    assert f"setup: torch={flavour}: TORCH={flavour} was given" in commands
    installs = pip_installs(commands)
    # pip + setuptools, then torch alone, then the whole lock, then lab itself (-e ., no deps), in that order
    script = "\n".join(commands)
    steps = [f"-r {tmp_path / 'venv'}/bootstrap.lock", f"-r {tmp_path / 'venv'}/torch.lock",
             f"-r requirements-{flavour}.lock", " -e .", "pip check"]
    order = [script.index(step) for step in steps]
    assert order == sorted(order), steps
    assert script.count(" -m pip install ") == (5 if flavour == "cpu" else 4)  # cpu: a second source for torch
    # every pip install is hash-checked, but lab's own editable install (no deps: the lock brought them)
    pip_args = [re.split(r"&&|;|\n", part)[0] for part in script.split(" -m pip install ")[1:]]
    assert all(("--no-deps" in args) if " -e ." in args else ("--require-hashes" in args) for args in pip_args), pip_args
    assert "--no-deps --no-build-isolation -e ." in script
    # nothing unpinned is installed without hashes: no bare package names on any pip line
    assert not [c for c in installs if re.search(r"install( -\S+)* [a-z]\w*(==|$)", c)]
    other = "cuda" if flavour == "cpu" else "cpu"
    assert not [c for c in commands if f"requirements-{other}.lock" in c and "--clear" not in c]
    # the files the first two installs read, made by the rule's own commands
    (venv := tmp_path / "venv").mkdir()
    for extract in [c for c in commands if c.startswith("awk ")]:
        subprocess.run(["bash", "-c", extract], cwd=PROJECT_ROOT, check=True, timeout=60)
    assert sorted(parse_lock((venv / "bootstrap.lock").read_text())) == ["pip", "setuptools"]
    torch_only = parse_lock((venv / "torch.lock").read_text())
    assert sorted(torch_only) == ["torch"] and torch_only["torch"]["hashes"]
    assert pinned_version(torch_only["torch"]) == (Version("2.13.0+cpu") if flavour == "cpu" else TORCH_VERSION)


def test_the_cpu_route_tries_pips_own_sources_before_pytorchs_index_then_falls_back_to_cuda(tmp_path):
    done = make_dry_run(tmp_path, "setup", env={"TORCH": "cpu"})
    (attempts,) = [c for c in recipe_commands(done.stdout) if c.startswith("if ") and "torch.lock" in c]
    configured, cpu_index = attempts.index("pip install"), attempts.index("--index-url https://download.pytorch.org/whl/cpu")
    cpu_lock, fallback = attempts.index("-r requirements-cpu.lock"), attempts.index(".installed-cuda")
    assert configured < cpu_index < cpu_lock < fallback and "falling back to the cuda lock" in attempts
    # the fallback is the shell line's last word: nothing of the cpu lock runs after it
    assert attempts.rstrip().endswith("fi") and attempts.index("else ") < fallback and cpu_lock < attempts.index("else ")
    assert attempts.count("--index-url") == 1  # only that one line ever sees PyTorch's index


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "rocm"])
def test_make_setup_with_a_bad_torch_value_is_one_error_line(tmp_path, bad):
    done = make_dry_run(tmp_path, "setup", f"TORCH={bad}")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if not line.startswith("make")]
    assert len(errors) == 1 and errors[0].startswith(f"error: TORCH={bad!r} is not a torch flavour")
    assert " pip install " not in done.stdout


def run_probe(tmp_path: Path, *args: str, smi_exit: int | None = None, driver: bool = False,
              torch: str | None = None) -> subprocess.CompletedProcess:
    """scripts/torch_flavour.py on a faked machine: an nvidia-smi on PATH exiting with smi_exit (none if None),
    <root>/proc/driver/nvidia present if driver, TORCH=torch."""
    fake_bin, root = tmp_path / "bin", tmp_path / "root"
    fake_bin.mkdir(exist_ok=True)
    root.mkdir(exist_ok=True)
    if smi_exit is not None:
        smi = fake_bin / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)'\nexit {smi_exit}\n")
        smi.chmod(0o755)
    if driver:
        (root / "proc" / "driver" / "nvidia").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "TORCH"} | {"PATH": str(fake_bin)}
    if torch is not None:
        env["TORCH"] = torch
    return subprocess.run([sys.executable, str(PROBE), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize(("smi_exit", "driver", "torch", "flavour", "why"), [
    (None, False, None, "cpu", "no nvidia-smi on PATH"),
    (0, False, None, "cuda", "nvidia-smi lists 1 GPU(s), GPU 0: NVIDIA H100"),
    (9, False, None, "cpu", "nvidia-smi -L failed with exit status 9"),
    (9, True, None, "cuda", "/proc/driver/nvidia exists"),
    (None, True, None, "cuda", "/proc/driver/nvidia exists"),
    (None, False, "cuda", "cuda", "TORCH=cuda was given"),
    (0, True, "cpu", "cpu", "TORCH=cpu was given"),
    (0, False, "", "cuda", "nvidia-smi lists"),   # an empty TORCH is no choice
])
def test_the_probe_picks_the_flavour_of_a_faked_machine(tmp_path, smi_exit, driver, torch, flavour, why):
    done = run_probe(tmp_path, smi_exit=smi_exit, driver=driver, torch=torch)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith(f"torch={flavour}: ") and why in line, line
    assert done.stderr == ""


@pytest.mark.parametrize("bad", ["gpu", "CPU", "cu126"])
def test_the_probe_rejects_a_bad_torch_value_in_one_line(tmp_path, bad):
    done = run_probe(tmp_path, smi_exit=0, torch=bad)
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: TORCH={bad!r} is not a torch flavour") and "TORCH=cpu or TORCH=cuda" in line


@pytest.mark.parametrize(("smi_exit", "driver", "torch", "error"), [
    (None, False, None, "needs an NVIDIA GPU"),
    (3, False, "cuda", "needs an NVIDIA GPU"),     # TORCH=cuda does not make a GPU appear
    (0, False, "cpu", "TORCH=cpu asks for the CPU build"),
])
def test_the_probe_for_setup_gpu_stops_a_machine_without_a_gpu(tmp_path, smi_exit, driver, torch, error):
    done = run_probe(tmp_path, "--need-gpu", smi_exit=smi_exit, driver=driver, torch=torch)
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: make setup-gpu") and error in line


def test_the_probe_for_setup_gpu_passes_where_a_gpu_is(tmp_path):
    done = run_probe(tmp_path, "--need-gpu", smi_exit=0)
    assert done.returncode == 0 and done.stdout.startswith("torch=cuda: nvidia-smi lists 1 GPU(s)")


def test_the_probe_refuses_a_platform_the_locks_are_not_for():
    spec = importlib.util.spec_from_file_location("torch_flavour", PROBE)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    for system, machine in [("Darwin", "arm64"), ("Linux", "aarch64"), ("Windows", "AMD64")]:
        with pytest.raises(probe.ProbeError, match="the locks are for Linux x86-64"):
            probe.choose({}, Path("/nonexistent"), False, system, machine)
    assert probe.choose({"TORCH": "cpu"}, Path("/nonexistent"), False, "Linux", "x86_64") == ("cpu", "TORCH=cpu was given")


def test_make_setup_gpu_on_a_machine_without_a_gpu_stops_with_one_line(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    done = subprocess.run(["make", "--no-print-directory", f"VENV={tmp_path / 'venv'}", f"PYTHON={sys.executable}",
                           "setup-gpu"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}",
                               "LAB_PROBE_ROOT": str(tmp_path)})
    assert done.returncode != 0 and not (tmp_path / "venv").exists()
    errors = [line for line in done.stderr.splitlines() if not line.startswith("make")]
    assert len(errors) == 1 and errors[0].startswith("error: make setup-gpu needs an NVIDIA GPU"), done.stderr


def test_the_kernels_lock_is_what_build_gpu_kernels_sh_builds():
    kernels = parse_lock(KERNELS_LOCK.read_text())
    assert {"causal-conv1d", "mamba-ssm", "einops", "ninja"} == set(kernels)
    script = (PROJECT_ROOT / "scripts" / "build_gpu_kernels.sh").read_text()
    assert "--require-hashes" in script and "requirements-gpu-kernels.lock" in script
    # the build never fetches a prebuilt wheel from elsewhere: setup.py is told to compile
    assert "CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE" in script


def fresh_venv_dry_run(tmp_path: Path, *pip_args: str) -> dict:
    """`pip install --dry-run --ignore-installed` in a new venv (its own bundled pip); the resolved set."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    report = tmp_path / "report.json"
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--ignore-installed",
                           "--quiet", "--report", str(report), *pip_args],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


@pytest.mark.slow  # resolves ~100 packages against the registry (about a minute)
def test_pip_resolves_the_plain_ranges_without_pre(tmp_path):
    """`pip install .` as written: the ranges name the Hydra 1.4 release candidates, so no --pre is needed.
    Which torch build comes is not pyproject's to say (the CPU build is a local version, 2.13.0+cpu)."""
    resolved = fresh_venv_dry_run(tmp_path, ".")
    assert Version(resolved["hydra-optuna-sweeper"]) >= Version("1.4.0rc3")
    assert Version(resolved["optuna"]) >= Version("4.9") and "lab" in resolved


@pytest.mark.slow  # resolves ~160 packages against the registry (a minute or two)
def test_pip_resolves_every_extra_with_the_verified_pins(tmp_path, locks):
    """With constraints.txt (the verified pins) the whole locked selection resolves with pip's configuration.
    torch==2.13.0 admits both builds: where that configuration offers the +cpu file (here its find-links
    folder), pip takes it, being the higher version, and no nvidia-* comes; elsewhere PyPI's CUDA build does.
    (Versions the constraints leave open may be newer than the locks': the registry moves on, the locks do not.)"""
    extras, _ = locked_selection()
    resolved = fresh_venv_dry_run(tmp_path, "-c", str(CONSTRAINTS), f".[{','.join(extras)}]")
    torch = Version(resolved["torch"])
    assert torch.public == str(TORCH_VERSION)
    assert (torch.local == "cpu") is not any(CUDA_PACKAGE.match(name) for name in resolved)
    lock = locks["cpu" if torch.local == "cpu" else "cuda"]
    assert all(resolved[name] == str(pinned_version(lock[name])) for name in ("transformers", "hydra-core", "lm-eval"))


# What the registry check accepts as installable on the locks' target: CPython 3.11 on glibc 2.28 x86-64.
TARGET_PLATFORMS = [*(f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)),
                    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
TARGET_TAGS = {*tags.cpython_tags((3, 11), abis=["cp311", "abi3", "none"], platforms=TARGET_PLATFORMS),
               *tags.compatible_tags((3, 11), interpreter="cp311", platforms=TARGET_PLATFORMS)}
PYPI_SIMPLE = "https://pypi.org/simple"


def pypi_files(name: str) -> list[dict]:
    """Every file PyPI lists for a project (its simple API, JSON form, PEP 691): filename, hashes,
    requires-python, yanked. Index data only: nothing is downloaded but the listing."""
    request = urllib.request.Request(f"{PYPI_SIMPLE}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["files"]


def file_version(filename: str) -> Version | None:
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        return parse_sdist_filename(filename)[1]
    except (ValueError, InvalidVersion):  # an old or odd file name: not one of the locked files
        return None


def installable_on_target(file: dict) -> bool:
    filename = file["filename"]
    if filename.endswith(".whl") and not parse_wheel_filename(filename)[3] & TARGET_TAGS:
        return False
    requires_python = file.get("requires-python")
    return not requires_python or SpecifierSet(requires_python).contains("3.11.0")


def registry_problems(lock: dict[str, dict], listings: dict[str, list[dict]], skip: set[str] = frozenset()) -> dict:
    """name -> what is wrong with its pin on PyPI: the version missing, a locked hash that is no file of it,
    no locked file installable on the target, or a yanked one."""
    problems = {}
    for name, entry in lock.items():
        if name in skip:
            continue
        version = pinned_version(entry)
        files = [f for f in listings[name] if file_version(f["filename"]) == version]
        by_hash = {f["hashes"].get("sha256"): f for f in files}
        locked = [by_hash.get(digest) for _, digest in entry["hashes"]]
        if not files:
            problems[name] = f"{version} is not on PyPI"
        elif None in locked:
            problems[name] = f"{locked.count(None)} locked hash(es) of {version} are no file of it on PyPI"
        elif not any(installable_on_target(f) for f in locked):
            problems[name] = f"no locked file of {version} installs on CPython 3.11, manylinux_2_28 x86-64"
        elif any(f.get("yanked") for f in locked):
            problems[name] = f"{version} is yanked"
    return problems


@pytest.fixture(scope="module")
def pypi_listings(locks) -> dict[str, list[dict]]:
    names = sorted({*locks["cpu"], *locks["cuda"], *parse_lock(KERNELS_LOCK.read_text())})
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(pypi_files, names)))


@pytest.mark.slow  # ~190 index listings from PyPI (about half a minute); no package file is downloaded
def test_every_pin_of_the_cuda_and_kernel_locks_is_on_pypi_with_its_hashes(locks, pypi_listings):
    """Each pin's version and every one of its locked sha256 hashes are files on PyPI, one of them installable
    on the target platform, none yanked: against PyPI's own index data (pip is not used for this: with the
    configuration switched off, `pip install --dry-run --require-hashes --platform ...` of the cuda lock
    downloads every wheel to check its hash, torch and nvidia-* included, about 6 GB written for 183 packages,
    and so does a --dry-run without hashes, PEP 658 metadata notwithstanding)."""
    assert registry_problems(locks["cuda"], pypi_listings) == {}
    kernels = parse_lock(KERNELS_LOCK.read_text())
    assert registry_problems(kernels, pypi_listings) == {}
    # PyPI serves the kernels as sdists only: `make setup-gpu` compiles them (scripts/build_gpu_kernels.sh)
    for name in ("causal-conv1d", "mamba-ssm"):
        locked_files = {f["filename"] for f in pypi_listings[name] if file_version(f["filename"]) == pinned_version(kernels[name])}
        assert locked_files and all(filename.endswith(".tar.gz") for filename in locked_files), locked_files


@pytest.mark.slow  # shares the listings above
def test_every_pin_of_the_cpu_lock_but_torch_is_on_pypi_and_torch_is_the_cpu_build(locks, pypi_listings):
    """torch 2.13.0+cpu cannot be resolved from PyPI: PyPI refuses local versions (the "+cpu"), so PyTorch
    publishes that build on its own CPU index (https://download.pytorch.org/whl/cpu, which no test contacts).
    Its locked hash is the file in this image's /opt/wheels; that it matches PyTorch's index byte for byte is
    unverified from here. What can be checked: the public version 2.13.0 is on PyPI, and the locked file is none
    of PyPI's (which would be the CUDA build)."""
    assert registry_problems(locks["cpu"], pypi_listings, skip={"torch"}) == {}
    torch = locks["cpu"]["torch"]
    assert pinned_version(torch).local == "cpu"
    pypi_torch = [f for f in pypi_listings["torch"] if file_version(f["filename"]) == TORCH_VERSION]
    assert any(f["filename"].endswith("-cp311-cp311-manylinux_2_28_x86_64.whl") for f in pypi_torch)
    assert {digest for _, digest in torch["hashes"]}.isdisjoint(f["hashes"]["sha256"] for f in pypi_torch)
