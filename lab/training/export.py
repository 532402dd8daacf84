"""The HF export of a run: weights (save_pretrained), a tokenizer that transformers 4.x and 5.x both load, the
model card, and optionally a version in MLflow's model registry.

The folder loads with `transformers.pipeline("text-generation", model=folder)`; its tokenizer with
`AutoTokenizer.from_pretrained(folder)` under transformers 4.x too (lm-eval and many tools still pin 4.x).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from lab import LabError
from lab.models.build import load_tokenizer_folder
from lab.models.arch import build_model
from lab.training.model_card import write_model_card

log = logging.getLogger("lab.training.export")

# transformers 5 saves `"tokenizer_class": "TokenizersBackend"`, a name 4.x does not know; both load this one.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# the tokenizer_config.json keys kept from what transformers 5 writes; the others (`backend`, and loading
# arguments such as `is_local` it echoes back) would reach 4.x's tokenizer constructor as unknown arguments
PORTABLE_TOKENIZER_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "padding_side",
                           "truncation_side", "model_input_names", "added_tokens_decoder")


def export_hf(model: torch.nn.Module, folder: Path, tokenizer_dir: Path | None,
              state_dict: dict[str, torch.Tensor] | None = None, model_max_length: int | None = None) -> Path:
    """save_pretrained (safetensors) + the tokenizer, so plain transformers loads and generates."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    write_portable_config(folder / "config.json", model.config)
    if tokenizer_dir is not None:
        if model_max_length is None:  # the model's own window, when it has one
            model_max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        save_tokenizer(Path(tokenizer_dir), folder, model_max_length)
    return folder


def write_portable_config(path: Path, config: Any) -> None:
    """Rewrite the saved config.json as plain JSON that transformers 4.x, 5.x and converters read the same way.

    - transformers 5 writes an infinity as {"__float__": "Infinity"}, which 4.x passes on as a dict (Mamba2's
      time_step_limit then fails in clamp()); plain JSON has no infinity at all. A field whose value is the config
      class's own default is dropped, so every version fills in that default; any other non-finite value stays
      in 5.x's form, with a warning.
    - Falcon's multi-query block (multi_query, not new_decoder_architecture) has one K/V head whatever
      num_kv_heads says, and converters that trust num_kv_heads mis-shape the model: it is written as 1.
    """
    written = json.loads(path.read_text(encoding="utf-8"))
    defaults = _class_defaults(config)
    for key in [k for k, v in written.items() if _has_non_finite(v)]:
        if key in defaults and _same_value(getattr(config, key, None), defaults[key]):
            del written[key]
        else:
            log.warning("%s: %s=%r is not finite; transformers 4.x and JSON tools cannot read it", path, key,
                        getattr(config, key, None))
    if written.get("multi_query") is True and written.get("new_decoder_architecture") is False:
        written["num_kv_heads"] = 1
    path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _class_defaults(config: Any) -> dict[str, Any]:
    try:
        return type(config)().to_dict()
    except Exception:  # noqa: BLE001 - a class that needs arguments has no defaults to rely on
        return {}


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, dict):
        return "__float__" in value or any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def save_tokenizer(tokenizer_dir: Path, folder: Path, model_max_length: int | None) -> None:
    """The prepared tokenizer (checked: no code, no auto_map) saved into `folder` with a tokenizer_config.json that
    transformers 4.x also loads: a class name both know, the trained window as model_max_length, the specials."""

    if not tokenizer_dir.is_dir():
        raise LabError(f"tokenizer folder not found: {tokenizer_dir}; re-prepare the data (lab.prepare)")
    tokenizer = load_tokenizer_folder(tokenizer_dir)
    tokenizer.save_pretrained(str(folder))
    config_file = folder / "tokenizer_config.json"
    written = json.loads(config_file.read_text(encoding="utf-8"))
    config = {key: written[key] for key in PORTABLE_TOKENIZER_KEYS if key in written}
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    # 4.x's class adds token_type_ids, which no causal LM here takes: model.generate(**tok(prompt)) would fail
    config["model_input_names"] = ["input_ids", "attention_mask"]
    # 4.x defaults to True for this class and would decode "a ." as "a."; 5.x does not: the same text in both
    config["clean_up_tokenization_spaces"] = False
    if model_max_length:  # else transformers' "unlimited" sentinel: tools then truncate nothing
        config["model_max_length"] = int(model_max_length)
    special = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
               if getattr(tokenizer, name, None) is not None}
    config.update(special)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # transformers 5 no longer writes it; 4.x reads the special tokens from it
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")


