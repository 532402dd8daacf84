"""An arch node (conf/arch/*.yaml) -> its transformers config class -> the model, and parameter counts.

Nothing here knows an architecture by name: the config class named by `_target_` decides everything, and sizes
are changed through the fields a config has, never through the family it belongs to. A node at a size preset,
matched to a parameter budget (lab/models/sizes.py), is built by lab/models/build.py.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lab import LabError

# Hydra's own keys in an arch node; everything else must be a field of the config class.
HYDRA_KEYS = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}


# Knobs of conf/size/*.yaml that are not config fields.
_SIZE_KNOBS = {"name", "depth_divisor", "min_layers", "target_params", "target_basis"}


# Knobs that ask lab.sizing for a matched shape after the preset (e.g. size.target_params=50e6).
_TARGET_KNOBS = {"target_params", "target_basis"}


# Fields that scale with the model width, keyed by the role they play; a config has some of them.
_FFN_FIELDS = ("intermediate_size", "ffn_hidden_size")


_QUERY_HEAD_FIELDS = ("num_attention_heads",)


_KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads")


def config_class(arch: Mapping[str, Any]) -> type[PretrainedConfig]:
    """The transformers config class an arch node names (`_target_: transformers.<Name>Config`).

    The class is looked up as an attribute of the transformers package, never imported from a module
    the node names: even the user's own conf/ cannot make this import or run anything else.
    """
    target = arch.get("_target_")
    if not target:
        raise LabError("arch config has no _target_ (expected e.g. transformers.LlamaConfig)")
    package, _, class_name = str(target).rpartition(".")
    cls = getattr(transformers, class_name, None) if package == "transformers" and class_name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, PretrainedConfig)):
        raise LabError(f"arch _target_ {target!r} is not a transformers config class "
                       "(expected transformers.<Name>Config, e.g. transformers.LlamaConfig)")
    return cls


def config_fields(cls: type[PretrainedConfig]) -> set[str]:
    """Every key the config class really understands (HF configs silently keep unknown kwargs)."""
    fields = set(cls().to_dict())
    if dataclasses.is_dataclass(cls):
        fields |= {f.name for f in dataclasses.fields(cls)}
    fields |= set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    fields |= set(getattr(cls, "attribute_map", {}) or {})
    return fields


def check_arch_keys(arch: Mapping[str, Any]) -> None:
    """Reject misspelled keys: transformers would store them as dead attributes and train the default."""
    cls = config_class(arch)
    unknown = sorted(set(arch) - HYDRA_KEYS - config_fields(cls))
    if unknown:
        raise LabError(f"{cls.__name__} has no field(s) {unknown}; check the spelling in conf/arch")


def apply_size(arch: Mapping[str, Any], size: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the arch node resized by a conf/size preset (an empty/`full` preset changes nothing).

    `hidden_size` sets the width; FFN widths and head counts follow in proportion; `head_dim` fixes the
    head width; depth is divided by `depth_divisor`. Other preset keys replace same-named fields the
    arch has (e.g. sliding_window, state_size); fields it lacks are skipped, which is what lets one
    preset serve every family.
    """
    out = dict(arch)
    size = {k: v for k, v in dict(size or {}).items() if v is not None and k not in _TARGET_KNOBS}
    if set(size) <= {"name"}:
        return out
    fields = config_fields(config_class(arch))
    old_width = out["hidden_size"]
    new_width = size.get("hidden_size", old_width)
    ratio = new_width / old_width
    head_dim = size.get("head_dim")
    out["hidden_size"] = new_width

    for key in _FFN_FIELDS:
        if key in out:
            out[key] = max(8, 8 * round(out[key] * ratio / 8))
    for q_key in _QUERY_HEAD_FIELDS:
        if q_key in out and head_dim:
            old_q = out[q_key]
            new_q = max(1, new_width // head_dim)
            out[q_key] = new_q
            for kv_key in _KV_HEAD_FIELDS:
                if kv_key in out:
                    # keep the query:KV sharing ratio (16:4 -> 4:1, 16:16 -> 4:4, MQA stays 1)
                    out[kv_key] = max(1, round(out[kv_key] * new_q / old_q))
    if "num_heads" in out and "expand" in out and head_dim:
        # Mamba2-style SSD heads: expand * hidden_size must split into num_heads of head_dim
        out["num_heads"] = max(1, out["expand"] * new_width // head_dim)
    if "num_hidden_layers" in out and "depth_divisor" in size:
        layers = round(out["num_hidden_layers"] / size["depth_divisor"])
        out["num_hidden_layers"] = max(int(size.get("min_layers", 1)), layers)

    for key, value in size.items():
        if key in _SIZE_KNOBS or key == "hidden_size":
            continue
        if key == "head_dim" and "head_dim" not in arch:
            continue  # a derived width for families without the field
        if key in fields and (key in arch or key == "head_dim"):
            out[key] = value
    return out


def _reject_nested_targets(node: Any, where: str = "arch") -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if where != "arch" and str(key).startswith("_"):
                raise LabError(f"{where}.{key}: nested Hydra keys are not allowed in a model config")
            _reject_nested_targets(value, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _reject_nested_targets(value, f"{where}[{i}]")


def build_model(config: PretrainedConfig, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A freshly initialised causal LM for the config (weights tied if the config says so)."""
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


@dataclasses.dataclass(frozen=True)
class ParamCount:
    total: int           # unique parameters (tied embeddings counted once)
    embedding: int       # input embedding (+ untied output head)
    non_embedding: int


def count_params(model: nn.Module) -> ParamCount:
    total = sum(p.numel() for p in model.parameters())
    embedding_params = {id(p): p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        embedding_params.update({id(p): p for p in output.parameters()})
    embedding = sum(p.numel() for p in embedding_params.values())
    return ParamCount(total=total, embedding=embedding, non_embedding=total - embedding)


def count_params_meta(config: PretrainedConfig) -> ParamCount:
    """Count without allocating: full-size models are built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_params(model)


def kv_heads(model: nn.Module) -> int | None:
    """KV heads as built (Falcon's config still reports the query head count under MQA)."""
    for module in model.modules():
        for name in ("k_proj", "key"):
            proj = getattr(module, name, None)
            if isinstance(proj, nn.Linear) and hasattr(module, "head_dim"):
                return proj.out_features // module.head_dim
        fused = getattr(module, "query_key_value", None)
        if isinstance(fused, nn.Linear) and hasattr(module, "head_dim") and hasattr(module, "num_heads"):
            kv_width = fused.out_features - module.num_heads * module.head_dim
            return kv_width // (2 * module.head_dim)
    return None


def config_from_node(node: Mapping[str, Any]) -> PretrainedConfig:
    """The config of a plain, already sized arch node; the class is called with plain values: nothing in the
    node is instantiated."""
    _reject_nested_targets(node)
    return config_class(node)(**{k: v for k, v in node.items() if k not in HYDRA_KEYS})
