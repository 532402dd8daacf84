"""README.md of an HF export: what the model is, what it was trained on, how well it does, how it was made.

The MLflow run is the source: its tags (arch, data and tokenizer hashes, git commit), params (parameter counts,
tokens per step, the effective model fields) and metrics (per-domain val loss / bits per byte / perplexity,
tokens per source). The YAML front matter is the Hugging Face card metadata, with the results as `model-index`
at full precision; the text shows them rounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from lab import LabError
from lab.runs.records import as_number
from lab.runs.tables import markdown_table

# config fields worth a line in the card, when the model's config has them
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "sliding_window", "state_size", "expand", "num_heads", "head_dim",
                "vocab_size", "max_position_embeddings", "tie_word_embeddings")

INTENDED_USE = """\
A small base (pretrained, not instruction-tuned) causal language model for Romanian, trained with the `lab`
project to compare architectures and data curricula at equal budgets. Use it for research on pretraining:
perplexity / bits-per-byte comparisons, curriculum and forgetting studies, quantization experiments, and as a
starting point for continued pretraining or fine-tuning."""

LIMITS = """\
- It continues text; it does not follow instructions, answer questions reliably or know recent facts.
- Its size and training budget are small: expect fluent-looking but often wrong, repetitive or incoherent text.
- It learned from web text and books as they are, and can repeat their biases, errors and offensive content.
- Scores are on held-out text of the same sources it was trained on; they say little about other domains.
- It is not meant for decisions about people, nor for any use where a wrong text causes harm.
- Licence: none is set here. Choose one that the training data's terms allow before publishing the model."""