def gathered_weights(trainer: Any) -> dict[str, torch.Tensor]:
    """The model's full weights, from every rank's call (a collective under FSDP, where each rank holds a shard);
    meaningful on rank 0."""
    state = trainer.strategy.lightning_module_state_dict()
    return {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}


def export_from_trainer(trainer: Any, pl_module: Any, folder: Path, tokenizer_dir: Path | None,
                        model_max_length: int | None = None, card: Mapping[str, Any] | None = None,
                        artifact_path: str | None = None, register: bool = False,
                        weights: dict[str, torch.Tensor] | None = None) -> None:
    """Export the trained model from every rank's call: the full weights are gathered first (unless given), then
    rank 0 saves them, writes the model card (`card`: write_model_card's stage, step, command, metrics), logs the
    folder to the trainer's MLflow run as `artifact_path` and, with `register`, registers that artifact as a new
    version of `<experiment>.<arch>`; the others wait, so none runs ahead."""
    if weights is None:
        weights = gathered_weights(trainer)
    if trainer.is_global_zero:
        export_hf(pl_module.model, folder, tokenizer_dir, state_dict=weights, model_max_length=model_max_length)
        client, run_id = mlflow_run_of(trainer)
        if card is not None:

            write_model_card(Path(folder), client.get_run(run_id) if client is not None else None, **card)
        if client is not None and artifact_path:
            client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)
            if register:
                register_export(client, run_id, artifact_path)
        elif register:
            raise LabError("callbacks.register_model=true needs the run's MLflow logger and an artifact to register")
    trainer.strategy.barrier("export_hf")


def weights_are_sharded(trainer: Any) -> bool:
    """Whether each rank holds only a shard of the weights (FSDP, model parallel): then no rank can run the
    model alone, and rank 0 works on a copy built from the gathered weights."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))


def model_from_weights(pl_module: Any, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain copy of the module's model (its config) holding `weights`, on the module's device."""

    model = build_model(pl_module.config)
    model.load_state_dict(weights)
    return model.to(pl_module.device)


def mlflow_run_of(trainer: Any) -> tuple[Any, str | None]:
    """(MlflowClient, run id) of the trainer's MLflow logger on this rank, or (None, None)."""
    for logger in trainer.loggers:
        client = getattr(logger, "experiment", None)
        if hasattr(client, "get_run") and getattr(logger, "run_id", None):
            return client, logger.run_id
    return None, None


# -- the model registry ----------------------------------------------------------------------------------------
# MLflow refuses '/' and ':' in registered model names ("Names cannot contain '/' or ':'"), so the issue's
# `<experiment>/<arch>` is written `<experiment>.<arch>`.
_REFUSED_IN_NAMES = re.compile(r"[/:]")


def registry_name(experiment: str, arch: str) -> str:
    """`<experiment>.<arch>`, with the characters MLflow refuses in a model name replaced by '-'."""
    return f"{_REFUSED_IN_NAMES.sub('-', str(experiment))}.{_REFUSED_IN_NAMES.sub('-', str(arch))}"


def register_export(client: Any, run_id: str, artifact_path: str, name: str | None = None) -> Any:
    """A new version of registered model `name` (default `<experiment>.<arch>` of the run) whose source is the
    run's logged HF folder.

    MLflow 3's `mlflow.register_model("runs:/...")` looks for a *logged model* (an MLmodel flavor) and refuses a
    plain artifact folder; the client's create_model_version takes the run's artifact as it is."""
    from mlflow.exceptions import MlflowException

    run = client.get_run(run_id)
    if name is None:
        experiment = client.get_experiment(run.info.experiment_id).name
        name = registry_name(experiment, run.data.tags.get("arch") or "model")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="HF causal LM folders exported by lab.train")
    version = client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                          tags={k: v for k, v in run.data.tags.items()
                                                if k in ("arch", "data_sha256", "tokenizer_sha256", "git_sha")})
    log.info("registered %s version %s (MLflow run %s)", name, version.version, run_id)
    return version


def training_command() -> str:
    """The command that trains this job again: `python -m lab.train` and this job's overrides (a multirun's
    job gets its own values), or the process's own command line outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
        return " ".join(["python -m lab.train", *(shlex.quote(o) for o in overrides)])
    return " ".join(shlex.quote(word) for word in sys.argv)
