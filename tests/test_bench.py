"""lab.bench: a CPU smoke run of every arch at size tiny, the batch search, and the CLI's errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lab import bench
from lab.bench import available_archs


def test_cpu_smoke_run_writes_table_and_ratios(tmp_path, capsys):
    code = bench.main(["--size", "tiny", "--tokenizer", "bpe2k", "--seq-len", "32", "--batch", "2", "--steps", "2",
                       "--warmup", "1", "--device", "cpu", "--loss-chunk", "24", "--out", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "bench_cpu_tiny.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["arch"], r["setting"]) for r in rows] == [(a, s) for a in available_archs() for s in ("tuned", "plain")]
    for tuned, plain in zip(rows[::2], rows[1::2]):
        assert float(tuned["tokens_per_s"]) > 0 and float(plain["tokens_per_s"]) > 0
        assert float(tuned["speedup"]) == pytest.approx(float(tuned["tokens_per_s"]) / float(plain["tokens_per_s"]))
        assert tuned["loss"] == "chunked" and plain["loss"] == "transformers" and tuned["compiled"] == "False"
        # same weights, same batch: the two settings compute the same loss
        assert float(tuned["loss_value"]) == pytest.approx(float(plain["loss_value"]), rel=1e-4)
        assert float(tuned["gflops_per_token"]) > 0 and tuned["mfu"] == ""  # no peak FLOP/s known on a CPU
    by_arch = {r["arch"]: r for r in rows[::2]}
    assert by_arch["mamba2"]["attention"] == "eager" and "not importable" in by_arch["mamba2"]["notes"]
    assert by_arch["mistral_swa"]["attention"] == "sdpa"  # flex only on CUDA
    report = json.loads((tmp_path / "bench_cpu_tiny.json").read_text())
    assert report["environment"]["precision"] == "fp32" and len(report["rows"]) == 10
    assert all(len(r["step_times_ms"]) == 2 for r in report["rows"])
    printed = capsys.readouterr().out
    assert "| llama_gqa | tuned |" in printed
    assert (tmp_path / "bench_cpu_tiny.md").read_text().count("\n|") == 12  # header, rule, 10 rows


def test_mfu_with_a_peak_override(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_PEAK_TFLOPS", "1")
    assert bench.main(["--archs", "llama_gqa", "--size", "tiny", "--tokenizer", "bpe2k", "--seq-len", "16",
                       "--batch", "1", "--steps", "1",
                       "--warmup", "0", "--settings", "plain", "--device", "cpu", "--out", str(tmp_path)]) == 0
    row = next(csv.DictReader(open(tmp_path / "bench_cpu_tiny.csv")))
    expected = float(row["tokens_per_s"]) * float(row["gflops_per_token"]) * 1e9 / 1e12
    assert float(row["mfu"]) == pytest.approx(expected)


def test_max_batch_takes_the_largest_power_of_two_that_fits(monkeypatch):
    tried = []

    def fake_fits(make_run, batch, seq_len):
        tried.append(batch)
        return batch * seq_len <= 48 * 128

    monkeypatch.setattr(bench, "fits", fake_fits)
    assert bench.max_batch(lambda: None, seq_len=128) == 32
    assert tried == [1, 2, 4, 8, 16, 32, 64]
    monkeypatch.setattr(bench, "fits", lambda *args: False)
    with pytest.raises(bench.LabError, match="not even a micro-batch of 1"):
        bench.max_batch(lambda: None, seq_len=128)


def test_fits_treats_only_out_of_memory_as_not_fitting():
    class OOMRun:
        vocab, device = 8, torch.device("cpu")

        def step(self, batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def close(self):
            pass

    class BrokenRun(OOMRun):
        def step(self, batch):
            raise RuntimeError("shape mismatch")

    assert bench.fits(OOMRun, 4, 16) is False
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.fits(BrokenRun, 4, 16)


def test_a_failing_setting_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    real_step = bench.Run.step

    def step(self, batch):
        if self.setting.name == "tuned":
            raise ValueError("kernel exploded\nsecond line")
        return real_step(self, batch)

    monkeypatch.setattr(bench.Run, "step", step)
    assert bench.main(["--archs", "llama_gqa", "--size", "tiny", "--tokenizer", "bpe2k", "--seq-len", "16",
                       "--batch", "1", "--steps", "1",
                       "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)]) == 0
    tuned, plain = list(csv.DictReader(open(tmp_path / "bench_cpu_tiny.csv")))
    assert tuned["notes"] == "failed: ValueError: kernel exploded" and tuned["tokens_per_s"] == ""
    assert float(plain["tokens_per_s"]) > 0


@pytest.mark.parametrize("argv, message", [
    (["--archs", "gpt5"], "unknown arch 'gpt5'"),
    (["--size", "huge", "--archs", "llama_gqa"], "unknown size 'huge'"),
    (["--tokenizer", "bpe1m", "--archs", "llama_gqa"], "unknown tokenizer 'bpe1m'"),
    (["--settings", "fast"], "choose from tuned, plain"),
    (["--batch", "lots"], "positive integer or auto"),
    (["--precision", "fp8", "--device", "cpu"], "--precision 'fp8'"),
])
def test_bad_arguments_are_reported_without_traceback(argv, message, capsys, tmp_path):
    assert bench.main([*argv, "--steps", "1", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_cuda_device_without_cuda_is_a_clear_error(capsys):
    assert bench.main(["--device", "cuda"]) == 1
    assert "no CUDA device" in capsys.readouterr().err