def split_metrics(metrics: Mapping[str, float]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """({source: {loss, bpb, ppl}} from `val/<source>/<name>`, {source: tokens} from `tokens/<source>`)."""
    domains: dict[str, dict[str, float]] = {}
    tokens: dict[str, float] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "val" and parts[2] in ("loss", "bpb", "ppl"):
            domains.setdefault(parts[1], {})[parts[2]] = float(value)
        elif len(parts) == 2 and parts[0] == "tokens":
            tokens[parts[1]] = float(value)
    return dict(sorted(domains.items())), dict(sorted(tokens.items()))


def card_facts(run: Any, stage: str, step: int | None, command: str | None,
               metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The card's facts from an MLflow run (None: only what the caller gives); `metrics` override the run's."""
    tags = dict(run.data.tags) if run is not None else {}
    params = dict(run.data.params) if run is not None else {}
    merged = {**(run.data.metrics if run is not None else {}), **(metrics or {})}
    domains, tokens = split_metrics(merged)
    tokens_per_step = as_number(params.get("train/tokens_per_step"))
    return {
        "arch": tags.get("arch"), "model_class": params.get("model/class"), "stage": stage, "step": step,
        "params_total": as_number(params.get("model/params_total")),
        "params_non_embedding": as_number(params.get("model/params_non_embedding")),
        "tokens": step * tokens_per_step if step is not None and tokens_per_step else None,
        "tokens_per_source": tokens, "seq_len": params.get("data.seq_len"),
        "curriculum": tags.get("curriculum"), "data_sha256": tags.get("data_sha256"),
        "tokenizer_sha256": tags.get("tokenizer_sha256"), "git_sha": tags.get("git_sha"),
        "val": domains, "val_loss": merged.get("val/loss"),
        "shape": {k: params[f"model.{k}"] for k in SHAPE_FIELDS if f"model.{k}" in params},
        "command": command or tags.get("command"),
        "run_id": run.info.run_id if run is not None else None,
        "experiment": tags.get("experiment_name"),
    }



def front_matter(facts: Mapping[str, Any], name: str) -> str:
    """Hugging Face card metadata; the licence is left for the user (a comment says so)."""
    tags = ["text-generation", "causal-lm", "romanian", "pretraining", "lab"]
    tags += [str(t) for t in (facts.get("arch"), facts.get("model_class")) if t]
    meta: dict[str, Any] = {"language": ["ro"], "library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": tags}
    results = [{"task": {"type": "text-generation", "name": "Causal language modeling"},
                "dataset": {"type": source, "name": f"{source} (held-out split)"},
                "metrics": [{"type": metric, "value": value, "name": f"{source} val {metric}"}
                            for metric, value in values.items()]}
               for source, values in facts["val"].items()]
    if results:
        meta["model-index"] = [{"name": name, "results": results}]
    body = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{body}# license: not set; choose one the training data's terms allow\n---\n"


def _count(value: float | None) -> str:
    if value is None:
        return "unknown"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix} ({int(value):,})"
    return f"{int(value):,}"


def card_text(facts: Mapping[str, Any], name: str) -> str:
    """The whole README.md: front matter, then the facts as text and tables."""
    stage = facts["stage"]
    when = "at the end of training" if stage == "final" else f"at the end of curriculum stage `{stage}`"
    lines = [front_matter(facts, name), f"# {name}", "",
             f"A {facts.get('arch') or 'causal LM'} model ({facts.get('model_class') or 'transformers'}) pretrained on "
             f"Romanian with the `lab` project, saved {when}"
             + (f" (optimizer step {facts['step']})." if facts.get("step") is not None else "."), "",
             "## Model", "", markdown_table(("property", "value"), model_rows(facts)), "",
             "## Training", "", markdown_table(("property", "value"), training_rows(facts)), "",
             "Trained with:", "", "```bash", str(facts.get("command") or "(not recorded)"), "```", "",
             *results_section(facts), "## How to use", "", "```python", "from transformers import pipeline", "",
             'generate = pipeline("text-generation", model="path/to/this/folder")',
             'print(generate("Era odată", max_new_tokens=40, do_sample=True, top_p=0.95)[0]["generated_text"])',
             "```", "",
             "Documents in training were separated by the end-of-text token, so a prompt reads best after one "
             "(`lab.generate` adds it). The tokenizer also loads with transformers 4.x "
             "(`PreTrainedTokenizerFast`).", "",
             "## Intended use", "", INTENDED_USE, "", "## Limits", "", LIMITS, ""]
    return "\n".join(lines)


def model_rows(facts: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """What the model is: its class, its size and the shape fields its config has."""
    return [("architecture", f"`{facts.get('arch')}` ({facts.get('model_class')})"),
            ("parameters", _count(facts.get("params_total"))),
            ("non-embedding parameters", _count(facts.get("params_non_embedding"))),
            *facts["shape"].items(),
            ("context (trained sequence length)", facts.get("seq_len"))]


def training_rows(facts: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """What it was trained on and with: tokens per source, the data, tokenizer and code it came from."""
    return [("tokens trained", _count(facts.get("tokens"))),
            *((f"tokens from `{source}`", _count(n)) for source, n in facts["tokens_per_source"].items()),
            ("curriculum", f"`{facts.get('curriculum')}`"),
            ("data sha256", f"`{facts.get('data_sha256')}`"),
            ("tokenizer sha256", f"`{facts.get('tokenizer_sha256')}`"),
            ("code (git commit)", f"`{facts.get('git_sha')}`"),
            ("MLflow run", f"`{facts.get('run_id')}` (experiment `{facts.get('experiment')}`)")]


def results_section(facts: Mapping[str, Any]) -> list[str]:
    if not facts["val"]:
        return ["## Results", "", "No validation was recorded for this export.", ""]
    rows = [(source, _fmt(v.get("loss")), _fmt(v.get("bpb")), _fmt(v.get("ppl"), 2))
            for source, v in facts["val"].items()]
    mean = [f"Mean val loss over domains (token-weighted): {_fmt(facts['val_loss'])}.", ""] \
        if facts.get("val_loss") is not None else []
    return ["## Results", "", "On each domain's held-out split (bits per byte are comparable across tokenizers):",
            "", markdown_table(("domain", "val loss (nats/token)", "bits per byte", "perplexity"), rows), "",
            *mean]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_model_card(folder: Path, run: Any, stage: str = "final", step: int | None = None,
                     command: str | None = None, metrics: Mapping[str, float] | None = None,
                     name: str | None = None) -> Path:
    """Write README.md into the export folder; returns its path."""
    facts = card_facts(run, stage, step, command, metrics)
    name = name or (run.info.run_name if run is not None and run.info.run_name else Path(folder).name)
    path = Path(folder) / "README.md"
    try:
        path.write_text(card_text(facts, name), encoding="utf-8")
    except OSError as err:
        raise LabError(f"cannot write the model card {path}: {err.strerror or err}") from None
    return path


def read_card_metadata(path: Path) -> dict[str, Any]:
    """The YAML front matter of a card (for tests and tools)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise LabError(f"{path} has no YAML front matter")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)]) or {}
