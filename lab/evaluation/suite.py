"""Evaluation of a model and its quantized variants: held-out perplexity and bits-per-byte, text perplexity,
multiple-choice and lm-eval tasks, efficiency (size, memory, time to first token, decode speed), eval.json and
the MLflow evaluation runs. The command, its usage and the metric names: lab/evaluate.py."""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation.streamers import BaseStreamer

from lab import LabError
from lab.evaluation.lm_eval_tasks import check_lm_eval_tasks, lm_eval_metrics
from lab.models.loading import (ModelSource, default_output_dir, disk_bytes, dtype_name, load_model, load_tokenizer,
                                quiet_transformers, read_index, resolve_device, resolve_dtype, resolve_source, sync,
                                weight_bytes)
from lab.models.quant_formats import VARIANTS
from lab.runs.tables import markdown_table
from lab.config.units import MB
from lab.data.manifest import Manifest
from lab.data.datamodule import evenly_spaced
from lab.models.arch import count_params
from lab.models.build import load_tokenizer_folder
from lab.runs.tracking import get_or_create_experiment, git_info, tracking_uri
from lab.runs.selection import for_each_model, model_config, selection_from_config
from lab.evaluation.settings import Efficiency, EvalTracking, EvaluateSettings
from lab.evaluation.tasks import load_task, score_task


log = logging.getLogger("lab.evaluate")  # the command's name: its console lines keep their prefix
LN2 = math.log(2.0)


# -- which models ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One model to evaluate: the float reference or a quantized variant."""

    name: str
    path: Path              # HF folder (or the checkpoint itself for an unexported reference)
    quantized: bool
    torchao_config: str = ""
    cast: torch.dtype | None = None   # float dtype to load in (None: as saved)


def variant_entries(source: ModelSource, requested: Any, device: torch.device, dtype: torch.dtype,
                    quantized_dir: str | None = None) -> list[Entry]:
    """The reference and the variants lab.quantize saved for `source`, filtered by `requested`."""
    if source.variant is not None:  # model_path is itself a variant folder
        quantized = source.variant in VARIANTS
        available = [Entry(source.variant, source.path, quantized)]
    else:
        root = Path(quantized_dir) if quantized_dir else default_output_dir(source)
        index = read_index(root)
        if index is None:
            log.info("no quantized variants at %s (run lab.quantize first); evaluating the model alone", root)
            available = [Entry(dtype_name(dtype), source.path, False, cast=dtype)]
        else:
            available = [Entry(name, Path(item["path"]), name in VARIANTS, item.get("torchao_config", ""))
                         for name, item in index["variants"].items()]
    by_name = {entry.name: entry for entry in available}
    if requested in (None, "auto") or (not isinstance(requested, str) and not list(requested)):
        chosen = []
        for entry in available:
            reason = VARIANTS[entry.name].unsupported_reason(device) if entry.quantized else None
            if reason:
                log.warning("skipping variant %s on %s: it %s", entry.name, device, reason)
            else:
                chosen.append(entry)
        return chosen
    names = [requested] if isinstance(requested, str) else [str(n) for n in requested]
    chosen = []
    for name in names:
        if name not in by_name:
            raise LabError(f"variant {name!r} is not available for {source.path}; available: {', '.join(by_name)}. "
                           f"Quantize it first: python -m lab.quantize model_path={source.path} variants=[{name}]")
        entry = by_name[name]
        reason = VARIANTS[name].unsupported_reason(device) if entry.quantized else None
        if reason:
            raise LabError(f"variant {name} {reason}; cannot evaluate it on {device}")
        chosen.append(entry)
    return chosen


# -- memory ---------------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory above the level at entry: allocated CUDA memory, or the process's RSS sampled by a thread."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            self._process = psutil.Process()
            self._base = self._peak = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._peak = max(self._peak, self._process.memory_info().rss)
            self.peak_bytes = self._peak - self._base


# -- quality --------------------------------------------------------------------------------------------------------


def context_limit(model: nn.Module) -> int | None:
    """Longest input the model's positions allow (None: no positional limit, e.g. a state-space model)."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


@torch.no_grad()
def block_nll(model: nn.Module, blocks: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (nats) and the number of predicted tokens of a batch of blocks [B, T]."""
    blocks = blocks.to(model.device)
    logits = model(input_ids=blocks, use_cache=False).logits                     # [B, T, V]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), blocks[:, 1:].flatten(), reduction="sum")
    return nll.item(), blocks.shape[0] * (blocks.shape[1] - 1)


