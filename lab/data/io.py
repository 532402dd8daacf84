"""Reading the raw corpus, streaming: JSONL (.jsonl, .jsonl.gz, .jsonl.zst) and folders of .txt.

Readers yield `RawRecord`s (bytes plus where they came from) and never hold more than one record;
parsing happens in the scan workers. Anything wrong with the input becomes a counted, located
record with a short reason code, never an exception; only a missing path is an error (LabError).
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, NamedTuple

import zstandard

from lab import LabError
from lab.config.checks import choice, number, optional, text

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
KINDS = ("jsonl", "txt_dir")


def clean_path(value: Any) -> Path:
    """Absolute, with `..` and `.` resolved (not symlinks): the same files always get the same name,
    so a relative and an absolute spelling reuse each other's prepared steps."""
    return Path(os.path.normpath(Path(str(value)).expanduser().absolute()))


@dataclass(frozen=True)
class SourceSpec:
    """One entry of `data.sources` (conf/data/*.yaml states every field: `from_cfg` reads them)."""

    name: str
    kind: str
    path: Path
    text_field: str
    id_field: str | None
    val_fraction: float

    @classmethod
    def from_cfg(cls, name: str, node: Any) -> "SourceSpec":
        """`data.sources.<name>`, every key checked: one LabError line naming the first bad or missing one."""
        prefix = f"data.sources.{name}"
        if not isinstance(node, Mapping):
            raise LabError(f"{prefix} must be a mapping of settings (kind, path, ...), not {node!r}")

        def setting(key: str, check: Callable[[Any, str], Any]) -> Any:
            if key not in node:
                raise LabError(f"{prefix}.{key} is missing from the config (it has no default in code; "
                               "restore it in conf/data/)")
            return check(node[key], f"{prefix}.{key}")

        kind = setting("kind", choice(*KINDS))
        path = setting("path", text)
        val_fraction = setting("val_fraction", number(0, 1, high_open=True))
        if kind == "jsonl":
            fields = {"text_field": setting("text_field", text), "id_field": setting("id_field", optional(text))}
        else:
            stray = [key for key in ("text_field", "id_field") if key in node]
            if stray:
                raise LabError(f"{prefix}.{stray[0]} applies to jsonl sources only ({prefix}.kind={kind!r} reads "
                               "one document per file): remove it")
            # A txt_dir source has no fields; these placeholders stand in its scan fingerprint as they always
            # have, so data prepared before keeps being reused.
            fields = {"text_field": "text", "id_field": "id"}
        return cls(name=name, kind=kind, path=clean_path(path), val_fraction=val_fraction, **fields)

    def files(self) -> list[Path]:
        """The input files, sorted (the order defines document order, hence the outputs)."""
        if not self.path.exists():
            raise LabError(f"source {self.name!r}: {self.path} does not exist "
                           f"(set data.sources.{self.name}.path, e.g. data.web_path=... / data.books_dir=...)")
        if self.kind == "jsonl":
            if self.path.is_file():
                return [self.path]
            files = sorted(p for p in self._walk() if p.name.endswith(JSONL_SUFFIXES))
            if not files:
                raise LabError(f"source {self.name!r}: no {'/'.join(JSONL_SUFFIXES)} files under {self.path}")
            return self._regular(files)
        if not self.path.is_dir():
            raise LabError(f"source {self.name!r} (kind txt_dir): {self.path} is not a folder")
        files = sorted(p for p in self._walk() if p.name.endswith(".txt"))
        if not files:
            log.warning("source %r: no .txt files under %s", self.name, self.path)
        return self._regular(files)

    def _regular(self, files: list[Path]) -> list[Path]:
        """A link to nowhere or a pipe named like an input is an error, never a silently missing file."""
        for path in files:
            if not path.is_file():
                what = "a link to a missing file" if path.is_symlink() and not path.exists() else "not a regular file"
                raise LabError(f"source {self.name!r}: cannot read {path}: {what}; fix or remove it and re-run")
        return files

    def _walk(self) -> list[Path]:
        """Every file under the source folder; a folder the OS will not list is an error, not fewer documents."""
        def refuse(err: OSError) -> None:
            raise LabError(f"source {self.name!r}: cannot list {err.filename}: {err.strerror or err}; fix its "
                           "permissions and re-run") from None

        return [Path(root) / name for root, _, names in os.walk(self.path, onerror=refuse, followlinks=True)
                for name in names]

    def relative(self, path: Path) -> str:
        """A file's name as recorded in ids and examples: relative to the source path."""
        return path.name if self.path.is_file() else str(path.relative_to(self.path))


