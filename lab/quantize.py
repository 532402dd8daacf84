"""Quantize a trained model into small torchao variants: `python -m lab.quantize model_path=<run>/hf`.

    python -m lab.quantize model_path=outputs/<run>/<time>/hf [variants=[int8wo,intx4wo]] [device=cpu]
    python -m lab.quantize model_path=outputs/<run>/<time>/checkpoints/last.ckpt
    python -m lab.quantize runs=experiment:arch_bakeoff_tiny ["run_tags={bakeoff:tiny-v1}"] [run_latest=false]

`model_path` is an HF export (save_pretrained + tokenizer) or a lab.train Lightning checkpoint.
`runs=experiment:<name>` instead quantizes the HF export of every finished training run of that MLflow
experiment (the newest per run name unless run_latest=false; `run_tags` narrows by tags; lab/runs/selection.py),
one after the other: a run that fails is reported and the others go on; the command then exits non-zero with
one line naming the failed runs. Give one of model_path and runs, not both.

Every variant is written as a self-contained HF folder (config.json with its `quantization_config`,
safetensors holding torchao tensors, the tokenizer) that `AutoModelForCausalLM.from_pretrained`
loads back; lab.models.loading's `load_model` additionally handles checkpoints and the one fix-up quantized
models need (below). The float reference is written beside them, so every variant is measured the same way.

Variants (torchao 0.18 `quantize_` configs, applied while transformers loads the float reference):

    name      torchao config                                              runs on
    int8wo    Int8WeightOnlyConfig (per-channel)                          cpu, cuda
    int8dq    Int8DynamicActivationInt8WeightConfig (per-token x per-ch.) cpu, cuda
    intx4wo   IntxWeightOnlyConfig(int4, PerGroup(group_size))            cpu  (int4 values stored unpacked in int8)
    int4wo    Int4WeightOnlyConfig(group_size, tile_packed_to_4d)         cuda (tinygemm kernel, bf16)
    float8dq  Float8DynamicActivationFloat8WeightConfig(PerRow)           cuda, compute capability >= 8.9 (H100)

What is quantized: the weight of every nn.Linear inside the blocks (attention q/k/v/o or the fused
query_key_value, the MLP, Mamba2's in_proj/out_proj). The tied input embedding / LM head: for int8wo
by default (`variant_options.<variant>.quantize_embedding`; int8wo and int8dq only), quantized ONCE as
the head's int8 weight (one scale per vocabulary row, which is also per token for the lookup) and that
single tensor is shared with the embedding, so the model stays tied and stores one int8 copy; the
other variants keep it float (quantizing only the head would untie it and store a second copy).
What stays float: norms, biases, Mamba2's conv1d and SSM parameters (A_log, D, dt_bias). Per variant,
a layer is also left float when its width does not divide into the variant's groups, or when its
class overrides `forward` with something other than F.linear; quantize.json lists every such layer
with the reason, and says per variant whether the embedding / head are quantized.

A shared int8 embedding is saved once (under the embedding's name; the head is tied to it on load,
as transformers does for float tied weights), so plain `from_pretrained` rebuilds the tied pair.
torchao's F.embedding on an int8 tensor dequantizes the whole table per call; `load_model` routes the
lookup through a row gather that dequantizes only the looked-up rows (the same numbers).

Output: `<run_dir>/quantized/<model name>/` (`output_dir=` to change; with runs=, `<output_dir>/<run name>/`),
one folder per variant plus quantize.json: per variant its path, bytes on disk, in-memory weight bytes,
quantized/skipped layers, the torchao config and the reload check (logits of the saved folder vs the
in-memory model).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from lab import run_or_exit
from lab.quantization.quantizer import quantize_command
from lab.quantization.settings import QuantizeSettings

log = logging.getLogger("lab.quantize")


@hydra.main(config_path="../conf", config_name="quantize")
def main(cfg: DictConfig) -> None:
    run_or_exit(lambda composed: quantize_command(QuantizeSettings.from_config(composed)), cfg, log)


if __name__ == "__main__":
    main()