_WARNED_NO_VAL: set[tuple[Path, str]] = set()


def heldout_perplexity(model: nn.Module, prepared_dir: Path, sources: Sequence[str] | None, max_blocks: int | None,
                       batch_size: int) -> dict[str, dict[str, float]]:
    """{source: {loss, ppl, bpb, tokens}} on the val split of each source (the trainer's blocks)."""

    manifest = Manifest.load(prepared_dir)
    limit = context_limit(model)
    if limit is not None and manifest.seq_len > limit:
        raise LabError(f"the prepared blocks are {manifest.seq_len} tokens, longer than the model's {limit} positions")
    if manifest.vocab_size > model.config.vocab_size:
        raise LabError(f"the prepared data has {manifest.vocab_size} token ids, more than the model's vocabulary "
                       f"({model.config.vocab_size}): it was packed with another tokenizer")
    results = {}
    for source in sources or manifest.sources:
        blocks = manifest.blocks(source, "val")
        if len(blocks) == 0:
            if (prepared_dir, source) not in _WARNED_NO_VAL:  # once, not once per variant
                _WARNED_NO_VAL.add((prepared_dir, source))
                log.warning("source %s has no complete val block; skipped", source)
            continue
        indices = evenly_spaced(len(blocks), max_blocks)
        nll, count = 0.0, 0
        for start in range(0, len(indices), batch_size):
            batch = torch.stack([blocks[i] for i in indices[start : start + batch_size]])   # [B, seq_len]
            batch_nll, batch_count = block_nll(model, batch)
            nll, count = nll + batch_nll, count + batch_count
        loss = nll / count
        item = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(count)}
        bytes_per_token = manifest.bytes_per_token(source, "val")
        if bytes_per_token:
            item["bpb"] = loss / LN2 / bytes_per_token
        results[source] = item
    return results


@torch.no_grad()
def sliding_window_nll(model: nn.Module, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """HF's strided perplexity: windows of max_length moved by `stride`; each window scores only the
    tokens no earlier window scored, with up to max_length - stride tokens of context before them.

    ids: [N] token ids. Returns (summed NLL in nats, number of scored tokens).
    """
    if stride < 1 or stride > max_length:
        raise LabError(f"stride={stride} must be between 1 and the window length {max_length}")
    n = ids.numel()
    nll, count, scored_until = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        window = ids[begin:end].unsqueeze(0).to(model.device)                   # [1, L]
        logits = model(input_ids=window, use_cache=False).logits[0, :-1]         # [L-1, V]: predicts window[1:]
        targets = window[0, 1:].clone()                                          # [L-1]
        new = end - max(scored_until, begin + 1)                                 # targets not scored before
        targets[: targets.numel() - new] = -100
        nll += F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum").item()
        count += new
        scored_until = end
        if end == n:
            break
    return nll, count


def text_perplexity(model: nn.Module, tokenizer: Any, path: Path, max_length: int, stride: int) -> dict[str, float]:
    if not path.is_file():
        raise LabError(f"text file not found: {path}")
    text = path.read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)   # [N]
    if ids.numel() < 2:
        raise LabError(f"text file {path} has fewer than two tokens")
    nll, count = sliding_window_nll(model, ids, max_length, stride)
    loss = nll / count
    bytes_per_token = len(text.encode("utf-8")) / ids.numel()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": loss / LN2 / bytes_per_token,
            "tokens": float(count)}


# -- speed ----------------------------------------------------------------------------------------------------------


def random_prompt(vocab_size: int, special_ids: Sequence[int], batch: int, length: int,
                  generator: torch.Generator) -> torch.Tensor:
    """[batch, length] ids drawn from the ordinary (non-special) tokens: the content does not matter for timing."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in special_ids if 0 <= i < vocab_size]] = False
    pool = allowed.nonzero().squeeze(1)
    return pool[torch.randint(len(pool), (batch, length), generator=generator)]


def supports_static_cache(model: nn.Module) -> bool:
    """Attention models take a static KV cache (what transformers compiles generate() with); recurrent-state
    models (Mamba2) keep their own cache, which transformers does not compile."""
    return not getattr(model, "_is_stateful", False)


def generate_kwargs(model: nn.Module, compile_: bool) -> dict[str, Any]:
    """Greedy decoding; with compile_ (and a static cache), transformers' torch.compile of the decode step."""
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": pad if pad is not None else 0}
    if compile_ and supports_static_cache(model):
        from transformers import CompileConfig

        compile_config = CompileConfig(fullgraph=False, dynamic=False)
        if model.device.type != "cuda":
            compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        kwargs.update(cache_implementation="static", compile_config=compile_config)
    return kwargs


