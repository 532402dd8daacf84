"""Sample text from any lab model: `python -m lab.generate model_path=<run>/hf "prompt='Era odată'"`.

    python -m lab.generate model_path=outputs/<run>/<time>/hf "prompt='Era odată'" [max_new_tokens=100]
    python -m lab.generate model_path=.../quantized/hf/int8wo prompt_file=prompts.txt do_sample=false
    python -m lab.generate model_path=.../checkpoints/last.ckpt temperature=0.7 top_k=40 top_p=0.9 seed=7

A prompt with spaces is quoted for Hydra inside the shell's quotes: "prompt='Era odată'".
Works for every arch and for lab.quantize variants (transformers' generate). Decoding: greedy
(`do_sample=false`) or sampling with temperature / top-k / top-p, plus a repetition penalty; `seed`
makes samples reproducible (prompt i uses seed + i). `prompt_file`: one prompt per non-empty line
(write `\\n` for a line break inside a prompt). Documents in the training stream follow an EOS token,
so by default a prompt starts after one (`prepend_eos`), as a new document would.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from lab import run_or_exit
from lab.generation.sampling import GenerateSettings, run

log = logging.getLogger("lab.generate")


@hydra.main(config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    run_or_exit(lambda composed: run(GenerateSettings.from_config(composed)), cfg, log)


if __name__ == "__main__":
    main()
