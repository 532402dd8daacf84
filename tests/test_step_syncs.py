"""The training step's path reads the device as little as it can: on a GPU every read of a tensor to the host
(`.item()`, `float(t)`, `bool(t)`, ...) waits for all queued work. On CPU the same calls are counted, by who
makes them, during a tiny lab.train run: a change that adds one to the step path fails here."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from mlflow.tracking import MlflowClient

from lab import PROJECT_ROOT, LabError
from lab.training.callbacks import StepLog, Throughput
from lab.train import train
from tests.conftest import compose_config, tiny_train_overrides

# the Tensor methods that copy a value to the host (each is a device sync on a GPU)
HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")
LAB_DIR = str(PROJECT_ROOT / "lab") + "/"


def caller_kind(frame) -> str:
    """Who called the read: the lab, Lightning or anything else (torch's own internals, e.g. AdamW's CPU step
    counters, are not the lab's doing and have no counterpart on a GPU with fused AdamW)."""
    path = frame.f_code.co_filename
    if path.startswith(LAB_DIR):
        return "lab"
    if "/lightning/" in path:
        return "lightning"
    return "other"


class StepReads:
    """Counts host reads per training step (Lightning's epoch-loop `advance`: fetch, forward, guard, backward,
    clipping, optimizer step, the batch-end hooks and the step's logging; validation runs after it)."""

    def __init__(self, monkeypatch):
        self.steps: list[tuple[bool, Counter]] = []  # (the step wrote metrics to the loggers, reads by caller)
        self._current: Counter | None = None
        self._where: list[str] = []
        self._inside = 0
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))
        original_advance = _TrainingEpochLoop.advance
        reads = self

        def advance(loop, data_fetcher):
            reads._current = Counter()
            try:
                return original_advance(loop, data_fetcher)
            finally:
                logged = loop.trainer._logger_connector.should_update_logs  # as update_train_step_metrics saw it
                reads.steps.append((logged, reads._current))
                reads._current = None

        monkeypatch.setattr(_TrainingEpochLoop, "advance", advance)

    def _counting(self, read):
        reads = self

        def counted(tensor, *args, **kwargs):
            # a read inside a read is the same one, dispatched again (e.g. by lab.models.kernels' TorchFunctionMode)
            if reads._current is not None and not reads._inside:
                caller = sys._getframe(1)
                kind = caller_kind(caller)
                reads._current[kind] += 1
                if kind == "lab":
                    reads._where.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {read.__name__}")
            reads._inside += 1
            try:
                return read(tensor, *args, **kwargs)
            finally:
                reads._inside -= 1

        return counted


def tiny_run(prepared: Path, run_dir: Path, *extra: str) -> dict:
    # validation, checkpoints, export and generations are off the step path: kept out of the counted steps
    overrides = tiny_train_overrides(prepared, "trainer.max_steps=10", "trainer.log_every_n_steps=4",
                                     "train.eval_every_steps=100", "callbacks.checkpoint.every_n_steps=100",
                                     "train.export_hf=false", "callbacks.generations.prompts=[]", *extra)
    return train(compose_config("train", overrides, run_dir=run_dir))


def test_a_training_step_reads_the_device_once_and_lightning_reads_only_on_logging_steps(prepared_sample, tmp_path,
                                                                                         monkeypatch):
    reads = StepReads(monkeypatch)
    result = tiny_run(prepared_sample, tmp_path)
    assert result["module"].global_step == 10
    quiet = [counts for logged, counts in reads.steps if not logged]
    logging = [counts for logged, counts in reads.steps if logged]
    assert len(quiet) >= 6 and len(logging) >= 2, reads.steps
    # the lab: the loss guard's one read of the loss (the running mean and steps.jsonl reuse that float)
    assert [counts["lab"] for _, counts in reads.steps] == [1] * len(reads.steps), reads._where
    assert all(where.startswith("module.py") for where in reads._where), reads._where
    # Lightning: nothing on a step it does not log (no prog_bar metric without a bar), the metrics when it does
    assert [counts["lightning"] for counts in quiet] == [0] * len(quiet)
    assert all(counts["lightning"] > 0 for counts in logging)  # the counter does see Lightning's reads


