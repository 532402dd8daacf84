"""Packaging that tells the truth: pyproject's ranges, the hashed lock `make setup` installs, the CPU torch.

The fast tests read the files (and, for the lock's completeness, the installed packages' own metadata).
The slow ones resolve `pip install --dry-run .` in a fresh virtual environment against the package registry.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from lab import PROJECT_ROOT

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
LOCK = PROJECT_ROOT / "requirements.lock"
CONSTRAINTS = PROJECT_ROOT / "constraints.txt"
# The platform the lock is compiled for (its header: --python-platform x86_64-manylinux_2_28, --python-version 3.11).
LOCK_TARGET = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
               "os_name": "posix", "python_version": "3.11", "python_full_version": "3.11.0",
               "implementation_name": "cpython", "platform_python_implementation": "CPython"}
# Extras deliberately outside the lock, with the reason (pyproject.toml says the same).
LEFT_OUT_OF_LOCK = {"energy": "codecarbon brings nvidia-ml-py and a dozen packages nothing else needs"}
CUDA_PACKAGE = re.compile(r"^(nvidia-|cuda-|triton$|pytorch-triton)")


def parse_lock(text: str) -> dict[str, dict]:
    """name -> {"version", "hashes", "line"} for each entry of a pip requirements file with hashes."""
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
    command = next(line for line in text.splitlines() if "uv pip compile" in line)
    return shlex.split(command.lstrip("# "))


@pytest.fixture(scope="module")
def lock() -> dict[str, dict]:
    return parse_lock(LOCK.read_text())


def locked_selection() -> tuple[list[str], list[str]]:
    """The extras and dependency groups the lock was compiled with, read from its header."""
    args = lock_header_args(LOCK.read_text())
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


def test_every_lock_entry_is_an_exact_pin_with_sha256_hashes(lock):
    assert len(lock) > 50
    for name, entry in lock.items():
        pinned_version(entry)
        assert entry["hashes"], f"{name}: no --hash in requirements.lock"
        assert all(algo == "sha256" and len(digest) == 64 for algo, digest in entry["hashes"]), name


def test_the_lock_is_the_cpu_build_of_torch_and_nothing_from_cuda(lock):
    assert pinned_version(lock["torch"]).local == "cpu"
    assert not [name for name in lock if CUDA_PACKAGE.match(name)]


def test_every_extra_is_in_the_lock_or_left_out_for_a_stated_reason():
    extras, groups = locked_selection()
    assert set(PYPROJECT["project"]["optional-dependencies"]) - set(extras) == set(LEFT_OUT_OF_LOCK)
    assert set(groups) == set(PYPROJECT["dependency-groups"])


def admits_without_pre(specifier: SpecifierSet, version: Version) -> bool:
    """pip without --pre: a range admits a pre-release only where one of its clauses names a pre-release."""
    names_a_pre = any(Version(clause.version).is_prerelease for clause in specifier if "*" not in clause.version)
    return specifier.contains(version, prereleases=names_a_pre)


def test_the_lock_holds_every_requirement_of_pyproject_within_its_range(lock):
    for req in top_level_requirements():
        if not applies(req):
            continue
        name = canonicalize_name(req.name)
        assert name in lock, f"pyproject.toml requires {req}; requirements.lock lacks {name}"
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


def test_the_lock_is_exactly_the_installed_dependency_closure(lock):
    closure = dependency_closure()
    assert sorted(set(closure) - set(lock)) == [], "needed but not locked"
    assert sorted(set(lock) - set(closure)) == [], "locked but nothing needs it"
    drifted = {n: importlib.metadata.version(n) for n in lock
               if Version(importlib.metadata.version(n)) != pinned_version(lock[n])}
    assert drifted == {}, "installed versions differ from requirements.lock: run `make setup`"


def test_constraints_pin_the_same_versions_as_the_lock(lock):
    pins = [Requirement(line) for line in CONSTRAINTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert {"torch", "transformers", "hydra-core", "lm-eval"} <= {canonicalize_name(p.name) for p in pins}
    for pin in pins:
        assert pinned_version(lock[canonicalize_name(pin.name)]) == Version(next(iter(pin.specifier)).version), pin


@pytest.mark.parametrize(("system", "machine", "expected"), [
    ("linux", "x86_64", True), ("linux", "aarch64", True), ("darwin", "arm64", True), ("darwin", "x86_64", True),
    ("win32", "AMD64", True), ("linux", "ppc64le", False), ("linux", "s390x", False), ("linux", "armv7l", False),
    ("win32", "ARM64", False),
])
def test_fastokens_marker_is_the_set_of_its_wheels(system, machine, expected):
    (line,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("fastokens")]
    marker: Marker = Requirement(line).marker
    assert marker.evaluate({"sys_platform": system, "platform_machine": machine}) is expected


def make_setup_commands(venv: Path) -> list[str]:
    done = subprocess.run(["make", "-n", "-B", f"VENV={venv}", "setup"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_make_setup_installs_torch_first_then_the_lock_all_hash_checked(tmp_path):
    venv = tmp_path / "venv"
    commands = make_setup_commands(venv)
    installs = [c for c in commands if " -m pip install " in c]
    assert len(installs) == 3
    assert all("--require-hashes" in c for c in installs[:2]) and "requirements.lock" in installs[1]
    assert "--no-deps" in installs[2] and "-e ." in installs[2]
    # nothing unpinned is installed without hashes: no bare package names on any pip line
    assert not [c for c in installs if re.search(r"install( -\S+)* [a-z]\w*(==|$)", c)]
    # the first install's file, made by the rule's own command: only the installer, the build backend and torch
    (extract,) = [c for c in commands if c.startswith("awk ")]
    venv.mkdir()
    subprocess.run(["bash", "-c", extract], cwd=PROJECT_ROOT, check=True, timeout=60)
    first = parse_lock((venv / "first.lock").read_text())
    assert sorted(first) == ["pip", "setuptools", "torch"]
    assert pinned_version(first["torch"]) == Version("2.13.0+cpu") and first["torch"]["hashes"]


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
def test_pip_resolves_every_extra_with_the_verified_pins_to_the_cpu_torch(tmp_path, lock):
    """With constraints.txt (the verified pins; torch==2.13.0+cpu) the whole locked selection resolves
    on the CPU build of torch with no nvidia-* package. (Versions the constraints leave open may be newer
    than the lock's: the registry moves on, the lock does not.)"""
    extras, _ = locked_selection()
    resolved = fresh_venv_dry_run(tmp_path, "-c", str(CONSTRAINTS), f".[{','.join(extras)}]")
    assert resolved["torch"] == "2.13.0+cpu"
    assert not [name for name in resolved if CUDA_PACKAGE.match(name)]
    assert all(resolved[name] == str(pinned_version(lock[name])) for name in ("transformers", "hydra-core", "lm-eval"))
