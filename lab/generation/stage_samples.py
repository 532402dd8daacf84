"""Continuations of a fixed set of prompts during training (conf/callbacks/default.yaml `generations:`), so that
one can read how the model changes from stage to stage (web, then books).

Greedy and seeded sampling; the model is put in eval mode and back, and the global RNG state (CPU and CUDA) is
restored afterwards, so training draws exactly the numbers it would have drawn without them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from lab import LabError
from lab.config.checks import boolean, integer, number
from lab.generation.sampling import Sampling, generate_ids

log = logging.getLogger("lab.generation.stage_samples")

WHERE = "callbacks.generations"
MAX_PROMPTS = 64             # a stage end is no benchmark: a handful of prompts is the point
MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """The checked `callbacks.generations` node; its defaults are in conf/callbacks/default.yaml only."""

    prompts: tuple[str, ...]
    max_new_tokens: int
    greedy: bool
    sampled: bool
    seed: int
    temperature: float
    top_p: float

    @classmethod
    def off(cls) -> "GenerationSpec":
        """No generations (`generations: null`); the other fields are never read."""
        return cls(prompts=(), max_new_tokens=1, greedy=False, sampled=False, seed=0, temperature=1.0, top_p=1.0)

    @property
    def enabled(self) -> bool:
        return bool(self.prompts) and (self.greedy or self.sampled)

    @classmethod
    def from_config(cls, node: Any, where: str = WHERE) -> "GenerationSpec":
        """The checked settings of a `generations:` node (None: off); one LabError line for the first bad value."""
        if node is None:
            return cls.off()
        if isinstance(node, (DictConfig, ListConfig)):
            node = OmegaConf.to_container(node, resolve=True)
        if not isinstance(node, Mapping):
            raise LabError(f"{where} must be a mapping of settings (prompts, max_new_tokens, ...), not {node!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, node)) - fields)
        if unknown:
            raise LabError(f"{where} has unknown key(s) {unknown}; the settings are {sorted(fields)}")
        missing = sorted(fields - set(node))
        if missing:
            raise LabError(f"{where}.{missing[0]} is missing from the config "
                           "(restore it in conf/callbacks/default.yaml)")
        return cls(prompts=check_prompts(node["prompts"], f"{where}.prompts"),
                   max_new_tokens=_at_most(integer(1)(node["max_new_tokens"], f"{where}.max_new_tokens"),
                                           MAX_NEW_TOKENS, f"{where}.max_new_tokens"),
                   greedy=boolean(node["greedy"], f"{where}.greedy"),
                   sampled=boolean(node["sampled"], f"{where}.sampled"),
                   seed=integer(0)(node["seed"], f"{where}.seed"),
                   temperature=number(0, low_open=True)(node["temperature"], f"{where}.temperature"),
                   top_p=number(0, 1, low_open=True)(node["top_p"], f"{where}.top_p"))

    def samplings(self) -> list[tuple[str, Any]]:

        modes = []
        if self.greedy:  # plain argmax: no repetition penalty, so what the model itself prefers
            modes.append(("greedy", Sampling.greedy(self.max_new_tokens)))
        if self.sampled:  # temperature and nucleus only: top-k off, no repetition penalty
            modes.append(("sampled", Sampling(self.max_new_tokens, do_sample=True, temperature=self.temperature,
                                              top_k=0, top_p=self.top_p, repetition_penalty=1.0,
                                              num_return_sequences=1)))
        return modes

    def run(self, model: torch.nn.Module, tokenizer: Any) -> list[dict[str, Any]]:
        """Per prompt: {prompt, fed (the prompt text the model saw), cut (bool), <mode>: continuation}."""

        was_training = model.training
        device = model.device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        model.eval()
        results = [{"prompt": p} for p in self.prompts]
        try:
            # fork_rng: the RNG state after is the state before; set_stance: a compiled model decodes eagerly
            # (every new length would be another compilation)
            with torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"):
                for mode, sampling in self.samplings():
                    outputs = generate_ids(model, tokenizer, self.prompts, sampling, seed=self.seed,
                                           prepend_eos=True)  # a new document, as every one after the first in training
                    for result, (fed, new) in zip(results, outputs):
                        # decoded whole: a character split across the prompt's end stays one character
                        result[mode] = tokenizer.decode([*fed, *new[0].tolist()], skip_special_tokens=True)
                        result["fed"] = tokenizer.decode(fed, skip_special_tokens=True)
                        result["cut"] = len(fed) < 1 + len(tokenizer(result["prompt"], add_special_tokens=False)
                                                           ["input_ids"])
        except Exception as err:  # noqa: BLE001 - a diagnostic must not end a long run; the file says what failed
            log.warning("generations failed: %s: %s", type(err).__name__, err)
            for result in results:
                result["error"] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
        finally:
            model.train(was_training)
        return results

    def markdown(self, results: list[dict[str, Any]], when: str) -> str:
        """The generations as a Markdown page: settings, then per prompt its greedy and sampled continuations."""
        modes = [mode for mode, _ in self.samplings()]
        settings = [f"max_new_tokens {self.max_new_tokens}"] + (["greedy"] if self.greedy else []) + (
            [f"sampled with temperature {self.temperature}, top_p {self.top_p}, seed {self.seed} + prompt index"]
            if self.sampled else [])
        lines = [f"# Generations at {when}", "", "; ".join(settings) + ". Each prompt follows an end-of-text "
                 "token, as a document does in training; a continuation is shown after its prompt.", ""]
        for number_, result in enumerate(results):
            lines += [f"## Prompt {number_ + 1}" + (f" (sampling seed {self.seed + number_})" if self.sampled else ""),
                      "", *fenced(result["prompt"]), ""]
            if result.get("error"):
                lines += [f"Generation failed: {result['error']}", ""]
                continue
            if result.get("cut"):
                lines += ["The prompt was cut to its end to fit the model's window; the model saw:", "",
                          *fenced(result["fed"]), ""]
            for mode in modes:
                lines += [f"{mode}:", "", *fenced(result[mode]), ""]
        return "\n".join(lines)


def check_prompts(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise LabError(f"{key} must be a list of strings (an empty list turns generations off), not {value!r}")
    if len(value) > MAX_PROMPTS:
        raise LabError(f"{key} has {len(value)} prompts; at most {MAX_PROMPTS} (they run at every stage end)")
    for index, prompt in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(prompt, str):
            raise LabError(f"{where}={prompt!r} is not a string; quote it in the YAML")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise LabError(f"{where} has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate: no file, tokenizer or MLflow text can hold it
            raise LabError(f"{where} is not valid Unicode text ({err.reason} at character {err.start}); "
                           "write it as plain UTF-8") from None
    return tuple(value)


def _at_most(value: int, limit: int, key: str) -> int:
    if value > limit:
        raise LabError(f"{key}={value} is not allowed: expected at most {limit} (generations run at every stage end)")
    return value


def fenced(text: str) -> list[str]:
    """`text` in a fence longer than any run of backticks inside it, so no text can close it early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}text", text, fence]
