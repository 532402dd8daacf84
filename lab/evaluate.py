"""Evaluate a model and its quantized variants: `python -m lab.evaluate model_path=<run>/hf`.

    python -m lab.evaluate model_path=outputs/<run>/<time>/hf [variants=[fp32,int8wo]] [texts=[a.txt]]
                           [tasks=[data/sample/tasks/ro_mc_sample.jsonl]] [efficiency.compile=true]
    python -m lab.evaluate runs=experiment:arch_bakeoff_tiny ["run_tags={bakeoff:tiny-v1}"] [run_latest=false]

`runs=experiment:<name>` evaluates the HF export of every finished training run of that MLflow experiment
(the newest per run name unless run_latest=false; `run_tags` narrows by tags; lab/runs/selection.py) in turn,
each into <output_dir>/<run name>/: a run that fails is reported and the others go on; the command then exits
non-zero with one line naming the failed runs. Give one of model_path and runs, not both.

For the model (HF folder or lab.train checkpoint) and every variant lab.quantize wrote for it
(`variants=auto`; without any, the model alone, named by its dtype), measures:

- quality: loss / perplexity / bits-per-byte on each source's held-out split of the prepared data
  (manifest.json + <source>/val.bin; `bpb = loss / ln 2 * tokens / text_bytes`, the trainer's formula,
  on the same evenly spaced blocks as the trainer's validation: `max_blocks=auto` takes the run's
  train.val_max_blocks), the same on any text file (strided sliding windows, HF's perplexity recipe),
  and multiple-choice accuracy on JSONL tasks (lab/evaluation/tasks.py);
- efficiency: parameters, bytes on disk, in-memory weight bytes, load time, peak memory while loading
  and generating (process RSS above the starting point on CPU, allocated memory on CUDA), time to
  first token per prompt length (capped to what the model's positions allow), decode tokens/s at
  each batch size; optionally with a static KV cache + torch.compile (`efficiency.compile`). On a
  busy CPU, `threads=1` keeps the timings stable (torch's default of one thread per core stalls
  when another job holds a core).

Results go to the screen (a table per variant), to eval.json in the Hydra run folder, and to MLflow:
one run per variant in the training run's experiment, tagged `eval_of` / `mlflow.parentRunId` = the
training run (found through <run_dir>/mlflow_run_id), `variant`, `kind=eval`, so `lab.compare` shows
them beside the training figures. Metric names (v = variant, s = source, t = text or task file stem):

    quant/<v>/val/<s>/loss | ppl | bpb          quant/<v>/text/<t>/loss | ppl | bpb
    quant/<v>/task/<t>/acc | acc_norm | acc_stderr | chance
    quant/<v>/lm_eval/<task>/<metric>            (lm-eval's own metric names; n = items; lm_eval_tasks=[...])
    quant/<v>/params  quant/<v>/size_mb  quant/<v>/weights_mb  quant/<v>/load_s
    quant/<v>/peak_ram_mb (CPU) | quant/<v>/peak_vram_mb (CUDA)
    quant/<v>/ttft_ms_<prompt length>  quant/<v>/decode_tok_s_bs<batch size>

(MB = 10^6 bytes.)
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from lab import run_or_exit
from lab.evaluation.settings import EvaluateSettings
from lab.evaluation.suite import evaluate_command

log = logging.getLogger("lab.evaluate")


@hydra.main(config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_or_exit(lambda composed: evaluate_command(EvaluateSettings.in_run_folder(composed)), cfg, log)


if __name__ == "__main__":
    main()
