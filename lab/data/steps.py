"""Resumable steps: fingerprints, done-markers, atomic writes, the run lock and test crash points.

Every step writes its outputs under temporary names and renames them into place, then writes a
done-marker holding the fingerprint of everything it depends on (inputs, config, upstream
fingerprints). A re-run whose fingerprint matches reuses the output; a crash at any point (even
SIGKILL) leaves either nothing or a complete output, so the next run redoes only what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any, Iterator

from lab import LabError

log = logging.getLogger(__name__)

# Bump when a change in the code alters what a step writes, so old work is not reused.
PIPELINE_VERSION = 1
TMP_MARK = ".tmp-"


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps([PIPELINE_VERSION, *parts], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_stamp(path: Path) -> list[Any]:
    """What identifies an input file without reading it: name, size and modification time.

    Hashing 20 GB of input on every run would cost minutes; size + mtime_ns catches edits and
    replacements (the same trade-off make and rsync make).
    """
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tmp_path(path: Path) -> Path:
    """A sibling temporary name, unique per writer, cleaned up by `remove_stale_tmp`."""
    return path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path (file or folder) that replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # a folder cannot be replaced by rename; a crash here redoes the step
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk (matters for power loss, not kill -9).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_tmp(root: Path) -> None:
    """Delete temporaries a killed run left behind (no run holds the lock, so none is in use)."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob(f"*{TMP_MARK}*"), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


class StepStore:
    """Done-markers of the steps of one prepared folder: `<work>/<step>.done.json`."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir

    def marker(self, step: str) -> Path:
        return self.work_dir / f"{step}.done.json"

    def load(self, step: str, fp: str) -> dict[str, Any] | None:
        """The result a finished step recorded, if it was run with fingerprint `fp`."""
        path = self.marker(step)
        if not path.is_file():
            return None
        try:
            done = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return done.get("result") if done.get("fingerprint") == fp else None

    def save(self, step: str, fp: str, result: dict[str, Any]) -> None:
        write_json_atomic(self.marker(step), {"step": step, "fingerprint": fp, "result": result})

    def fingerprint_of(self, step: str) -> str | None:
        """The fingerprint a step finished with (None if it has not finished)."""
        path = self.marker(step)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text()).get("fingerprint")
        except json.JSONDecodeError:
            return None

    def invalidate(self, step: str) -> None:
        self.marker(step).unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(lock_file: Path, folder: Path) -> Iterator[None]:
    """One lab.prepare per prepared folder at a time (two would rename over each other's work)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise LabError(f"another lab.prepare is writing {folder}; wait for it or choose another "
                       "data.prepared_dir") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


# Tests simulate `kill -9` mid-step: LAB_PREPARE_KILL_AT=<point>[:<n>] SIGKILLs this process the
# n-th time (default 1st) it passes the named point, e.g. `scan.shard:2` or `pack.part`.
_KILL_ENV = "LAB_PREPARE_KILL_AT"
_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(_KILL_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(nth or 1):
        log.warning("%s=%s: killing this process with SIGKILL", _KILL_ENV, spec)
        os.kill(os.getpid(), signal.SIGKILL)
