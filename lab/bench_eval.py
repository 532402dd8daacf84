"""Quantized-vs-float benchmark: `python -m lab.bench_eval model_path=<run>/hf` (config: conf/evaluate.yaml).

Quantizes the model with `bench.variant` (int8 weight-only by default) when lab.quantize has not
already, evaluates it beside the float reference, and checks:

1. perplexity: the variant's perplexity on every held-out source (and text) is at most
   `bench.max_ppl_increase` (1%) above the reference's;                           measured anywhere
2. weight memory: the variant's weight bytes (int8 + scales + the float parts) at most
   `bench.max_weight_memory_ratio` (0.55) of the bf16 model's. Bytes do not depend on the device, so
   this is computed on a bf16 copy quantized in memory, on any machine;           measured anywhere
3. decode speed: tokens/s at batch 1 with static cache + torch.compile at least
   `bench.min_decode_speedup` (1.3x) the bf16 reference's;                        CUDA only (on CPU the
   ratio is printed for information, but the criterion is "not measured").

Prints a table, writes bench.json to the run folder, adds the figures to the variant's MLflow eval
run (`quant/<variant>/bench/...`) and exits non-zero when a measured criterion fails.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import hydra
import torch
from omegaconf import DictConfig

from lab import LabError, run_or_exit
from lab.config.compose import settings_for
from lab.evaluation.settings import Bench, EvaluateSettings
from lab.evaluation.suite import Report, evaluate
from lab.models.loading import (default_output_dir, dtype_name, load_model, read_index, resolve_device,
                                resolve_dtype, resolve_source, weight_bytes)
from lab.models.quant_formats import VARIANTS
from lab.quantization.quantizer import made_with, quantize, quantize_model
from lab.quantization.settings import QuantizeSettings
from lab.runs.tables import markdown_table
from lab.runs.tracking import tracking_uri

log = logging.getLogger("lab.bench_eval")


@dataclass
class Criterion:
    name: str
    value: float | None
    threshold: float
    passed: bool | None          # None: not measured on this device
    note: str = ""


def weight_memory_ratio(model_path: Path, variant_name: str, options: Mapping[str, Any]) -> tuple[float, int, int]:
    """(variant bytes / bf16 bytes, bf16 bytes, variant bytes) of the model's weights, quantized in memory on the CPU
    exactly as lab.quantize does (for int8wo: the tied embedding / LM head too, unless quantize_embedding=false)."""
    variant = VARIANTS[variant_name]
    model, _ = load_model(model_path, "cpu", torch.bfloat16)
    reference = weight_bytes(model)
    quantize_model(model, variant, options, torch.device("cpu"))
    quantized = weight_bytes(model)
    return quantized / reference, reference, quantized


def quantize_settings(settings: "EvaluateSettings") -> "QuantizeSettings":
    """lab.quantize's settings (conf/quantize.yaml + bench.quantize overrides) for the benchmarked variant of this
    model, on this device and dtype, into quantized_dir (or lab.quantize's default folder)."""
    source = resolve_source(settings.model_path)
    return settings_for(QuantizeSettings, list(settings.bench.quantize), model_path=str(source.path),
                        variants=[settings.bench.variant], device=settings.device, dtype=settings.dtype,
                        tokenizer_path=settings.tokenizer_path,
                        output_dir=str(settings.quantized_dir or default_output_dir(source)))


def ensure_variant(settings: "EvaluateSettings", quantizing: "QuantizeSettings") -> Path:
    """The quantize output root holding the benchmarked variant (quantized now if it is missing)."""
    device = resolve_device(settings.device)
    reference = dtype_name(resolve_dtype(settings.dtype, device))
    root = Path(quantizing.output_dir)
    index = read_index(root)
    variant = settings.bench.variant
    if (index is None or index["reference"] != reference
            or not made_with(index, resolve_source(quantizing.model_path), variant, quantizing.variant_options[variant])):
        log.info("quantizing %s to %s first", quantizing.model_path, settings.bench.variant)
        quantize(quantizing)
    return root


def criteria(reference: Report, variant: Report, bench: "Bench", device: torch.device,
             memory_ratio: float) -> list[Criterion]:
    ppl_keys = sorted(k for k in reference.metrics if k.endswith("/ppl") and not k.startswith("task/"))
    if not ppl_keys:
        raise LabError("the benchmark needs held-out perplexity: give prepared_dir=<folder> or texts=[file]")
    increases = {k: variant.metrics[k] / reference.metrics[k] - 1 for k in ppl_keys}
    worst = max(increases, key=increases.get)
    limit = bench.max_ppl_increase
    results = [Criterion("ppl_increase", increases[worst], limit, increases[worst] <= limit,
                         f"worst of {', '.join(f'{k} {v:+.3%}' for k, v in increases.items())}")]
    mem_limit = bench.max_weight_memory_ratio
    results.append(Criterion("weight_memory_ratio_bf16", memory_ratio, mem_limit, memory_ratio <= mem_limit,
                             "variant weight bytes / bf16 weight bytes (device-independent)"))
    speed_ref, speed_var = reference.metrics.get("decode_tok_s_bs1"), variant.metrics.get("decode_tok_s_bs1")
    speedup = speed_var / speed_ref if speed_ref and speed_var else None
    speed_limit = bench.min_decode_speedup
    if device.type == "cuda" and speedup is not None:
        compiled = variant.params.get("compile") == "True"
        results.append(Criterion("decode_speedup_bs1", speedup, speed_limit, speedup >= speed_limit,
                                 f"{speed_var:.1f} vs {speed_ref:.1f} tokens/s, compile={compiled}"))
    else:
        results.append(Criterion("decode_speedup_bs1", speedup, speed_limit, None,
                                 f"not measured: the criterion is for CUDA (here {device}: "
                                 + (f"{speed_var:.1f} vs {speed_ref:.1f} tokens/s)" if speedup else "no timing)")))
    return results


def format_criteria(results: list[Criterion], variant: str, reference: str) -> str:
    rows = []
    for c in results:
        verdict = "not measured" if c.passed is None else ("PASS" if c.passed else "FAIL")
        value = "" if c.value is None else (f"{c.value:+.3%}" if c.name == "ppl_increase" else f"{c.value:.3f}")
        sign = "<=" if c.name != "decode_speedup_bs1" else ">="
        threshold = f"{sign} {c.threshold:.2%}" if c.name == "ppl_increase" else f"{sign} {c.threshold}"
        rows.append([c.name, value, threshold, verdict, c.note])
    return markdown_table([f"{variant} vs {reference}", "value", "threshold", "result", "note"], rows)


def bench(settings: "EvaluateSettings") -> dict[str, Any]:
    variant = settings.bench.variant
    if variant not in VARIANTS:
        raise LabError(f"bench.variant={variant!r} is not a variant; known: {', '.join(VARIANTS)}")
    device = resolve_device(settings.device)
    reference = dtype_name(resolve_dtype(settings.dtype, device))
    quantizing = quantize_settings(settings)
    root = ensure_variant(settings, quantizing)
    reports = {r.name: r for r in evaluate(dataclasses.replace(settings, variants=(reference, variant),
                                                               quantized_dir=str(root), tasks=()))}
    ratio, bf16_bytes, variant_bytes = weight_memory_ratio(Path(reports[reference].path), variant,
                                                           quantizing.variant_options[variant])
    results = criteria(reports[reference], reports[variant], settings.bench, device, ratio)
    print(format_criteria(results, variant, reference))
    summary = {"model_path": str(settings.model_path), "device": str(device), "reference": reference,
               "variant": variant, "bf16_weight_bytes": bf16_bytes, "variant_weight_bytes_bf16": variant_bytes,
               "criteria": [asdict(c) for c in results],
               "metrics": {name: r.metrics for name, r in reports.items()}}
    if settings.output_dir:
        out_dir = Path(settings.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.json").write_text(json.dumps(summary, indent=1))
    run_id = reports[variant].run_id
    if run_id:
        from mlflow.tracking import MlflowClient


        client = MlflowClient(tracking_uri(settings.mlflow.tracking_uri))
        for c in results:
            if c.value is not None and math.isfinite(c.value):
                client.log_metric(run_id, f"quant/{variant}/bench/{c.name}", float(c.value))
    return summary


def bench_and_judge(settings: "EvaluateSettings") -> dict:
    if settings.runs:
        raise LabError(f"lab.bench_eval benchmarks one model: give model_path=<run>/hf, not runs={settings.runs} "
                       "(runs= is for lab.quantize and lab.evaluate)")
    summary = bench(settings)
    failed = [c["name"] for c in summary["criteria"] if c["passed"] is False]
    if failed:  # a missed criterion fails the command like any other error: one line, exit status 1
        raise LabError(f"benchmark failed: {', '.join(failed)}")
    return summary


@hydra.main(config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_or_exit(lambda composed: bench_and_judge(EvaluateSettings.in_run_folder(composed)), cfg, log)


if __name__ == "__main__":
    main()
