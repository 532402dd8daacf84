"""Text generation from a loaded model: the decoding settings (`Sampling`), prompts, and continuations (greedy or
sampled, seeded). The command and its usage: lab/generate.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lab import LabError
from lab.models.loading import (load_model, load_tokenizer, quiet_transformers, resolve_device, resolve_dtype,
                                resolve_source)
from lab.models.settings import ModelSettings
from lab.config.checks import boolean, field, integer, number, optional, required, text
import dataclasses


log = logging.getLogger("lab.generate")  # the command's name: its console lines keep their prefix


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; their defaults are lab.generate's, in conf/generate.yaml."""

    max_new_tokens: int
    do_sample: bool                 # false: greedy (the sampling knobs are then unused)
    temperature: float
    top_k: int                      # 0: off
    top_p: float                    # 1.0: off
    repetition_penalty: float       # 1.0: off
    num_return_sequences: int

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
    def greedy(cls, max_new_tokens: int) -> "Sampling":
        """Plain argmax decoding, no repetition penalty: what the model itself prefers."""
        return cls(max_new_tokens, False, 1.0, 0, 1.0, 1.0, 1)

    @classmethod
    def from_config(cls, cfg: Any, prefix: str = "") -> "Sampling":
        """The decoding keys of a config node (lab.generate's root), each present and of its type; the ranges are
        checked by __post_init__, with messages that say what each value does."""

        at = f"{prefix}." if prefix else ""
        checks = {"max_new_tokens": integer(), "do_sample": boolean, "temperature": number(), "top_k": integer(),
                  "top_p": number(), "repetition_penalty": number(), "num_return_sequences": integer()}
        node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
        return cls(**{key: check(required(node, at + key), at + key) for key, check in checks.items()})


@dataclasses.dataclass(frozen=True)
class GenerateSettings(ModelSettings):
    config_name = "generate"  # conf/generate.yaml (settings_for)
    prompt: str | None = field(lambda value, key: None if value is None else str(value))
    prompt_file: str | None = field(optional(text))
    prepend_eos: bool = field(boolean)
    seed: int = field(integer(0))
    # lab.generation.sampling.Sampling from the root's decoding keys (max_new_tokens, temperature, ...), set by from_config
    sampling: Any = dataclasses.field(default=None, metadata={"derived": True})

    @classmethod
    def from_config(cls, cfg: Any) -> "GenerateSettings":
        parsed = cls.parse(cfg, "")
        return dataclasses.replace(parsed, sampling=Sampling.from_config(cfg))


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
def generate_ids(model: nn.Module, tokenizer: Any, prompts: Sequence[str], sampling: Sampling, *, seed: int,
                 prepend_eos: bool) -> list[tuple[list[int], torch.Tensor]]:
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


def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], sampling: Sampling, *, seed: int,
             prepend_eos: bool) -> list[list[str]]:
    """Continuations (new text only) of each prompt: one list of num_return_sequences strings per prompt."""
    return [[tokenizer.decode(row, skip_special_tokens=True) for row in new]
            for _, new in generate_ids(model, tokenizer, prompts, sampling, seed=seed, prepend_eos=prepend_eos)]


def run(settings: "GenerateSettings") -> list[list[str]]:
    """lab.generate: continuations of the prompt(s), printed; settings from lab.evaluation.settings."""
    quiet_transformers()
    prompts = read_prompts(settings.prompt, settings.prompt_file)
    source = resolve_source(settings.model_path)
    device = resolve_device(settings.device)
    model, _ = load_model(source, device, resolve_dtype(settings.dtype, device))  # variants keep their dtypes
    tokenizer = load_tokenizer(source, settings.tokenizer_path)
    results = generate(model, tokenizer, prompts, settings.sampling, seed=settings.seed,
                       prepend_eos=settings.prepend_eos)
    for prompt, continuations in zip(prompts, results):
        for number, text in enumerate(continuations):
            tag = f" [{number + 1}]" if len(continuations) > 1 else ""
            print(f"\n>>> {prompt}{tag}\n{prompt}{text}")
    return results
