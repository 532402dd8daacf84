"""A prepared folder changes as a whole, and training checks it is what its manifest says.

Re-preparing builds the new data in a hidden sibling folder (`.<name>.staging-<id>`), seeded with hard links
of the published outputs so unchanged steps are reused without copying, and swaps it in only once its
manifest is written: until then the published folder is entirely the old data (tokenizer included), and a
crash or a full disk halfway leaves it usable. Every writer replaces files by rename (lab/data/steps.py
atomic_path), so a hard link in the staging folder never changes the published copy.

Before training, `verify_prepared` checks each packed file's size against the manifest (always, cheap) and
the sha256 of every file the manifest lists when asked, or in `auto` when the folder changed since the last
full check (stamp: verified.json).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from lab import LabError
from lab.data.steps import sha256_file, write_json_atomic

log = logging.getLogger(__name__)

STAGING_MARK = ".staging-"
OLD_MARK = ".old-"
VERIFIED_FILE = "verified.json"
VERIFY_MODES = ("auto", "sizes", "full")
# What is not published data: the step cache (moved, not linked), the lock, the stamps.
_NOT_PUBLISHED = {".work", ".lock", "manifest.json", VERIFIED_FILE}


def lock_path(prepared_dir: Path) -> Path:
    """The lock sits beside the folder, not in it: the folder itself is swapped."""
    return prepared_dir.parent / f".{prepared_dir.name}.lock"


def _siblings(prepared_dir: Path, mark: str) -> list[Path]:
    found = prepared_dir.parent.glob(f".{prepared_dir.name}{mark}*")
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def restore_interrupted_swap(prepared_dir: Path) -> None:
    """A crash between the two renames of a swap (no renameat2 here) leaves the old folder aside: put it back."""
    olds = _siblings(prepared_dir, OLD_MARK)
    if olds and not prepared_dir.exists():
        log.warning("restoring %s from %s (a re-prepare was interrupted while swapping folders)", prepared_dir, olds[0])
        os.rename(olds[0], prepared_dir)
        olds = olds[1:]
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def begin_staging(prepared_dir: Path, work_dir: Path) -> Path:
    """The folder this run builds in: a stale one of a killed run (its finished steps are kept), else a new one,
    seeded with hard links of the published outputs; the step cache moves along when it lives in the folder."""
    prepared_dir.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swap(prepared_dir)
    stale = _siblings(prepared_dir, STAGING_MARK)
    for extra in stale[1:]:
        shutil.rmtree(extra, ignore_errors=True)
    staging = stale[0] if stale else prepared_dir.parent / f".{prepared_dir.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}"
    staging.mkdir(exist_ok=True)
    (staging / "manifest.json").unlink(missing_ok=True)  # it is published only with the swap
    if prepared_dir.is_dir():
        _link_tree(prepared_dir, staging)
        if _inside(work_dir, prepared_dir):
            old_work = work_dir
            new_work = staging / work_dir.relative_to(prepared_dir)
            if old_work.is_dir() and not new_work.exists():
                new_work.parent.mkdir(parents=True, exist_ok=True)
                os.rename(old_work, new_work)
    return staging


def staged_path(path: Path, prepared_dir: Path, staging: Path) -> Path:
    """Where a path inside the prepared folder lives while this run builds (paths outside stay put)."""
    return staging / path.relative_to(prepared_dir) if _inside(path, prepared_dir) else path


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _link_tree(source: Path, target: Path) -> None:
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if relative.parts[0] in _NOT_PUBLISHED or not path.is_file():
            continue
        destination = target / relative
        if destination.exists():
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:  # a filesystem without hard links: copy (slower, same result)
            shutil.copy2(path, destination)


def publish(staging: Path, prepared_dir: Path) -> None:
    """Swap the finished staging folder in for the published one in one step, then drop the old data."""
    if not prepared_dir.exists():
        os.rename(staging, prepared_dir)
        return
    if _exchange(staging, prepared_dir):
        old = staging  # after the exchange the staging name holds the old data
    else:
        old = prepared_dir.parent / f".{prepared_dir.name}{OLD_MARK}{uuid.uuid4().hex[:8]}"
        os.rename(prepared_dir, old)
        os.rename(staging, prepared_dir)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE): both names swap atomically. False where it is not available."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


# -- verification before training ------------------------------------------------------------------------------


def expected_bytes(manifest: dict[str, Any], split: dict[str, Any]) -> int:
    return int(split["blocks"]) * int(manifest["seq_len"]) * np.dtype(manifest["dtype"]).itemsize


def _file_state(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def verify_prepared(prepared_dir: Path, mode: str, fix_hint: str) -> str:
    """Check prepared data against its manifest; returns what was checked ("sizes" or "full").

    sizes: every packed file exists with the size its block count gives (and the tokenizer exists);
    full: also the sha256 of every file the manifest lists. auto: full when the manifest or a file changed
    since the last full check (verified.json), else sizes. A mismatch is one LabError line with `fix_hint`.
    """
    if mode not in VERIFY_MODES:
        raise LabError(f"data.verify={mode!r} is not allowed: expected one of {', '.join(VERIFY_MODES)}")
    manifest_path = prepared_dir / "manifest.json"
    try:
        manifest_bytes = manifest_path.read_bytes()
        manifest = json.loads(manifest_bytes)
        splits = [(name, split_name, relative_file(split["file"]), expected_bytes(manifest, split))
                  for name, source in manifest["sources"].items() for split_name, split in source["splits"].items()]
        files = {relative_file(rel): sha for rel, sha in _recorded_hashes(manifest).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise LabError(f"{manifest_path} cannot be read as a manifest ({type(err).__name__}: {err}); "
                       f"{fix_hint}") from None

    def damaged(what: str) -> LabError:
        return LabError(f"prepared data at {prepared_dir} is damaged: {what}. Nothing was trained; {fix_hint}")

    for name, split_name, rel, want in splits:
        state = _file_state(prepared_dir / rel)
        if state is None:
            raise damaged(f"{rel} is missing (source {name!r}, split {split_name!r})")
        if state[0] != want:
            raise damaged(f"{rel} has {state[0]:,} bytes, the manifest says {want:,}")
    if not (prepared_dir / "tokenizer" / "tokenizer.json").is_file():
        raise damaged("tokenizer/tokenizer.json is missing")

    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    states = {rel: _file_state(prepared_dir / rel) for rel in files}
    if mode == "sizes":
        return "sizes"
    if mode == "auto" and _stamp_matches(prepared_dir, manifest_sha, states):
        return "sizes"
    for rel, want in files.items():
        try:
            got = sha256_file(prepared_dir / rel) if states[rel] is not None else None
        except OSError as err:
            raise damaged(f"{rel} cannot be read ({err.strerror or err})") from None
        if got != want:
            raise damaged(f"{rel} " + ("is missing" if got is None else f"has sha256 {got[:12]}…, the manifest "
                                       f"records {str(want)[:12]}…"))
    with contextlib.suppress(OSError):  # a read-only folder is verified each time instead
        write_json_atomic(prepared_dir / VERIFIED_FILE, {"manifest_sha256": manifest_sha, "files": states,
                                                         "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return "full"


def relative_file(rel: Any) -> str:
    """A path the manifest names: inside the prepared folder, never absolute or climbing out (a copied folder
    must not point training at other files)."""
    parts = Path(str(rel)).parts
    if not isinstance(rel, str) or not parts or Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"file {rel!r} is not a path inside the prepared folder")
    return rel


def _recorded_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """Every sha256 the manifest records: its `files`, each split's and the tokenizer's (an older manifest may
    lack `files`). Two records of one file that disagree mean an edited manifest: the file cannot match both."""
    recorded = [(rel, str(sha)) for rel, sha in (manifest.get("files") or {}).items()]
    recorded += [(split["file"], str(split["sha256"])) for source in manifest["sources"].values()
                 for split in source["splits"].values() if split.get("sha256")]
    if manifest.get("tokenizer_sha256"):
        recorded.append(("tokenizer/tokenizer.json", str(manifest["tokenizer_sha256"])))
    files: dict[str, str] = {}
    for rel, sha in recorded:
        if files.setdefault(rel, sha) != sha:
            raise ValueError(f"two different sha256 recorded for {rel}")
    return files


def _stamp_matches(prepared_dir: Path, manifest_sha: str, states: dict[str, Any]) -> bool:
    try:
        stamp = json.loads((prepared_dir / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("manifest_sha256") == manifest_sha and stamp.get("files") == states