@dataclass(frozen=True)
class RawRecord:
    """One document's raw bytes, or why there are none (`error`), and where it came from.

    `line` is 1-based for JSONL and 0 for a whole file. `is_doc=False` marks a note about a file
    (an empty JSONL file holds no document, so it is not counted in docs_in).
    """

    file: str
    line: int
    payload: bytes | None
    error: str | None = None
    is_doc: bool = True


class _Counting(io.RawIOBase):
    """Counts bytes read from the file on disk, so progress is exact for compressed input too."""

    def __init__(self, raw: BinaryIO, on_bytes: Callable[[int], None] | None):
        self.raw, self.on_bytes = raw, on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self.raw.readinto(buffer)
        if n and self.on_bytes:
            self.on_bytes(n)
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_text_stream(path: Path, on_bytes: Callable[[int], None] | None = None) -> BinaryIO:
    """A buffered binary stream of the decompressed file (by suffix), reporting on-disk bytes read.

    UTF-16 text (told by its byte-order mark) is re-encoded as UTF-8, so it reads like the same file saved
    as UTF-8. Opening is where the OS refuses (permission, missing): that raises OSError to the caller.
    """
    raw = _Counting(open(path, "rb", buffering=0), on_bytes)
    if path.name.endswith(".gz"):
        decompressed: Any = gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20), mode="rb")
        stream: BinaryIO = io.BufferedReader(_UntilDamage(decompressed), 1 << 20)
    elif path.name.endswith(".zst"):
        decompressed = zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(raw, 1 << 20),
                                                                  read_across_frames=True)
        stream = io.BufferedReader(_UntilDamage(decompressed, lambda: _zstd_cut(path)), 1 << 20)
    else:
        stream = io.BufferedReader(raw, 1 << 20)
    if stream.peek(2)[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        return _Utf16AsUtf8(stream)  # type: ignore[return-value]
    return stream


class _UntilDamage(io.RawIOBase):
    """A decompressed stream that ends where the compressed data is damaged, keeping every byte before it.

    A large buffered read that fails loses everything it had decompressed, so this reads one decompressor call
    at a time (read1) and turns the failure into an end of stream, remembering it in `damage`."""

    def __init__(self, inner: Any, check_end: Callable[[], BaseException | None] | None = None):
        self.inner, self.check_end = inner, check_end
        self.damage: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self.damage is not None:
            return 0
        try:
            data = self.inner.read1(len(buffer))
        except _STREAM_ERRORS as err:
            self.damage = err
            return 0
        if not data and self.check_end is not None:
            self.damage, self.check_end = self.check_end(), None
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.inner.close()
        super().close()


_ZSTD_MAGIC = 0xFD2FB528


def _zstd_cut(path: Path) -> EOFError | None:
    """Whether a .zst file stops inside a frame. zstandard's stream reader ends a cut file silently, so the frames
    are walked (headers only: magic, frame header, block headers, checksum) to see that the last one is whole."""
    with open(path, "rb") as handle:
        size, pos = os.fstat(handle.fileno()).st_size, 0
        while pos < size:
            handle.seek(pos)
            head = handle.read(18)
            magic = int.from_bytes(head[:4], "little")
            if len(head) >= 8 and magic >> 4 == 0x184D2A5:  # a skippable frame: magic, length, payload
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            try:
                pos += zstandard.frame_header_size(head)
            except zstandard.ZstdError:
                return EOFError(f"no zstd frame at byte {pos}")
            checksum = 4 if head[4] & 0x04 else 0
            last = False
            while not last and pos < size:
                handle.seek(pos)
                block = int.from_bytes(handle.read(3).ljust(3, b"\0"), "little")
                last, kind, length = bool(block & 1), (block >> 1) & 3, block >> 3
                pos += 3 + (1 if kind == 1 else length)  # an RLE block stores one byte
            if not last:
                break
            pos += checksum
    return None if pos == size else EOFError(f"the file ends inside a zstd frame (byte {size} of {pos}+)")


def stream_damage(stream: Any) -> BaseException | None:
    """Why a stream from `open_text_stream` ended early (damaged compressed data), or None."""
    inner = stream.text.buffer if isinstance(stream, _Utf16AsUtf8) else stream
    raw = getattr(inner, "raw", None)
    return raw.damage if isinstance(raw, _UntilDamage) else None


class _Utf16AsUtf8(io.RawIOBase):
    """A UTF-16 byte stream read as UTF-8 bytes, line by line (readline is all the JSONL reader needs)."""

    def __init__(self, stream: BinaryIO):
        # a lone surrogate passes through to invalid UTF-8, so only its own record is counted (invalid_utf8)
        self.text = io.TextIOWrapper(stream, encoding="utf-16", errors="surrogatepass", newline="")
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readline(self, size: int = -1) -> bytes:  # type: ignore[override]
        if not self.pending:
            self.pending = self.text.readline().encode("utf-8", errors="surrogatepass")
        cut = len(self.pending) if size is None or size < 0 else size
        line, self.pending = self.pending[:cut], self.pending[cut:]
        return line

    def close(self) -> None:
        self.text.close()
        super().close()


# Errors a damaged compressed stream raises mid-read (an OSError with an errno is the OS refusing instead).
_STREAM_ERRORS = (EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile, UnicodeDecodeError)


def os_refused(path: Path, err: OSError) -> LabError:
    """The OS refusing to read an input (permission, I/O error, a vanished file): an error, never a skip."""
    return LabError(f"cannot read {path}: {err.strerror or err}; fix the file or its permissions and re-run "
                    "(no document of it was counted)")


def _lines(line: bytes) -> list[bytes]:
    """A raw JSONL line split at bare carriage returns too (old Mac line ends): JSON text cannot hold a raw CR,
    so a CR not followed by LF always ends a record. CRLF stays one line end."""
    if b"\r" not in line:
        return [line]
    pieces = line.replace(b"\r\n", b"\n").split(b"\r")
    return [piece + b"\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


def iter_jsonl(spec: SourceSpec, path: Path, max_bytes: int,
               on_bytes: Callable[[int], None] | None = None) -> Iterator[RawRecord]:
    """Every line of one JSONL file as a record; an overlong line is skipped without reading it whole.

    A damaged compressed file keeps every record read before the damage and records a `truncated_stream`
    note (manifest file_notes); the OS refusing to read it is a LabError.
    """
    name = spec.relative(path)
    line_no = 0
    try:
        stream = open_text_stream(path, on_bytes)
    except _STREAM_ERRORS as err:
        log.warning("%s: unreadable from the start (%s); the whole file is skipped", path, err)
        yield RawRecord(name, 1, None, "truncated_stream", is_doc=False)
        return
    except OSError as err:
        raise os_refused(path, err) from None
    try:
        with stream:
            first = True
            while line := stream.readline(max_bytes + 1):
                if len(line) > max_bytes and not line.endswith(b"\n"):
                    line_no += 1
                    while (rest := stream.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass
                    yield RawRecord(name, line_no, None, "line_too_long")
                    continue
                if not line.endswith(b"\n") and (damage := stream_damage(stream)) is not None:
                    raise damage  # the cut last line belongs to the damage, not to the documents
                if first:
                    line, first = line.removeprefix(codecs.BOM_UTF8), False
                for piece in _lines(line):
                    line_no += 1
                    yield RawRecord(name, line_no, piece)
            if (damage := stream_damage(stream)) is not None:
                raise damage
    except _STREAM_ERRORS as err:
        log.warning("%s: unreadable after line %d (%s); the rest of the file is skipped and recorded in the "
                    "manifest (file_notes)", path, line_no, err)
        yield RawRecord(name, line_no + 1, None, "truncated_stream", is_doc=False)
        return
    except OSError as err:
        raise os_refused(path, err) from None
    if line_no == 0:
        yield RawRecord(name, 0, None, "empty_file", is_doc=False)


def iter_txt(spec: SourceSpec, path: Path, max_bytes: int,
             on_bytes: Callable[[int], None] | None = None) -> Iterator[RawRecord]:
    """One .txt file = one document (a book is filtered and deduplicated as a whole)."""
    name = spec.relative(path)
    try:
        with open(path, "rb") as handle:
            payload = handle.read(max_bytes + 1)
        size = path.stat().st_size
    except OSError as err:
        raise os_refused(path, err) from None
    if on_bytes:
        on_bytes(size)
    if len(payload) > max_bytes:
        yield RawRecord(name, 0, None, "file_too_large")
    elif not payload:
        yield RawRecord(name, 0, None, "empty_file")
    else:
        yield RawRecord(name, 0, payload)


def iter_source(spec: SourceSpec, max_bytes: int, on_bytes: Callable[[int], None] | None = None
                ) -> Iterator[RawRecord]:
    reader = iter_jsonl if spec.kind == "jsonl" else iter_txt
    for path in spec.files():
        yield from reader(spec, path, max_bytes, on_bytes)


class Parsed(NamedTuple):
    doc_id: str
    text: str
    repaired: bool = False  # invalid UTF-8 bytes were replaced (books only)


def parse_record(record: RawRecord, spec: SourceSpec) -> Parsed | str:
    """The document in a record, or the reason code it is malformed.

    JSONL lines must be UTF-8 JSON objects with a string text field (a corrupted record is dropped);
    a book's invalid bytes are replaced with U+FFFD (one bad byte should not cost a whole book; the
    `max_replacement_frac` filter drops a book that is mostly garbage). A missing id falls back to
    the record's location, which is stable across runs.
    """
    if record.error:
        return record.error
    assert record.payload is not None
    location = f"{record.file}:{record.line}" if record.line else record.file
    if spec.kind == "txt_dir":
        if record.payload[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            try:  # the same book saved as UTF-16: the same text
                return Parsed(record.file, record.payload.decode("utf-16").removeprefix("\ufeff"))
            except UnicodeDecodeError:
                pass
        try:
            return Parsed(record.file, record.payload.decode("utf-8").removeprefix("\ufeff"))
        except UnicodeDecodeError:
            text = record.payload.decode("utf-8", errors="replace")
            return Parsed(record.file, text.removeprefix("\ufeff"), repaired=True)
    line = record.payload.strip()
    if not line:
        return "blank_line"
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "invalid_utf8"
    except (json.JSONDecodeError, RecursionError):
        return "invalid_json"
    if not isinstance(obj, dict):
        return "not_an_object"
    if spec.text_field not in obj:
        return "missing_text_field"
    text = obj[spec.text_field]
    if text is None:
        return "null_text"
    if not isinstance(text, str):
        return "text_not_string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "lone_surrogate"  # a JSON "\ud800" escape: valid JSON, not encodable text
    doc_id = obj.get(spec.id_field) if spec.id_field else None
    if doc_id is None or isinstance(doc_id, (dict, list)):
        return Parsed(location, text)
    doc_id = str(doc_id)
    try:
        doc_id.encode("utf-8")
    except UnicodeEncodeError:
        return Parsed(location, text)
    return Parsed(doc_id, text)
