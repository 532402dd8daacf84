"""Offline log-likelihood multiple choice: lm-eval's acc / acc_norm on a small JSONL task format.

One item per line:

    {"context": "Capitala României este", "choices": ["București", "Iași", "Cluj"], "label": 0}

(optional: "id"). Each choice is scored as the summed log-probability of its tokens after
`context + delimiter`; `acc` picks the highest sum, `acc_norm` the highest sum per character of the
choice (lm-eval's length normalisation), `chance` is the mean of 1/len(choices): the accuracy of
guessing. The same numbers for any arch, float or quantized: only the model's logits are used.

The scores are lm-eval's (`HFLM._encode_pair` and `_loglikelihood_tokens`, lm-eval 0.4), token for token:
whitespace at the end of the context moves into the continuation; the continuation is what follows the
context's own token count in the encoding of the whole string; an input longer than the window keeps its
last window + 1 tokens (the last one is only predicted). So `lab.evaluate "lm_eval_tasks=[...]"` (lab/
lm_eval_tasks.py) and this scorer give the same per-item log-likelihoods, acc and acc_norm on the same
items (tests/test_lm_eval.py checks it on data/sample/tasks/lm_eval/).
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
        if not isinstance(context, str) or not context.strip():
            # lm-eval moves trailing whitespace into the choice: a blank context would leave nothing to condition on
            raise LabError(f"{where}: `context` must be a string with some non-whitespace text")
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
    """(context ids, continuation ids) as lm-eval's `_encode_pair` splits them.

    Whitespace at the end of the context moves to the front of the continuation (a BPE writes a space with
    the word after it), the whole string is encoded once, and the continuation is every token after the
    first len(context ids): a merge across the boundary tokenizes as the model saw text in training.
    Only where nothing is left after the context (lm-eval stops on such a pair) is the continuation encoded
    on its own.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = _encode(tokenizer, stripped)
    if not context_ids:
        raise LabError(f"context {context!r} has no tokens once its trailing whitespace goes to the choice")
    tail = _encode(tokenizer, stripped + continuation)[len(context_ids):]
    return context_ids, tail or _encode(tokenizer, continuation)


@torch.no_grad()
def choice_logprobs(model: nn.Module, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
                    batch_size: int = 16) -> list[float]:
    """Summed log P(continuation | context) for each (context ids, continuation ids) pair.

    As lm-eval: of context + continuation the last max_length + 1 tokens are kept and the model reads all
    but the last, so every continuation token is predicted and the context keeps max_length + 1 - len(cont)
    tokens. A continuation longer than max_length cannot be scored (a LabError).
    """
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(requests), batch_size):
        batch = []
        for context, continuation in requests[start : start + batch_size]:
            if not context or not continuation or len(continuation) > max_length:
                raise LabError(f"cannot score a continuation of {len(continuation)} tokens after {len(context)} "
                               f"context tokens in a window of {max_length}")
            ids = (context + continuation)[-(max_length + 1):]
            batch.append((ids[:-1], ids[-len(continuation):]))
        width = max(len(inputs) for inputs, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)        # [B, T], right-padded
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (inputs, _) in enumerate(batch):
            input_ids[row, : len(inputs)] = torch.tensor(inputs)
            attention[row, : len(inputs)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()                 # [B, T, V]
        for row, (inputs, targets) in enumerate(batch):
            # position t predicts token t+1: the last len(targets) input positions predict the continuation
            positions = torch.arange(len(inputs) - len(targets), len(inputs))
            scores.append(logprobs[row, positions, torch.tensor(targets)].sum().item())
    return scores


def item_logprobs(model: nn.Module, tokenizer: Any, items: Sequence[MCItem], delimiter: str = " ",
                  max_length: int = 2048, batch_size: int = 16) -> list[list[float]]:
    """Per item, the summed log-likelihood of each choice (lm-eval's `resps` of a multiple_choice task)."""
    requests = []
    for item in items:
        for number, choice in enumerate(item.choices):
            request = continuation_ids(tokenizer, item.context, delimiter + choice)
            if len(request[1]) > max_length:
                raise LabError(f"item {item.id}: choice {number} is {len(request[1])} tokens long, more than the "
                               f"scoring window of {max_length}; shorten it")
            requests.append(request)
    scores = choice_logprobs(model, requests, max_length, batch_size)
    per_item, offset = [], 0
    for item in items:
        per_item.append(scores[offset : offset + len(item.choices)])
        offset += len(item.choices)
    return per_item


def score_task(model: nn.Module, tokenizer: Any, items: Sequence[MCItem], name: str = "task",
               delimiter: str = " ", max_length: int = 2048, batch_size: int = 16) -> MCResult:
    """acc, acc_norm and chance of `items` under the model."""
    correct = correct_norm = 0
    chance = 0.0
    for item, item_scores in zip(items, item_logprobs(model, tokenizer, items, delimiter, max_length, batch_size)):
        normalised = [s / len(c) for s, c in zip(item_scores, item.choices)]
        # the first of equal scores wins, as numpy's argmax in lm-eval
        correct += int(max(range(len(item_scores)), key=item_scores.__getitem__) == item.label)
        correct_norm += int(max(range(len(normalised)), key=normalised.__getitem__) == item.label)
        chance += 1 / len(item.choices)
    n = len(items)
    return MCResult(name, n, correct / n, correct_norm / n, chance / n)