class TokenClock(BaseStreamer):
    """A generate() streamer that only timestamps: put() gets the prompt once, then each new token as it
    reaches the host (generate synchronises on every step anyway to check for stopping)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, kwargs: Mapping[str, Any],
                   repeats: int, warmup: int) -> tuple[float, float | None]:
    """Median time to first token and median seconds per later token of generate() on ids [B, T]."""
    ids = ids.to(model.device)
    mask = torch.ones_like(ids)
    first, per_token = [], []
    with torch.no_grad():
        for run in range(warmup + repeats):
            clock = TokenClock()
            sync(model.device)
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, streamer=clock, **kwargs)
            if out.shape[1] != ids.shape[1] + new_tokens or len(clock.times) != new_tokens + 1:
                raise LabError(f"generate returned {out.shape[1] - ids.shape[1]} of {new_tokens} tokens")
            if run >= warmup:
                first.append(clock.times[1] - start)   # times[0]: the prompt, before prefill
                if new_tokens > 1:
                    per_token.append((clock.times[-1] - clock.times[1]) / (new_tokens - 1))
    return statistics.median(first), statistics.median(per_token) if per_token else None


def measure_speed(model: nn.Module, tokenizer: Any, options: "Efficiency", compile_: bool,
                  seed: int) -> dict[str, float]:
    """ttft_ms_<len> per prompt length that fits, decode_tok_s_bs<b> per batch size."""
    limit = context_limit(model)
    generator = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    special = list(getattr(tokenizer, "all_special_ids", []) or [])
    kwargs = generate_kwargs(model, compile_)
    repeats, warmup = options.repeats, options.warmup
    if "compile_config" in kwargs:
        warmup = max(1, warmup)  # every new shape compiles on its first call
    metrics: dict[str, float] = {}
    # prompt lengths capped to leave room for the one generated token
    lengths = sorted({min(int(length), limit - 1) if limit else int(length) for length in options.prompt_lengths})
    for length in lengths:
        ids = random_prompt(vocab, special, 1, length, generator)
        ttft, _ = timed_generate(model, ids, 1, kwargs, repeats, warmup)
        metrics[f"ttft_ms_{length}"] = 1e3 * ttft
    prompt, new_tokens = options.decode_prompt_length, options.decode_tokens
    if limit:
        prompt = max(1, min(prompt, limit // 4))
        new_tokens = min(new_tokens, limit - prompt)
    if new_tokens < 2:
        log.warning("no room to time decoding within %s positions", limit)
        return metrics
    for batch in options.batch_sizes:
        ids = random_prompt(vocab, special, int(batch), prompt, generator)
        _, per_token = timed_generate(model, ids, new_tokens, kwargs, repeats, warmup)
        if per_token:
            metrics[f"decode_tok_s_bs{batch}"] = int(batch) / per_token
    return metrics


def warm_up_process(entry: Entry, device: torch.device) -> None:
    """One untimed load + generate, so one-off process costs (lazy imports, allocator pools, kernel
    selection) are not charged to whichever variant happens to be measured first."""
    model, _ = load_model(entry.path, device, entry.cast)
    ids = torch.full((1, 8), 2, dtype=torch.long, device=device)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                       **generate_kwargs(model, False))
    del model


# -- one variant ----------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything measured for one variant; `metrics` keys are relative (`val/web/ppl`, `size_mb`...)."""

    name: str
    path: Path
    quantized: bool
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None

    def prefixed(self) -> dict[str, float]:
        return {f"quant/{self.name}/{key}": value for key, value in self.metrics.items()
                if value is not None and math.isfinite(value)}


def _metric_name(stem: str) -> str:
    return re.sub(r"[^\w.\-]", "_", stem)


