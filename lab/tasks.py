"""Offline log-likelihood multiple choice: lm-eval's acc / acc_norm on a small JSONL task format.

One item per line:

    {"context": "Capitala României este", "choices": ["București", "Iași", "Cluj"], "label": 0}

(optional: "id"). Each choice is scored as the summed log-probability of its tokens after
`context + delimiter`; `acc` picks the highest sum, `acc_norm` the highest sum per character of the
choice (lm-eval's length normalisation), `chance` is the mean of 1/len(choices): the accuracy of
guessing. The same numbers for any arch, float or quantized: only the model's logits are used.

The HF exports (and lab.quantize's variant folders) also run in lm-eval itself for the public
Romanian benchmarks, e.g.
`lm_eval --model hf --model_args pretrained=<export>,dtype=float32 --tasks belebele_ron_Latn,xquad_ro`;
data/sample/tasks/lm_eval/ holds the sample task in lm-eval's format, on which both give the same
acc and acc_norm (see experiments/2026-12-01_quantize_eval/README.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lab import LabError


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    label: int
    id: str = ""


@dataclass(frozen=True)
class MCResult:
    name: str
    n: int
    acc: float
    acc_norm: float
    chance: float

    @property
    def acc_stderr(self) -> float:
        # the standard error of the mean of n 0/1 scores with the sample variance, as lm-eval reports it
        return math.sqrt(self.acc * (1 - self.acc) / (self.n - 1)) if self.n > 1 else float("nan")

    def metrics(self) -> dict[str, float]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "acc_stderr": self.acc_stderr, "chance": self.chance}


def load_task(path: str | Path) -> list[MCItem]:
    """Read and validate a JSONL task file (a LabError names the first bad line)."""
    path = Path(path)
    if not path.is_file():
        raise LabError(f"task file not found: {path}")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LabError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise LabError(f"{where}: expected an object with context, choices, label")
        context, choices, label = row.get("context"), row.get("choices"), row.get("label")
        if not isinstance(context, str) or not context:
            raise LabError(f"{where}: `context` must be a non-empty string")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise LabError(f"{where}: `choices` must be a list of at least two non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise LabError(f"{where}: `label` must be an index into choices (0..{len(choices) - 1}), got {label!r}")
        items.append(MCItem(context, tuple(choices), label, str(row.get("id", number))))
    if not items:
        raise LabError(f"task file {path} has no items")
    return items


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def continuation_ids(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split where the context's own tokens end.

    The whole string is encoded once so a merge across the boundary tokenizes as the model saw text
    in training; when the joint encoding does not start with the context's tokens, the two parts are
    encoded separately.
    """
    context_ids = _encode(tokenizer, context)
    whole = _encode(tokenizer, context + continuation)
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return context_ids, whole[len(context_ids):]
    return context_ids, _encode(tokenizer, continuation)


@torch.no_grad()
def choice_logprobs(model: nn.Module, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
                    batch_size: int = 16) -> list[float]:
    """Summed log P(continuation | context) for each (context ids, continuation ids) pair."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(requests), batch_size):
        batch = []
        for context, continuation in requests[start : start + batch_size]:
            ids = (context + continuation)[-max_length:]  # left-truncate the context if it is too long
            batch.append((ids, min(len(continuation), len(ids) - 1)))
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)        # [B, T], right-padded
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()                 # [B, T, V]
        for row, (ids, n_cont) in enumerate(batch):
            targets = torch.tensor(ids[len(ids) - n_cont:])                    # [n_cont]
            # position t predicts token t+1: the continuation's tokens are predicted from len-n_cont-1 on
            positions = torch.arange(len(ids) - n_cont - 1, len(ids) - 1)
            scores.append(logprobs[row, positions, targets].sum().item())
    return scores


def score_task(model: nn.Module, tokenizer: Any, items: Sequence[MCItem], name: str = "task",
               delimiter: str = " ", max_length: int = 2048, batch_size: int = 16) -> MCResult:
    """acc, acc_norm and chance of `items` under the model."""
    requests = []
    for item in items:
        for choice in item.choices:
            requests.append(continuation_ids(tokenizer, item.context, delimiter + choice))
    scores = choice_logprobs(model, requests, max_length, batch_size)
    correct = correct_norm = 0
    chance = 0.0
    offset = 0
    for item in items:
        item_scores = scores[offset : offset + len(item.choices)]
        offset += len(item.choices)
        normalised = [s / len(c) for s, c in zip(item_scores, item.choices)]
        correct += int(max(range(len(item_scores)), key=item_scores.__getitem__) == item.label)
        correct_norm += int(max(range(len(normalised)), key=normalised.__getitem__) == item.label)
        chance += 1 / len(item.choices)
    n = len(items)
    return MCResult(name, n, correct / n, correct_norm / n, chance / n)