def test_metrics_written_off_the_step_path_are_all_in_the_store(prepared_sample, tmp_path):
    """The metric writes are queued to a background thread; every one of them is in MLflow once the run ends."""
    result = tiny_run(prepared_sample, tmp_path, "trainer.log_every_n_steps=1")
    client = MlflowClient()
    history = {name: [m.step for m in client.get_metric_history(result["run_id"], name)]
               for name in ("train/loss", "train/grad_norm", "lr", "tokens_seen", "stage", "time/train_s")}
    for name, steps in history.items():  # every step, each once (Lightning counts from 0; the clock also at the end)
        assert sorted(steps) == list(range(10)) + ([10] if name == "time/train_s" else []), (name, steps)
    logged = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    by_step = {m.step + 1: m.value for m in client.get_metric_history(result["run_id"], "train/loss")}
    assert [row["step"] for row in logged] == list(range(1, 11))
    # steps.jsonl holds the guard's float, MLflow the logged tensor: the same loss
    assert all(by_step[row["step"]] == pytest.approx(row["loss"], rel=1e-6) for row in logged)


def test_metrics_of_a_failed_run_are_in_the_store(prepared_sample, tmp_path):
    """A run the loss guard stops ends FAILED, with every metric it logged up to the stop written."""
    with pytest.raises(LabError, match="loss guard stopped the run"):
        tiny_run(prepared_sample, tmp_path, "trainer.log_every_n_steps=1", "train.guard.spike_factor=0.5",
                 "train.guard.warmup_steps=3", "train.guard.action=stop")
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    client = MlflowClient()
    trained = [json.loads(line)["step"] for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert trained == [1, 2, 3]  # steps 1-3 are before the guard's warmup; the 4th loss is a "spike"
    losses = {m.step + 1 for m in client.get_metric_history(run_id, "train/loss")}
    assert set(trained) <= losses  # (Lightning also writes the last value again at the stopping step)
    assert [m.value for m in client.get_metric_history(run_id, "train/skipped_steps")] == [1.0]


class FakeEvent:
    """A CUDA event stand-in: a time in ms, and how often the host waited for it."""
    waits = 0

    def __init__(self, ms: float):
        self.ms = ms

    def elapsed_time(self, end: "FakeEvent") -> float:
        return end.ms - self.ms

    def synchronize(self) -> None:
        FakeEvent.waits += 1


def test_throughput_on_a_gpu_waits_once_per_window(monkeypatch):
    """Each step records an event; the host waits for the window's last one only, when it computes the median."""
    logged: list[tuple[int, dict]] = []
    marks = iter(FakeEvent(10.0 * i) for i in range(100))  # a step every 10 ms
    monkeypatch.setattr(Throughput, "_mark", staticmethod(lambda device: next(marks)))
    FakeEvent.waits = 0
    throughput = Throughput(flops_per_token=None, peak_flops=None, window=4)

    class FakeLogger:
        def log_metrics(self, metrics, step):
            logged.append((step, metrics))

    module = SimpleNamespace(device=torch.device("cpu"), tokens_per_step=640)
    epoch_loop = SimpleNamespace(_batches_that_stepped=0)
    trainer = SimpleNamespace(global_step=0, world_size=1, loggers=[FakeLogger()],
                              fit_loop=SimpleNamespace(epoch_loop=epoch_loop))
    for step in range(1, 10):
        trainer.global_step, epoch_loop._batches_that_stepped = step, step - 1  # as at on_train_batch_end
        throughput.on_train_batch_end(trainer, module)
    assert FakeEvent.waits == 2  # two windows of 4 steps in 9 marks
    assert [step for step, _ in logged] == [4, 8]  # the 5th and 9th steps, counted from 0 as Lightning does
    assert logged[0][1]["throughput/step_time_s"] == pytest.approx(0.01)
    assert logged[0][1]["throughput/tokens_per_s"] == pytest.approx(64_000)


def test_step_log_flushes_each_line_and_reuses_the_modules_float(tmp_path):
    """Each line is on disk as soon as it is written (a kill -9 keeps it); the loss is the module's float, not
    a read of the loss tensor."""
    log = StepLog(tmp_path / "steps.jsonl")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    trainer = type("Trainer", (), {"is_global_zero": True, "global_step": 1, "optimizers": [optimizer]})()

    class Unreadable(torch.Tensor):
        def __float__(self):
            raise AssertionError("the step log read the loss tensor")

    log.on_train_batch_end(trainer, None, {"loss": torch.ones(()).as_subclass(Unreadable), "loss_value": 2.5}, None, 0)
    assert json.loads((tmp_path / "steps.jsonl").read_text()) == {"step": 1, "loss": 2.5, "lr": 0.5}
    trainer.global_step = 2
    log.on_train_batch_end(trainer, None, None, None, 0)  # a step the guard skipped: no line
    log.on_train_batch_end(trainer, None, {"loss": torch.tensor(3.0)}, None, 0)  # a module without loss_value
    assert [json.loads(line)["loss"] for line in (tmp_path / "steps.jsonl").read_text().splitlines()] == [2.5, 3.0]
    log.teardown(trainer, None, "fit")
    assert log._file is None


@pytest.mark.parametrize("clip", ["0.05", "null"])
def test_grad_norm_is_the_clipping_norm_and_clipping_is_lightnings(prepared_sample, tmp_path, clip, monkeypatch):
    """train/grad_norm is the norm clip_grad_norm_ returned (no second computation), and the clipped
    gradients are what Lightning's own clipping gives; with no clipping the norm is computed on logging steps."""
    calls: list[torch.Tensor] = []
    clip_grad_norm = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        norm = clip_grad_norm(parameters, max_norm, *args, **kwargs)
        calls.append(norm.detach().clone())
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    result = tiny_run(prepared_sample, tmp_path, f"trainer.gradient_clip_val={clip}", "trainer.max_steps=4",
                      "trainer.log_every_n_steps=2")
    logged = {m.step: m.value for m in MlflowClient().get_metric_history(result["run_id"], "train/grad_norm")}
    assert sorted(logged) == [1, 3]  # the 2nd and 4th steps, counted from 0 as Lightning does
    if clip == "null":
        assert calls == [] and all(value > 0 for value in logged.values())
    else:
        assert len(calls) == 4  # one norm per step: the clip's
        assert logged == {1: pytest.approx(calls[1].item()), 3: pytest.approx(calls[3].item())}


def test_lightnings_clipping_and_ours_give_the_same_gradients():
    """configure_gradient_clipping's clip and Lightning's Precision.clip_grad_by_norm: bit for bit."""
    from lightning.pytorch.plugins.precision import Precision

    from lab.training.module import CausalLMModule

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW([{"params": [model[1].weight, model[0].weight]},
                                   {"params": [model[0].bias, model[1].bias]}])
    model(torch.randn(4, 8)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    Precision().clip_grad_by_norm(optimizer, 0.01)
    lightnings = [p.grad.clone() for p in model.parameters()]
    for param, grad in zip(model.parameters(), grads):
        param.grad = grad.clone()

    class Host:  # the parts of the module and its trainer that configure_gradient_clipping touches
        trainer = type("Trainer", (), {"precision_plugin": Precision(), "world_size": 1,
                                       "_logger_connector": type("C", (), {"should_update_logs": False})(),
                                       "fast_dev_run": False})()
        _grads_are_sharded = staticmethod(lambda: False)

    CausalLMModule.configure_gradient_clipping(Host(), optimizer, 0.01, "norm")
    assert all(torch.equal(ours.grad, theirs) for ours, theirs in zip(model.parameters(), lightnings))
    assert not all(torch.equal(clipped, raw) for clipped, raw in zip(lightnings, grads))  # it did clip
