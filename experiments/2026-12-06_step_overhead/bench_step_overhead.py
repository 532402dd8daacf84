"""Per-step cost of lab.train over a bare PyTorch loop at equal work (same model, data, batches, optimizer).

    .venv/bin/python experiments/2026-12-06_step_overhead/bench_step_overhead.py --steps 60 --warmup 5 --repeats 5

Every variant runs in its own process (fresh imports, its own env vars, its own temp MLflow store) with
torch.set_num_threads(THREADS). Each trains llama_gqa from `experiment=demo` on the prepared sample for
warmup + steps optimizer steps; a clock at the end of every step (after all callbacks, the module's hooks and
Lightning's logging of that step) gives per-step periods, of which the first `warmup` are dropped.

Columns: median/mean/p90 of the pooled per-step periods; "run medians" shows how much whole runs drift on a shared
VM; "log-step bump" (lab variants at the demo's log_every_n_steps=5) is how much slower the step that writes the
metrics is than the other four.

Variants:
  bare        plain PyTorch: forward + loss (lab.kernels.causal_lm_loss), backward, clip 1.0, AdamW (the lab's
              param groups), LambdaLR (the lab's schedule), zero_grad; the lab's sampler over the same blocks
  pl_min      a minimal LightningModule (loss only) in a plain Lightning Trainer: no callbacks, no logger
  pl_lab      the lab's CausalLMModule in the same plain Trainer: its loss guard, self.log calls, grad norm
  lab         lab.train.train(cfg): the real path (callbacks, MLflow, steps.jsonl), demo cadence (log every 5)
  lab_log1    the same, trainer.log_every_n_steps=1 (what debug=fast and the tests use)
  lab_nolog   the same, no MLflow metric write inside the measured steps (log_every_n_steps = run length)
  lab_async   `lab` with MLFLOW_ENABLE_ASYNC_LOGGING=true (MLflow writes from a background thread)
  lab_bar     `lab` with the progress bar on (trainer default; stderr goes to a file)
`--items` also times each item of the step path alone (ms per call) on each size's model.
`--profile` also runs `lab` (or --profile-variant) under cProfile and prints the per-step cost of the
functions on the step's path.

What `lab*` turns off so that nothing but steps is timed (none of it runs per step): validation
(train.eval_every_steps beyond the run), step checkpoints (callbacks.checkpoint.every_n_steps beyond the run),
the HF export (train.export_hf=false), generations (callbacks.generations.prompts=[]); the first curriculum
stage is made 3 epochs long (curriculum.stages.0.epochs=3, ~125 steps) so the run ends inside it and no
stage-end validation/checkpoint/export happens either (trainer.max_steps cuts the run, so the lr schedule is the
same in every variant). Energy tracking stays `auto` (a no-op where codecarbon is not installed, as in .venv).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREADS = 2
SIZES = {
    "tiny": [],                                                   # size=tiny as shipped: d=64, 3 layers
    "wide": ["size.hidden_size=128", "size.depth_divisor=4"],    # d=128, 5 layers: a ~100 ms CPU step
}
VARIANTS = ["bare", "pl_min", "pl_lab", "lab", "lab_log1", "lab_nolog", "lab_async", "lab_bar"]
LAB_VARIANTS = {  # extra overrides and env of the lab.train variants
    "lab": ([], {}),
    "lab_log1": (["trainer.log_every_n_steps=1"], {}),
    "lab_nolog": (["trainer.log_every_n_steps=100000"], {}),
    "lab_async": ([], {"MLFLOW_ENABLE_ASYNC_LOGGING": "true"}),
    "lab_bar": (["trainer.enable_progress_bar=true"], {}),
}


# ---------------------------------------------------------------------------------------------------------------
# worker side: one variant, one process
# ---------------------------------------------------------------------------------------------------------------
def compose(prepared: str, size: str, total_steps: int, extra: list[str], work: Path):
    from lab.compose import compose_config

    overrides = ["experiment=demo", "arch=llama_gqa", f"data.prepared_dir={prepared}",
                 f"trainer.max_steps={total_steps}", "trainer.enable_progress_bar=false",
                 "train.eval_every_steps=100000", "callbacks.checkpoint.every_n_steps=100000",
                 "train.export_hf=false", "callbacks.generations.prompts=[]",
                 "curriculum.stages.0.epochs=3",  # the sample's web stage is 41 steps at batch 16: stay inside it
                 f"logger.artifact_location={work / 'artifacts'}", *SIZES[size], *extra]
    return compose_config("train", overrides, run_dir=work / "run")


def step_clock(profile_from: int | None = None):
    """A callback taking perf_counter at the end of each optimizer step, after every other callback of that
    step; with profile_from=w, cProfile runs from the end of step w to the end of the last step (max_steps)."""
    import cProfile

    import lightning as L

    class StepClock(L.Callback):
        def __init__(self):
            self.times: list[float] = []
            self.profiler = cProfile.Profile() if profile_from is not None else None

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.times.append(time.perf_counter())
            if self.profiler is None:
                return
            if len(self.times) == profile_from + 1:
                self.profiler.enable()
            elif trainer.global_step >= trainer.max_steps:
                self.profiler.disable()

    return StepClock()


def open_datamodule(cfg):
    from lab.settings import TrainSettings
    from lab.train import open_data

    settings = TrainSettings.from_config(cfg)
    datamodule = open_data(cfg, settings)
    datamodule.set_world(1, 0)
    return settings, datamodule


def run_bare(cfg, total_steps: int) -> dict:
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from lab.datamodule import RankSampler
    from lab.kernels import apply_fast_paths, causal_lm_loss
    from lab.models import build_config, build_model
    from lab.module import param_groups
    from lab.schedules import lr_multiplier
    from lab.train import special_tokens

    settings, datamodule = open_datamodule(cfg)
    L.seed_everything(cfg.seed, workers=True)  # lab.train seeds the same way before the model is built
    schedule = datamodule.step_schedule(settings.trainer.max_steps)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model = build_model(build_config(resolved["arch"], resolved["size"], **special_tokens(datamodule.manifest)))
    apply_fast_paths(model, torch.device("cpu"), attention=settings.train.attention)
    model.train()
    optim = settings.optim
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                  eps=optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(
        settings.scheduler, schedule.total_steps, schedule.tokens_per_step, schedule.stage_names,
        schedule.stage_bounds))
    stage = datamodule.stages[0]
    blocks = torch.utils.data.ConcatDataset([datamodule.manifest.blocks(s, "train") for s in stage.sources])
    loader = torch.utils.data.DataLoader(blocks, batch_size=settings.train.batch_size,
                                         sampler=RankSampler(datamodule.stage_order(0), 0, 1, 0), num_workers=0)
    clip = settings.trainer.gradient_clip_val
    times, losses = [], []
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if step == total_steps:
            break
        loss = causal_lm_loss(model, batch, chunk_size=settings.train.loss_chunk_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # read after the loop: no host sync inside it
        times.append(time.perf_counter())
    return {"times": times, "losses": [float(x) for x in losses], "wall_s": times[-1] - start,
            "params": sum(p.numel() for p in model.parameters())}


def plain_trainer(total_steps: int, clip: float, clock):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=total_steps, max_epochs=1,
                     gradient_clip_val=clip, logger=False, callbacks=[clock], enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False)


def run_pl(cfg, total_steps: int, lab_module: bool) -> dict:
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from lab.kernels import apply_fast_paths, causal_lm_loss
    from lab.models import build_model
    from lab.module import CausalLMModule, param_groups
    from lab.schedules import lr_multiplier
    from lab.train import special_tokens

    settings, datamodule = open_datamodule(cfg)
    L.seed_everything(cfg.seed, workers=True)
    schedule = datamodule.step_schedule(settings.trainer.max_steps)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    module = CausalLMModule(arch=resolved["arch"], size=resolved["size"], settings=settings, schedule=schedule,
                            data_info=datamodule.data_info(), config_overrides=special_tokens(datamodule.manifest))
    if not lab_module:
        class LossOnly(L.LightningModule):
            """The same model, loss and optimizer; nothing else (no guard, no self.log, no grad norm)."""

            def __init__(self, model):
                super().__init__()
                self.model = model

            def setup(self, stage):
                apply_fast_paths(self.model, self.trainer.strategy.root_device, attention=settings.train.attention)

            def training_step(self, batch, batch_idx):
                return causal_lm_loss(self.model, batch, chunk_size=settings.train.loss_chunk_size)

            def configure_optimizers(self):
                optim = settings.optim
                optimizer = torch.optim.AdamW(param_groups(self.model, optim.weight_decay), lr=optim.lr,
                                              betas=optim.betas, eps=optim.eps)
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(
                    settings.scheduler, schedule.total_steps, schedule.tokens_per_step, schedule.stage_names,
                    schedule.stage_bounds))
                return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        module = LossOnly(module.model)  # built inside CausalLMModule: the same initial weights
    clock = step_clock()
    trainer = plain_trainer(total_steps, settings.trainer.gradient_clip_val, clock)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return {"times": clock.times, "wall_s": clock.times[-1] - start}


def run_lab(cfg, work: Path, profile_from: int | None = None) -> dict:
    import lab.train

    clock = step_clock(profile_from)
    original = lab.train.progress_callbacks
    # the clock goes last: its period spans every callback, module hook and logger write of a step
    lab.train.progress_callbacks = lambda *a, **k: [*original(*a, **k), clock]
    start = time.perf_counter()
    lab.train.train(cfg)
    steps = [json.loads(line) for line in (work / "run" / "steps.jsonl").read_text().splitlines()]
    return {"times": clock.times, "losses": [s["loss"] for s in steps], "wall_s": clock.times[-1] - start,
            "profiler": clock.profiler}


# the step path's functions reported by --profile (file suffix, function name); the rest is in the .pstats file
PROFILE_PICKS = [
    ("lightning/pytorch/loops/training_epoch_loop.py", "advance"),
    ("lightning/pytorch/loops/optimization/automatic.py", "run"),
    ("lab/module.py", "training_step"), ("lab/kernels.py", "causal_lm_loss"), ("lab/module.py", "_is_bad"),
    ("torch/_tensor.py", "backward"), ("lab/module.py", "on_before_optimizer_step"),
    ("torch/nn/utils/clip_grad.py", "clip_grad_norm_"), ("torch/optim/adamw.py", "adamw"),
    ("lab/module.py", "on_train_batch_end"), ("lightning/pytorch/core/module.py", "log"),
    ("lightning/pytorch/core/module.py", "log_dict"),
    ("lab/callbacks.py", "on_train_batch_end"),
    ("lightning/pytorch/callbacks/model_checkpoint.py", "on_train_batch_end"),
    ("lightning/pytorch/callbacks/progress/tqdm_progress.py", "on_train_batch_end"),
    ("lightning/pytorch/trainer/connectors/logger_connector/logger_connector.py", "on_batch_end"),
    ("lightning/pytorch/trainer/connectors/logger_connector/logger_connector.py", "update_train_step_metrics"),
    ("lightning/pytorch/loggers/mlflow.py", "log_metrics"),
    ("mlflow/tracking/client.py", "log_batch"),
    ("torch/utils/data/dataloader.py", "__next__"),
    ("~", "<method 'item' of 'torch._C.TensorBase' objects>"),
    ("~", "<built-in method io.open>"),
    ("~", "<built-in method posix.getrusage>"),
]


def profile_lab(cfg, work: Path, warmup: int, steps: int) -> dict:
    """cProfile over the measured steps of a lab.train run (periods warmup+1 .. end); per-step costs."""
    import pstats

    result = run_lab(cfg, work, profile_from=warmup)
    stats = pstats.Stats(result.pop("profiler"))
    stats_file = work / "lab.pstats"
    stats.dump_stats(stats_file)
    rows = []
    for (file, line, name), (calls, ncalls, tottime, cumtime, _) in stats.stats.items():
        for suffix, func in PROFILE_PICKS:
            if name == func and file.endswith(suffix):
                rows.append({"where": f"{_short(file)}:{line}", "func": name, "calls": ncalls,
                             "tottime_ms": tottime * 1e3, "cumtime_ms": cumtime * 1e3})
    rows.sort(key=lambda r: -r["cumtime_ms"])
    total = sum(t for (_, _, _, t, _) in stats.stats.values())
    return {**result, "profile": rows, "pstats": str(stats_file), "profiled_steps": steps,
            "profiled_ms": total * 1e3}


def run_items(cfg, work: Path) -> dict:
    """Each per-step item of the lab's step path timed alone (ms per call), on this size's model and grads."""
    import lightning as L
    import torch
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from lab.datamodule import RankSampler
    from lab.kernels import causal_lm_loss
    from lab.module import CausalLMModule
    from lab.train import special_tokens

    settings, datamodule = open_datamodule(cfg)
    L.seed_everything(cfg.seed, workers=True)
    schedule = datamodule.step_schedule(settings.trainer.max_steps)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model = CausalLMModule(arch=resolved["arch"], size=resolved["size"], settings=settings, schedule=schedule,
                           data_info=datamodule.data_info(),
                           config_overrides=special_tokens(datamodule.manifest)).model
    blocks = torch.utils.data.ConcatDataset([datamodule.manifest.blocks(s, "train") for s in datamodule.stages[0].sources])
    loader = torch.utils.data.DataLoader(blocks, batch_size=settings.train.batch_size,
                                         sampler=RankSampler(datamodule.stage_order(0), 0, 1, 0))
    batch = next(iter(loader))
    loss = causal_lm_loss(model, batch)
    loss.backward()
    params = list(model.parameters())

    def per_call(fn, n: int) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n * 1e3

    steps_file = work / "steps.jsonl"

    def step_log():  # lab/callbacks.py StepLog: open, append one line, close
        with steps_file.open("a") as handle:
            handle.write(json.dumps({"step": 1, "loss": float(loss), "lr": 1e-3}) + "\n")

    client = MlflowClient()  # MLFLOW_TRACKING_URI: this worker's temp sqlite store
    run_id = client.create_run(client.create_experiment("items")).info.run_id
    names = ["train/loss", "train/grad_norm", "tokens_seen", "lr", "stage", "time/train_s", "epoch"]
    step = iter(range(10**6))

    def log_batch(synchronous: bool):
        i, now = next(step), int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, 1.0 + i, now, i) for k in names], synchronous=synchronous)

    items = {
        "loss.item()": per_call(lambda: loss.detach().float().item(), 2000),
        "loss guard: isfinite().item() + item()": per_call(
            lambda: (torch.isfinite(loss.detach()).item(), loss.detach().item()), 2000),
        "grad norm (module.on_before_optimizer_step)": per_call(
            lambda: torch.stack([p.grad.detach().norm(2) for p in params if p.grad is not None]).norm(2), 50),
        "clip_grad_norm_ (Lightning's clip; returns the same norm)": per_call(
            lambda: torch.nn.utils.clip_grad_norm_(params, 1e9), 50),
        "steps.jsonl line (open/append/close)": per_call(step_log, 500),
        f"MLflow log_batch, {len(names)} metrics, sqlite, synchronous": per_call(lambda: log_batch(True), 30),
        f"MLflow log_batch, {len(names)} metrics, sqlite, synchronous=False (call only)": per_call(
            lambda: log_batch(False), 30),
        "torch.tensor(float) (each self.log of a Python float)": per_call(
            lambda: torch.tensor(0.5, dtype=torch.float32), 5000),
    }
    import mlflow

    mlflow.flush_async_logging()
    items.update(time_self_log())
    return {"items": items, "times": [0.0], "wall_s": 0.0, "params": sum(p.numel() for p in params)}


def time_self_log(calls: int = 300) -> dict[str, float]:
    """ms per LightningModule.log call of a Python float and of a tensor, inside a running plain Trainer's
    on_train_batch_end (where the lab logs tokens_seen, lr, stage, time/train_s)."""
    import lightning as L
    import torch

    timings: dict[str, float] = {}

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.weight * batch.float()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if batch_idx != 3:
                return
            for kind, value in (("Python float", 0.5), ("tensor", torch.tensor(0.5))):
                start = time.perf_counter()
                for i in range(calls):
                    self.log(f"probe/{kind}/{i % 6}", value, on_step=True)
                timings[f"LightningModule.log of a {kind} (one call)"] = (time.perf_counter() - start) / calls * 1e3

    loader = torch.utils.data.DataLoader(torch.zeros(8, 2), batch_size=1)
    trainer = plain_trainer(6, 1.0, step_clock())
    trainer.fit(Probe(), train_dataloaders=loader)
    return timings


def _short(file: str) -> str:
    for marker in ("site-packages/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def worker(args: argparse.Namespace) -> None:
    import logging
    import warnings

    import torch

    torch.set_num_threads(THREADS)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    total = args.warmup + args.steps + 1  # +1: the first period needs a step before it
    work = Path(args.work)
    extra, _ = LAB_VARIANTS.get(args.variant, ([], {}))
    cfg = compose(args.prepared, args.size, total, extra, work)
    if args.profile:
        result = profile_lab(cfg, work, args.warmup, args.steps)
    elif args.variant == "items":
        result = run_items(cfg, work)
    elif args.variant == "bare":
        result = run_bare(cfg, total)
    elif args.variant in ("pl_min", "pl_lab"):
        result = run_pl(cfg, total, lab_module=args.variant == "pl_lab")
    else:
        result = run_lab(cfg, work)
    result["threads"] = torch.get_num_threads()
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# driver side: runs the workers, prints the table
# ---------------------------------------------------------------------------------------------------------------
def run_worker(variant: str, size: str, args: argparse.Namespace, profile: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"overhead-{variant}-") as tmp:
        work = Path(tmp)
        _, extra_env = LAB_VARIANTS.get(variant, ([], {}))
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ASYNC_LOGGING"}
        env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "OMP_NUM_THREADS": str(THREADS),
                    "MKL_NUM_THREADS": str(THREADS), **extra_env})
        out = work / "result.json"
        command = [sys.executable, __file__, "--worker", variant, "--size", size, "--prepared", args.prepared,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--work", str(work), "--out", str(out),
                   ] + (["--profile"] if profile else [])
        log_file = work / "worker.log"
        with log_file.open("w") as log:
            done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = log_file.read_text()[-3000:]
            raise SystemExit(f"variant {variant} ({size}) failed with exit code {done.returncode}:\n{tail}")
        result = json.loads(out.read_text())
        if profile:  # keep the profile next to the script's output folder
            keep = Path(args.keep_dir) / f"lab_{size}.pstats"
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.write_bytes(Path(result["pstats"]).read_bytes())
            result["pstats"] = str(keep)
        return result


def periods_ms(times: list[float], warmup: int) -> list[float]:
    return [(b - a) * 1e3 for a, b in zip(times, times[1:])][warmup:]


def prepared_default() -> str:
    sys.path.insert(0, str(HERE.parents[1]))
    from lab.compose import compose_config

    return str(compose_config("train", ["experiment=demo"]).data.prepared_dir)


def driver(args: argparse.Namespace) -> None:
    if not (Path(args.prepared) / "manifest.json").is_file():
        raise SystemExit(f"no prepared data at {args.prepared}: run `.venv/bin/python -m lab.prepare tokenizer=bpe2k "
                         "data.seq_len=64` (make data-sample) first")
    variants = args.variants.split(",")
    sizes = args.sizes.split(",")
    results: dict[tuple[str, str], list[dict]] = {}
    for size in sizes:
        for repeat in range(args.repeats):
            for variant in variants:  # interleaved, so drift of the machine hits every variant alike
                t0 = time.perf_counter()
                results.setdefault((size, variant), []).append(run_worker(variant, size, args))
                print(f"  {size:5s} {variant:10s} run {repeat + 1}: {time.perf_counter() - t0:5.1f} s", flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps({f"{size}/{variant}": runs for (size, variant), runs in results.items()}))
    print_table(results, sizes, variants, args)
    if args.items:
        print_items({size: run_worker("items", size, args) for size in sizes})
    if args.profile:
        for size in sizes:
            print_profile(run_worker(args.profile_variant, size, args, profile=True), size, args)


def print_table(results, sizes, variants, args) -> None:
    print(f"\nms per optimizer step: {args.steps} steps after {args.warmup} warm-up, {args.repeats} run(s) per "
          f"variant pooled; {THREADS} threads")
    print("| size | variant | median | mean | p90 | run medians | median of run medians - bare | median - bare "
          "| mean - bare | log-step bump | loss = bare |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for size in sizes:
        base = None
        bare_losses = results.get((size, "bare"), [{}])[0].get("losses")
        for variant in variants:
            runs = results[(size, variant)]
            pooled = [p for r in runs for p in periods_ms(r["times"], args.warmup)]
            median, mean = statistics.median(pooled), statistics.fmean(pooled)
            p90 = statistics.quantiles(pooled, n=10)[-1]
            run_medians = [statistics.median(periods_ms(r["times"], args.warmup)) for r in runs]
            if variant == "bare":
                base = (median, mean, statistics.median(run_medians))
            per_run = "/".join(f"{m:.1f}" for m in run_medians)
            bump = log_step_bump(runs, args.warmup) if variant in ("lab", "lab_async", "lab_bar") else "-"
            losses = runs[0].get("losses")
            same = "-"
            if losses and bare_losses and variant != "bare":
                n = min(len(losses), len(bare_losses))
                same = f"max |d| {max(abs(a - b) for a, b in zip(losses[:n], bare_losses[:n])):.1e} ({n})"
            delta = (f"{statistics.median(run_medians) - base[2]:+.1f}", f"{median - base[0]:+.1f}",
                     f"{mean - base[1]:+.1f}")
            print(f"| {size} | {variant} | {median:.1f} | {mean:.1f} | {p90:.1f} | {per_run} | {delta[0]} | "
                  f"{delta[1]} | {delta[2]} | {bump} | {same} |")


def log_step_bump(runs: list[dict], warmup: int, every: int = 5) -> str:
    """The demo writes metrics every 5th step: median period of the slowest phase mod 5 minus that of the others."""
    phases: list[list[float]] = [[] for _ in range(every)]
    for run in runs:
        for index, period in enumerate(periods_ms(run["times"], warmup)):
            phases[(index + warmup) % every].append(period)
    medians = [statistics.median(p) for p in phases]
    slow = max(range(every), key=lambda i: medians[i])
    rest = [p for i, phase in enumerate(phases) if i != slow for p in phase]
    return f"{medians[slow] - statistics.median(rest):+.1f}"


def print_items(results: dict[str, dict]) -> None:
    sizes = list(results)
    print("\nitems of the step path timed alone, ms per call (" + ", ".join(
        f"{s}: {results[s]['params'] / 1e6:.2f}M params" for s in sizes) + ")")
    print("| item | " + " | ".join(sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name in results[sizes[0]]["items"]:
        print(f"| {name} | " + " | ".join(f"{results[s]['items'][name]:.3f}" for s in sizes) + " |")


def print_profile(result: dict, size: str, args) -> None:
    steps = result["profiled_steps"]
    periods = periods_ms(result["times"], args.warmup)
    print(f"\ncProfile of `{args.profile_variant}` ({size}) over its {steps} measured steps "
          f"(median {statistics.median(periods):.1f} ms/step under the profiler): ms per step "
          f"(stats: {result['pstats']})")
    print("| where | function | calls | cum ms/step | own ms/step |")
    print("|---|---|---:|---:|---:|")
    for row in result["profile"]:
        print(f"| {row['where']} | {row['func']} | {row['calls']} | {row['cumtime_ms'] / steps:.2f} | "
              f"{row['tottime_ms'] / steps:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped before measuring")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prepared", default=None, help="prepared sample (default: the demo's data.prepared_dir)")
    parser.add_argument("--save", help="write every run's step times to this JSON file")
    parser.add_argument("--items", action="store_true", help="also time each step-path item alone")
    parser.add_argument("--profile", action="store_true", help="also profile one run with cProfile")
    parser.add_argument("--profile-variant", default="lab", choices=list(LAB_VARIANTS))
    parser.add_argument("--keep-dir", default="/tmp/overhead_profiles", help="where the .pstats files go")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        worker(args)
        return
    args.prepared = args.prepared or prepared_default()
    driver(args)


if __name__ == "__main__":
    main()