def metric_names(paths: Sequence[str], what: str) -> list[str]:
    """One metric name per file: its stem, or its whole name where two stems coincide
    (flores.ron / flores.eng); two files of the same name are an error, not a silent overwrite."""
    stems = [Path(p).stem for p in paths]
    names = [_metric_name(Path(p).name if stems.count(stem) > 1 else stem) for p, stem in zip(paths, stems)]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise LabError(f"{what}: several files would be reported as {clashes}; give them distinct file names")
    return names


def evaluate_entry(entry: Entry, settings: "EvaluateSettings", device: torch.device, tokenizer: Any,
                   prepared_dir: Path | None, max_blocks: int | None) -> Report:

    report = Report(entry.name, entry.path, entry.quantized,
                    params={"variant": entry.name, "model_path": str(entry.path), "device": str(device),
                            "torchao_config": entry.torchao_config or "none"})
    efficiency = settings.efficiency
    compile_ = resolve_compile(efficiency.compile, device)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        model, _ = load_model(entry.path, device, entry.cast)
        sync(device)
        report.metrics["load_s"] = time.perf_counter() - start
        if compile_ and not supports_static_cache(model):
            log.info("%s: no static cache for %s (recurrent state); timed without compile", entry.name,
                     type(model).__name__)
            compile_ = False
        report.params["compile"] = str(compile_)
        if compile_:
            torch._dynamo.reset()  # graphs of the previous variant would count against the recompile limit
        if efficiency.enabled:
            report.metrics.update(measure_speed(model, tokenizer, efficiency, compile_, settings.seed))
    report.metrics["peak_vram_mb" if device.type == "cuda" else "peak_ram_mb"] = memory.peak_bytes / MB
    report.metrics["params"] = float(count_params(model).total)
    report.metrics["weights_mb"] = weight_bytes(model) / MB
    if entry.path.is_dir():
        report.metrics["size_mb"] = disk_bytes(entry.path) / MB
    report.params["dtype"] = dtype_name(next(p.dtype for p in model.parameters() if p.is_floating_point()))

    if prepared_dir is not None:
        per_source = heldout_perplexity(model, prepared_dir, settings.sources, max_blocks, settings.batch_size)
        for src, values in per_source.items():
            report.metrics.update({f"val/{src}/{k}": v for k, v in values.items() if k != "tokens"})
    window = trained_window(model, prepared_dir)
    texts = list(settings.texts)
    if texts:
        max_length = settings.text_max_length or window
        stride = settings.stride or max(1, max_length // 2)
        for text, name in zip(texts, metric_names(texts, "texts")):
            values = text_perplexity(model, tokenizer, Path(text), max_length, stride)
            report.metrics.update({f"text/{name}/{k}": v for k, v in values.items() if k != "tokens"})
    tasks = list(settings.tasks)
    for task, name in zip(tasks, metric_names(tasks, "tasks")):

        result = score_task(model, tokenizer, load_task(task), name, max_length=window,
                            batch_size=settings.batch_size)
        report.metrics.update({f"task/{name}/{k}": v for k, v in result.metrics().items()})
    if settings.lm_eval_tasks:  # lm-eval's own scorer on the same model, beside the lab's (lab/evaluation/lm_eval_tasks.py)
        report.metrics.update(lm_eval_metrics(model, tokenizer, settings.lm_eval_tasks, settings.lm_eval, window,
                                              settings.batch_size))
    del model
    return report


def trained_window(model: nn.Module, prepared_dir: Path | None) -> int:
    """Longest input to score with: the model's positions, else (no positional limit, e.g. Mamba2) the
    block length it was trained on, else 1024."""
    limit = context_limit(model)
    if limit:
        return limit
    if prepared_dir is not None:
        return Manifest.load(prepared_dir).seq_len
    return 1024


DEFAULT_MAX_BLOCKS = 256


def resolve_max_blocks(value: Any, source: ModelSource) -> int | None:
    """Val blocks per source. `auto`: the training run's train.val_max_blocks, so the held-out numbers are
    computed on the very blocks of its val/<source>/* metrics and sit beside them unchanged; else 256."""
    if value == "auto":
        train = (source.run_config() or {}).get("train") or {}
        if "val_max_blocks" in train:
            value = train["val_max_blocks"]
        else:
            return DEFAULT_MAX_BLOCKS
    if value is None:
        return None
    return _positive_int(value, "max_blocks", "auto, or null (every val block)")


def _positive_int(value: Any, name: str, alternatives: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise LabError(f"{name}={value!r} must be a positive integer or {alternatives}")
    return number


def set_threads(value: Any) -> int:
    """CPU threads for torch (null: its default, one per core). On a shared or loaded machine, fewer
    threads than cores keeps timings stable: a parallel region waits for its slowest thread."""
    if value not in (None, "", "auto"):
        torch.set_num_threads(_positive_int(value, "threads", "null (torch's default)"))
    return torch.get_num_threads()


def resolve_compile(value: Any, device: torch.device) -> bool:
    """efficiency.compile: auto = CUDA only (static cache + torch.compile costs more than it saves on a CPU)."""
    return device.type == "cuda" if value == "auto" else bool(value)


def resolve_prepared_dir(value: Any, source: ModelSource) -> Path | None:
    """`auto`: the training run's data.prepared_dir (config.yaml); a path; null: no held-out perplexity."""
    if value is None:
        return None
    if value != "auto":
        path = Path(value)
        if not (path / "manifest.json").is_file():
            raise LabError(f"prepared_dir={path} has no manifest.json (run lab.prepare, or set prepared_dir=null)")
        return path
    prepared = ((source.run_config() or {}).get("data") or {}).get("prepared_dir")
    if prepared and (Path(prepared) / "manifest.json").is_file():
        return Path(prepared)
    log.warning("no prepared data found for %s (%s); held-out perplexity skipped: set prepared_dir=<folder>",
                source.path, f"the run's data.prepared_dir {prepared} has no manifest.json" if prepared
                else "no training run config")
    return None


def check_tokenizer(tokenizer: Any, prepared_dir: Path) -> None:
    """The held-out ids only mean something under the tokenizer they were packed with."""

    folder = prepared_dir / "tokenizer"
    if folder.is_dir() and load_tokenizer_folder(folder).get_vocab() != tokenizer.get_vocab():
        raise LabError(f"the model's tokenizer differs from the one {prepared_dir} was packed with; "
                       "its held-out perplexity would be meaningless (pass the matching prepared_dir)")


# -- MLflow ---------------------------------------------------------------------------------------------------------


def log_reports(reports: Sequence[Report], source: ModelSource, settings: "EvalTracking") -> None:
    """One MLflow run per variant, in the training run's experiment and linked to it."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient


    uri = tracking_uri(settings.tracking_uri)
    client = MlflowClient(uri)
    eval_of = settings.eval_of
    eval_of = source.train_run_id if eval_of == "auto" else eval_of
    train_run = None
    if eval_of:
        try:
            train_run = client.get_run(eval_of)
        except Exception:  # noqa: BLE001 - mlflow raises its own types for a missing run
            log.warning("training run %s is not in %s; the evaluation is logged without a link", eval_of, uri)
    if settings.experiment_name:
        experiment_id = get_or_create_experiment(settings.experiment_name, uri)
    elif train_run is not None:
        experiment_id = train_run.info.experiment_id
    else:
        experiment_id = get_or_create_experiment("eval", uri)
    tags = {"kind": "eval", "model_source": str(source.path), **git_info(),
            **settings.tags}
    if train_run is not None:
        tags.update({"eval_of": train_run.info.run_id, "mlflow.parentRunId": train_run.info.run_id})
        for key in ("arch", "size", "seed", "data_sha256", "tokenizer_sha256"):
            if key in train_run.data.tags:
                tags[key] = train_run.data.tags[key]
    for report in reports:
        run = client.create_run(experiment_id, run_name=f"eval-{source.name}-{report.name}",
                                tags={**tags, "variant": report.name})
        report.run_id = run.info.run_id
        for key, value in report.params.items():
            client.log_param(run.info.run_id, key, str(value)[:6000])
        timestamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), timestamp, 0) for key, value in report.prefixed().items()]
        for start in range(0, len(metrics), 500):
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 500])
        client.set_terminated(run.info.run_id, "FINISHED")
    log.info("logged %d evaluation run(s) to experiment %s in %s%s", len(reports), experiment_id, uri,
             f", linked to training run {train_run.info.run_id}" if train_run is not None else "")


# -- the table --------------------------------------------------------------------------------------------------------


def _column_order(key: str) -> tuple[int, int, str]:
    """Sizes, then quality, then speed; prompt lengths and batch sizes in numeric order."""
    order = ["size_mb", "weights_mb", "params", "load_s", "peak_ram_mb", "peak_vram_mb", "val/", "text/", "task/",
             "ttft_ms_", "decode_tok_s_"]
    rank = next((i for i, prefix in enumerate(order) if key.startswith(prefix)), len(order))
    number = re.search(r"(\d+)$", key)
    return rank, int(number.group(1)) if number and key.startswith(("ttft_ms_", "decode_tok_s_")) else 0, key


def format_table(reports: Sequence[Report]) -> str:
    """variant x metric, as a markdown table (quality columns only where a loss is not repeated)."""
    keys = sorted({k for r in reports for k in r.metrics if not k.endswith(("/loss", "_stderr", "/chance", "/n"))},
                  key=_column_order)
    chance = {k.rsplit("/", 1)[0]: v for r in reports for k, v in r.metrics.items() if k.endswith("/chance")}
    header = ["variant", *[k + (f" (chance {chance[k.rsplit('/', 1)[0]]:.3f})" if k.endswith("/acc") and
                                k.rsplit("/", 1)[0] in chance else "") for k in keys]]
    rows = [[report.name, *("" if report.metrics.get(key) is None else _fmt(key, report.metrics[key]) for key in keys)]
            for report in reports]
    return markdown_table(header, rows)


def _fmt(key: str, value: float) -> str:
    if key == "params":
        return f"{value / 1e6:.3f}M"
    if key.endswith(("/acc", "/acc_norm")):
        return f"{100 * value:.1f}%"
    if key.endswith("/ppl"):
        return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"
    if key.endswith("/bpb"):
        return f"{value:.4f}"
    return f"{value:.4g}"


# -- entry point --------------------------------------------------------------------------------------------------------


def evaluate(settings: "EvaluateSettings") -> list[Report]:
    """Evaluate the model and its variants; prints the table, writes eval.json + eval.md into settings.output_dir
    (when set), logs to MLflow."""
    quiet_transformers()
    source = resolve_source(settings.model_path)
    for what in ("texts", "tasks"):  # a name clash is an error before any model is loaded
        metric_names(list(getattr(settings, what)), what)
    check_lm_eval_tasks(settings.lm_eval_tasks, settings.lm_eval)  # names, folders, lm-eval installed: before loading
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    threads = set_threads(settings.threads)
    entries = variant_entries(source, settings.variants, device, dtype, settings.quantized_dir)
    tokenizer = load_tokenizer(source, settings.tokenizer_path)
    prepared_dir = resolve_prepared_dir(settings.prepared_dir, source)
    if prepared_dir is not None:
        check_tokenizer(tokenizer, prepared_dir)
    log.info("evaluating %s on %s: %s", source.path, device, ", ".join(e.name for e in entries))
    if settings.efficiency.enabled and entries:
        warm_up_process(entries[0], device)
    max_blocks = resolve_max_blocks(settings.max_blocks, source)
    reports = []
    for entry in entries:
        reports.append(evaluate_entry(entry, settings, device, tokenizer, prepared_dir, max_blocks))
        reports[-1].params["threads"] = str(threads)
        log.info("%s: %s", entry.name, {k: round(v, 4) for k, v in reports[-1].metrics.items()})
    if settings.mlflow.enabled:
        log_reports(reports, source, settings.mlflow)
    table = format_table(reports)
    print(table)
    if settings.output_dir:
        out_dir = Path(settings.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(
            {"model_path": str(source.path), "device": str(device),
             "variants": {r.name: {"path": str(r.path), "metrics": r.metrics, "params": r.params, "run_id": r.run_id}
                          for r in reports}}, indent=1))
        (out_dir / "eval.md").write_text(table + "\n")
    return reports


def evaluate_command(settings: "EvaluateSettings") -> list[Report] | dict[str, list[Report]]:
    """`model_path=`: evaluate that model and its variants. `runs=`: each selected run's export in turn (eval.json
    in <output_dir>/<run name>/), going on past failures; {run label: reports}, or one LabError line at the end."""

    selection = selection_from_config(settings, settings.mlflow.tracking_uri)
    if selection is None:
        return evaluate(settings)
    return for_each_model(selection, lambda run: evaluate(model_config(settings, run, ("output_dir", "quantized_dir"))),
                          "lab.evaluate")
