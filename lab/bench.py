"""Training-step throughput of each arch, tuned against the plain default, in one run.

    python -m lab.bench [--archs NAME,...] [--size full|tiny] [--seq-len 2048] [--batch auto|N] [--tokenizer NAME]
                        [--steps 10] [--warmup 3] [--device auto|cuda|cpu] [--settings tuned,plain]
                        [--attention auto|sdpa|flex_attention|eager] [--compile auto|on|off]
                        [--loss-chunk 4096] [--precision auto|bf16-mixed|32] [--out DIR]

One step is what the trainer does per optimizer step: zero_grad, forward + loss, backward, gradient
clipping, AdamW step. Each (arch, setting) runs `warmup` untimed steps (compilation, autotuning,
allocator warm-up), then `steps` timed ones; the table reports the median step time and tokens/s, MFU
from lab.models.flops, and peak GPU memory. Settings:

  plain  transformers' default attention (SDPA), no compile, transformers' loss, AdamW (foreach)
  tuned  lab.models.kernels.apply_fast_paths (flex for windows on CUDA, SDPA fixes, SSM kernel check),
         torch.compile (on CUDA), chunked LM-head loss, fused AdamW (CUDA), micro-batch filling the card

`--batch auto` (the default) doubles the micro-batch until a tuned eager step runs out of GPU memory, and
takes the largest that fitted (compiled steps use no more memory than eager ones); plain runs at the same
batch, halved until it fits (on a CPU, auto is 4). The gain is the ratio of the two tokens/s. Results go to
experiments/<date>_bench/bench_<device>_<size>.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import OmegaConf

from lab import CONF_DIR, PROJECT_ROOT, LabError, report_error
from lab.models.flops import flops_per_token, layer_kinds, mfu, peak_flops
from lab.models.kernels import apply_fast_paths, causal_lm_loss, compile_model, set_attention
from lab.models.loading import resolve_device, sync
from lab.models.build import build_config
from lab.models.arch import build_model
from lab.runs.tables import markdown_table
from lab.config.units import GB

log = logging.getLogger("lab.bench")

MAX_AUTO_BATCH = 256
CPU_AUTO_BATCH = 4
CLIP_NORM = 1.0


@dataclass(frozen=True)
class Setting:
    name: str
    attention: str          # "auto": lab.models.kernels' choice for the device; else an attn_implementation
    compile: bool
    loss_chunk: int | None  # tokens per LM-head chunk; None: transformers' loss
    fused_adamw: bool
    fast_paths: bool        # lab.models.kernels.apply_fast_paths (SDPA fixes) on top of the attention choice


@dataclass
class Row:
    arch: str
    setting: str
    batch: int
    seq_len: int
    attention: str = ""
    compiled: bool = False
    loss: str = ""
    tokens_per_s: float | None = None
    step_ms: float | None = None
    spread: float | None = None         # (slowest - fastest) / median of the timed steps: the noise floor
    mfu: float | None = None
    peak_mem_gb: float | None = None
    gflops_per_token: float | None = None
    speedup: float | None = None        # tuned tokens/s over plain tokens/s (tuned rows)
    loss_value: float | None = None     # last step's loss: the settings train the same model
    notes: str = ""
    step_times_ms: list[float] = field(default_factory=list, repr=False)


# --- building -------------------------------------------------------------------------------------------

def available_archs() -> list[str]:
    """Every conf/arch/*.yaml, the default set to benchmark."""
    return sorted(p.stem for p in (CONF_DIR / "arch").glob("*.yaml"))


def compose_arch(arch: str, size: str, seq_len: int,
                 tokenizer: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The resolved arch and size nodes exactly as `python -m lab.train arch=<arch> size=<size>` gets them
    (the tokenizer preset sets vocab_size; None: conf/train.yaml's default)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if arch not in available_archs():
        raise LabError(f"unknown arch {arch!r}; conf/arch has {available_archs()}")
    if not (CONF_DIR / "size" / f"{size}.yaml").is_file():
        known = sorted(p.stem for p in (CONF_DIR / "size").glob("*.yaml"))
        raise LabError(f"unknown size {size!r}; conf/size has {known}")
    overrides = [f"arch={arch}", f"size={size}", f"data.seq_len={seq_len}"]
    if tokenizer:
        if not (CONF_DIR / "tokenizer" / f"{tokenizer}.yaml").is_file():
            known = sorted(p.stem for p in (CONF_DIR / "tokenizer").glob("*.yaml"))
            raise LabError(f"unknown tokenizer {tokenizer!r}; conf/tokenizer has {known}")
        overrides.append(f"tokenizer={tokenizer}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_container(cfg.arch, resolve=True), OmegaConf.to_container(cfg.size, resolve=True)


def settings(loss_chunk: int | None, compile_: bool, attention: str, device: torch.device) -> dict[str, Setting]:
    cuda = device.type == "cuda"
    return {
        "plain": Setting("plain", attention="sdpa", compile=False, loss_chunk=None, fused_adamw=False,
                         fast_paths=False),
        "tuned": Setting("tuned", attention=attention, compile=compile_, loss_chunk=loss_chunk, fused_adamw=cuda,
                         fast_paths=True),
    }


class Run:
    """One (arch, setting): the model, its optimizer and a step function on a fixed random batch."""

    def __init__(self, arch_node: dict[str, Any], size_node: dict[str, Any], setting: Setting,
                 device: torch.device, autocast: torch.dtype | None, seed: int = 0):
        torch.manual_seed(seed)
        self.setting, self.device, self.autocast = setting, device, autocast
        self.config = build_config(arch_node, size_node)
        requested = setting.attention if setting.attention != "auto" else None
        if requested and _has_attention_config(self.config):
            self.config._attn_implementation = requested  # some classes cannot switch once built
        self.model = build_model(self.config).to(device)
        self.notes: list[str] = []
        if setting.fast_paths:
            self.notes += apply_fast_paths(self.model, device, attention=setting.attention).notes
        elif _has_attention_config(self.config):
            set_attention(self.model, setting.attention)
        self.attention = self.model.config._attn_implementation
        if setting.compile:
            compile_model(self.model, chunked_loss=setting.loss_chunk is not None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                           fused=True if setting.fused_adamw else None)
        self.vocab = self.config.vocab_size

    def step(self, batch: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = causal_lm_loss(self.model, batch, chunk_size=self.setting.loss_chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
        self.optimizer.step()
        return loss.detach()

    def close(self) -> None:
        del self.model, self.optimizer
        _free(self.device)


def _has_attention_config(config: Any) -> bool:
    return any(kind != "ssm" for kind in layer_kinds(config))


def _free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled graphs hold their model's buffers and would skew the next run
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_batch(batch: int, seq_len: int, vocab: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch * 7919 + seq_len)
    return torch.randint(0, vocab, (batch, seq_len), generator=generator).to(device)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def fits(make_run: Callable[[], Run], batch: int, seq_len: int) -> bool:
    """Whether one training step at this micro-batch fits in memory."""
    run = None
    try:
        run = make_run()
        run.step(random_batch(batch, seq_len, run.vocab, run.device))
        sync(run.device)
        return True
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
        return False
    finally:
        if run is not None:
            run.close()
        else:
            _free(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


def max_batch(make_run: Callable[[], Run], seq_len: int, limit: int = MAX_AUTO_BATCH) -> int:
    """The largest power-of-two micro-batch (≤ limit) whose step fits; raises if not even 1 does."""
    best, batch = 0, 1
    while batch <= limit and fits(make_run, batch, seq_len):
        best, batch = batch, batch * 2
    if not best:
        raise LabError(f"not even a micro-batch of 1 × {seq_len} tokens fits in memory")
    return best


def measure(run: Run, batch: int, seq_len: int, warmup: int, steps: int) -> tuple[list[float], float, float | None]:
    """(step times in s, last loss, peak GB: lab.config.units.GB); the first `warmup` steps are not timed."""
    device = run.device
    tokens = random_batch(batch, seq_len, run.vocab, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        run.step(tokens)
    sync(device)
    times = []
    loss = torch.zeros(())
    for _ in range(steps):
        start = time.perf_counter()
        loss = run.step(tokens)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
    return times, float(loss), peak


# --- the benchmark --------------------------------------------------------------------------------------

def bench_arch(arch: str, args: argparse.Namespace, device: torch.device, autocast: torch.dtype | None) -> list[Row]:
    arch_node, size_node = compose_arch(arch, args.size, args.seq_len, args.tokenizer)
    config = build_config(arch_node, size_node)
    gflops = flops_per_token(config, args.seq_len) / 1e9
    peak = peak_flops(device, autocast or torch.float32)
    all_settings = settings(args.loss_chunk, _compile_flag(args.compile, device), args.attention, device)
    rows: list[Row] = []
    auto = args.batch == "auto"
    batch = None if auto else int(args.batch)
    for name in args.settings:
        setting = all_settings[name]
        make_run = lambda: Run(arch_node, size_node, setting, device, autocast)  # noqa: E731
        # memory probes run eagerly: compiling at every candidate batch would take minutes each
        probe = lambda: Run(arch_node, size_node, replace(setting, compile=False), device, autocast)  # noqa: E731
        if batch is None and device.type != "cuda":
            batch = CPU_AUTO_BATCH  # host memory does not run out the way a card does; keep smoke runs short
        if batch is None:
            batch = max_batch(probe, args.seq_len)
            log.info("%s: micro-batch %d fills the device", arch, batch)
        row_batch = batch
        while auto and row_batch > 1 and name != args.settings[0] and not fits(probe, row_batch, args.seq_len):
            row_batch //= 2  # the plain setting may need a smaller batch than the tuned one found
        row = Row(arch=arch, setting=name, batch=row_batch, seq_len=args.seq_len,
                  loss="chunked" if setting.loss_chunk else "transformers", gflops_per_token=gflops)
        run = None
        try:
            run = make_run()
            row.attention, row.compiled, row.notes = run.attention, setting.compile, "; ".join(run.notes)
            times, row.loss_value, row.peak_mem_gb = measure(run, row_batch, args.seq_len, args.warmup, args.steps)
        except Exception as err:  # one failing setting must not lose the others' numbers
            if _is_oom(err):
                row.notes = f"out of memory at micro-batch {row_batch}"
            elif isinstance(err, LabError):
                log.error("%s/%s: %s", arch, name, err)
                row.notes = f"failed: {err}"
            else:
                log.exception("%s/%s failed", arch, name)
                row.notes = _failure(err)
            rows.append(row)
            continue
        finally:
            if run is not None:
                run.close()
        step_time = statistics.median(times)
        row.step_times_ms = [round(t * 1e3, 3) for t in times]
        row.step_ms = step_time * 1e3
        row.spread = (max(times) - min(times)) / step_time
        row.tokens_per_s = row_batch * args.seq_len / step_time
        row.mfu = mfu(row.tokens_per_s, gflops * 1e9, peak)
        rows.append(row)
    by_setting = {r.setting: r for r in rows}
    if "plain" in by_setting and "tuned" in by_setting:
        plain, tuned = by_setting["plain"], by_setting["tuned"]
        if plain.tokens_per_s and tuned.tokens_per_s:
            tuned.speedup = tuned.tokens_per_s / plain.tokens_per_s
    return rows


def _failure(err: BaseException) -> str:
    first_line = (str(err).splitlines() or [""])[0]
    return f"failed: {type(err).__name__}: {first_line[:200]}"


def _compile_flag(flag: str, device: torch.device) -> bool:
    return device.type == "cuda" if flag == "auto" else flag == "on"


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32), as Lightning's bf16-mixed / 32-true would run."""
    if name == "auto":
        name = "bf16-mixed" if device.type == "cuda" else "32"
    if name == "bf16-mixed":
        return torch.bfloat16
    if name in ("32", "32-true"):
        return None
    raise LabError(f"--precision {name!r}: choose auto, bf16-mixed or 32")


def device_label(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").replace("geforce", "")
    return "_".join(part for part in name.replace("-", " ").split() if part)[:40]


def environment(device: torch.device, autocast: torch.dtype | None) -> dict[str, Any]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
           "precision": "bf16-mixed" if autocast is not None else "fp32",
           "peak_tflops": (peak_flops(device, autocast or torch.float32) or 0) / 1e12 or None,
           "date": dt.datetime.now().isoformat(timespec="seconds")}
    if device.type == "cuda":
        env |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                "gpu_memory_gb": round(torch.cuda.get_device_properties(device).total_memory / GB, 1)}
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


COLUMNS = ("arch", "setting", "batch", "seq_len", "attention", "compiled", "loss", "tokens_per_s", "step_ms", "spread",
           "mfu", "peak_mem_gb", "gflops_per_token", "speedup", "loss_value", "notes")


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in ("mfu", "spread"):
        return f"{value:.1%}"
    if key == "speedup":
        return f"{value:.2f}×"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if key in ("step_ms", "peak_mem_gb", "gflops_per_token"):
        return f"{value:.3g}" if value < 100 else f"{value:,.0f}"
    if key == "loss_value":
        return f"{value:.4f}"
    return str(value)


def results_table(rows: Sequence[Row]) -> str:
    return markdown_table(COLUMNS, [[_fmt(k, getattr(r, k)) for k in COLUMNS] for r in rows])


def write_results(rows: Sequence[Row], env: dict[str, Any], args: argparse.Namespace, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_{device_label(torch.device(env['device']))}_{args.size}"
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: getattr(r, k) for k in COLUMNS} for r in rows)
    command = "python -m lab.bench " + " ".join(sys.argv[1:]) if args.command is None else args.command
    header = (f"# lab.bench: {env.get('gpu', 'CPU')}, size={args.size}, seq_len={args.seq_len}, "
              f"{env['precision']}\n\n`{command}`  \n"
              f"torch {env['torch']}, transformers {env['transformers']}; median of {args.steps} steps after "
              f"{args.warmup} warm-up; MFU against {env['peak_tflops'] or '–'} TFLOP/s dense.\n\n")
    stem.with_suffix(".md").write_text(header + results_table(rows) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "args": vars(args),
                                                     "rows": [asdict(r) for r in rows]}, indent=1, default=str))
    return stem


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=None, help="comma-separated conf/arch names (default: all)")
    parser.add_argument("--size", default="full", help="conf/size preset (tiny runs on a CPU)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokenizer", default=None, help="conf/tokenizer preset, sets vocab_size (default bpe40k)")
    parser.add_argument("--batch", default="auto", help="micro-batch, or auto to fill the device")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, autotune)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--settings", default="tuned,plain", help="tuned and/or plain, in this order")
    parser.add_argument("--attention", default="auto", help="tuned attention: auto | sdpa | flex_attention | eager")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="tuned: auto = on CUDA")
    parser.add_argument("--loss-chunk", type=int, default=4096, help="tuned: tokens per LM-head chunk, 0 = plain")
    parser.add_argument("--precision", default="auto", help="auto | bf16-mixed | 32 (auto: bf16-mixed on CUDA)")
    parser.add_argument("--out", default=None, help="output folder (default experiments/<date>_bench)")
    args = parser.parse_args(argv)
    args.archs = available_archs() if args.archs is None else [a for a in args.archs.split(",") if a]
    args.settings = [s for s in args.settings.split(",") if s]
    args.loss_chunk = args.loss_chunk or None
    args.command = None if argv is None else "python -m lab.bench " + " ".join(argv)
    if not args.archs:
        raise LabError("--archs is empty")
    unknown = [s for s in args.settings if s not in ("tuned", "plain")]
    if unknown or not args.settings:
        raise LabError(f"--settings {unknown or '(empty)'}: choose from tuned, plain")
    if args.batch != "auto" and (not args.batch.isdigit() or int(args.batch) < 1):
        raise LabError(f"--batch {args.batch!r}: a positive integer or auto")
    if args.seq_len < 2 or args.steps < 1 or args.warmup < 0:
        raise LabError("--seq-len must be >= 2, --steps >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        args = parse_args(argv)
        device = resolve_device(args.device, option="--device ")
        autocast = resolve_precision(args.precision, device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        rows: list[Row] = []
        for arch in args.archs:
            log.info("%s: %s", arch, ", ".join(args.settings))
            try:
                rows += bench_arch(arch, args, device, autocast)
            except LabError:
                raise
            except Exception as err:  # e.g. the batch search itself failed: record it, go on
                log.exception("%s failed", arch)
                rows.append(Row(arch=arch, setting="-", batch=0, seq_len=args.seq_len, notes=_failure(err)))
        out_dir = Path(args.out) if args.out else PROJECT_ROOT / "experiments" / f"{dt.date.today():%Y-%m-%d}_bench"
        stem = write_results(rows, environment(device, autocast), args, out_dir)
    except Exception as err:  # noqa: BLE001 - the one exit path (lab.exit_with)
        return report_error(err, log)
    print(results_table(rows))
    print(f"\nwritten: {stem}.{{md,csv,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
