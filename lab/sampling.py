"""Text generation from a loaded model: the decoding settings (`Sampling`), prompts, and continuations (greedy or
sampled, seeded). The command and its usage: lab/generate.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from lab import LabError
from lab.model_io import load_model, load_tokenizer, quiet_transformers, resolve_device, resolve_dtype, resolve_source

log = logging.getLogger("lab.generate")  # the command's name: its console lines keep their prefix


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LabError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.do_sample and self.temperature <= 0:
            raise LabError(f"temperature={self.temperature} must be > 0 when sampling (do_sample=false is greedy)")
        if self.top_k < 0:
            raise LabError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise LabError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise LabError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 disables it)")
        if self.num_return_sequences < 1 or (not self.do_sample and self.num_return_sequences > 1):
            raise LabError("num_return_sequences must be >= 1, and 1 for greedy decoding (it would repeat itself)")

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                  "repetition_penalty": self.repetition_penalty,
                                  "num_return_sequences": self.num_return_sequences}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:  # greedy: unset the sampling knobs a saved generation_config may carry
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return kwargs

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Sampling":
        fields = cls.__dataclass_fields__
        values = {key: cfg[key] for key in fields if cfg.get(key) is not None}
        try:
            typed = {key: type(fields[key].default)(value) for key, value in values.items()}
        except (TypeError, ValueError) as err:
            raise LabError(f"bad generation setting: {err}") from None
        return cls(**typed)


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise LabError(f"prompt_file not found: {path}")
        prompts = [line.replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise LabError(f"prompt_file {path} has no prompt (one per non-empty line)")
        return prompts
    if prompt is None or str(prompt) == "":
        raise LabError("give a prompt: \"prompt='Era odată'\" (quoted as a whole) or prompt_file=<file with one prompt per line>")
    return [str(prompt)]


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer: Any, prompts: Sequence[str], sampling: Sampling, seed: int = 0,
                 prepend_eos: bool = True) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt: the prompt ids fed to the model and the new ids [num_return_sequences, new_tokens]."""
    config = model.generation_config
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    limit = getattr(model.config, "max_position_embeddings", None)
    outputs = []
    for index, prompt in enumerate(prompts):
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if prepend_eos and eos is not None:
            ids = [eos, *ids]
        kwargs = sampling.generate_kwargs()
        if limit and len(ids) + sampling.max_new_tokens > limit:
            # fit the model's positions: fewer new tokens, and if need be only the end of the prompt
            new_tokens = max(limit - len(ids), min(sampling.max_new_tokens, limit // 2))
            log.warning("prompt %d (%d tokens) + max_new_tokens=%d exceed the model's %d positions: generating %d "
                        "tokens after the prompt's last %d", index, len(ids), sampling.max_new_tokens, limit,
                        new_tokens, min(len(ids), limit - new_tokens))
            ids = ids[-(limit - new_tokens):]
            kwargs["max_new_tokens"] = new_tokens
        input_ids = torch.tensor([ids], device=model.device)                 # [1, T]
        torch.manual_seed(seed + index)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad,
                             **kwargs)                                       # [num_return_sequences, T + new]
        outputs.append((ids, out[:, input_ids.shape[1]:].cpu()))
    return outputs


def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], sampling: Sampling, seed: int = 0,
             prepend_eos: bool = True) -> list[list[str]]:
    """Continuations (new text only) of each prompt: one list of num_return_sequences strings per prompt."""
    return [[tokenizer.decode(row, skip_special_tokens=True) for row in new]
            for _, new in generate_ids(model, tokenizer, prompts, sampling, seed, prepend_eos)]


def run(cfg: DictConfig | Mapping[str, Any]) -> list[list[str]]:
    quiet_transformers()
    sampling = Sampling.from_config(cfg)
    prompts = read_prompts(cfg.get("prompt"), cfg.get("prompt_file"))
    source = resolve_source(cfg.get("model_path"))
    device = resolve_device(cfg.get("device"))
    model, _ = load_model(source, device, resolve_dtype(cfg.get("dtype"), device))  # variants keep their dtypes
    tokenizer = load_tokenizer(source, cfg.get("tokenizer_path"))
    results = generate(model, tokenizer, prompts, sampling, int(cfg.get("seed", 0)), bool(cfg.get("prepend_eos", True)))
    for prompt, continuations in zip(prompts, results):
        for number, text in enumerate(continuations):
            tag = f" [{number + 1}]" if len(continuations) > 1 else ""
            print(f"\n>>> {prompt}{tag}\n{prompt}{text}")
    return results
