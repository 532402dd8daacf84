"""The config of any architecture from its Hydra node at a size preset (conf/arch + conf/size), matched to a
parameter budget when the preset asks (lab/models/sizes.py); and configs, HF folders and tokenizers from elsewhere
(checkpoints, exports) checked before transformers reads them: a closed list of classes, plain values, bounded
sizes, no code. The arch node -> config class -> model itself: lab/models/arch.py.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml
from omegaconf import DictConfig, OmegaConf
from transformers import PretrainedConfig

from lab import CONF_DIR, LabError
from lab.models.arch import (HYDRA_KEYS, apply_size, check_arch_keys, config_class, config_fields, config_from_node,
                             count_params_meta)
from lab.models.sizes import BASES, match_size


def build_config(arch: Mapping[str, Any] | DictConfig, size: Mapping[str, Any] | None = None,
                 **overrides: Any) -> PretrainedConfig:
    """The transformers config of an arch node (resolved) at a size preset, after checking its keys."""
    if isinstance(arch, DictConfig):
        arch = OmegaConf.to_container(arch, resolve=True)
    if isinstance(size, DictConfig):
        size = OmegaConf.to_container(size, resolve=True)
    check_arch_keys(arch)
    node = apply_size(arch, size)
    if size and size.get("target_params") is not None:
        # depth/width (or state/expand) moved to land within ±1% of the target, the preset's shape kept
        if size.get("target_basis") is None:
            raise LabError("size.target_basis is missing (total or non_embedding): restore it in conf/size/")
        node = match_size(node, float(size["target_params"]), basis=size["target_basis"]).node
    node.update(overrides)
    return config_from_node(node)


# -- configs read from files ------------------------------------------------------------------------------------
# A checkpoint's hyper-parameters or an HF folder's config.json come from elsewhere: they may only pick one of the
# config classes the user's own conf/arch names, with plain values of bounded size. Nothing is imported or
# instantiated on a file's say-so.
_PLAIN = (bool, int, float, str, type(None))
# Upper bounds per field for file-read configs: far above any model this lab trains, far below a crafted file that
# would allocate the machine's memory.
FILE_FIELD_LIMITS = {"hidden_size": 65_536, "intermediate_size": 262_144, "ffn_hidden_size": 262_144,
                     "num_hidden_layers": 512, "num_attention_heads": 1_024, "num_key_value_heads": 1_024,
                     "num_kv_heads": 1_024, "num_heads": 4_096, "head_dim": 4_096, "vocab_size": 2_097_152,
                     "max_position_embeddings": 1_048_576, "state_size": 4_096, "expand": 64, "n_groups": 1_024,
                     "conv_kernel": 64, "chunk_size": 65_536, "sliding_window": 1_048_576}
FILE_MAX_PARAMS = 50e9


@lru_cache(maxsize=1)
def file_config_classes() -> dict[str, type[PretrainedConfig]]:
    """`_target_` -> class for the config classes named by the user's conf/arch/*.yaml (the closed list)."""
    classes = {}
    for path in sorted((CONF_DIR / "arch").glob("*.yaml")):
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        if target:
            classes[str(target)] = config_class({"_target_": target})
    return classes


def file_model_types() -> dict[str, type[PretrainedConfig]]:
    """HF `model_type` -> class, for the same closed list (what an HF folder's config.json may say)."""
    return {cls.model_type: cls for cls in file_config_classes().values()}


def check_plain_values(node: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A flat mapping of plain values (numbers, strings, booleans, null, and dicts/lists of them, no `_` keys)."""
    if not isinstance(node, Mapping):
        raise LabError(f"{where} is a {type(node).__name__}, not a mapping of config fields")

    def check(value: Any, key: str, depth: int) -> None:
        if isinstance(value, _PLAIN):
            if isinstance(value, float) and not math.isfinite(value):
                raise LabError(f"{where}: {key}={value} is not a finite number")
            return
        if depth < 2 and isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                check(item, f"{key}[{i}]", depth + 1)
            return
        if isinstance(value, Mapping) and set(value) == {"__float__"} and isinstance(value["__float__"], str):
            return  # how transformers writes inf/nan into config.json (Mamba2's time_step_limit)
        if depth < 2 and isinstance(value, Mapping):
            for sub, item in value.items():
                if not isinstance(sub, str) or sub.startswith("_"):
                    raise LabError(f"{where}: {key}.{sub} is not an allowed field name")
                check(item, f"{key}.{sub}", depth + 1)
            return
        raise LabError(f"{where}: {key} holds a {type(value).__name__}; only plain values are allowed")

    for key, value in node.items():
        if not isinstance(key, str):
            raise LabError(f"{where}: field name {key!r} is not a string")
        if key in HYDRA_KEYS:
            continue
        if key.startswith("_"):
            raise LabError(f"{where}: field {key!r} is not allowed")
        check(value, key, 0)
    check_field_limits(node, where)
    return dict(node)


def check_field_limits(fields: Mapping[str, Any], where: str) -> None:
    for key, limit in FILE_FIELD_LIMITS.items():
        value = fields.get(key)
        # zero widths or head counts would only fail later, as a division by zero deep inside transformers
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
            raise LabError(f"{where}: {key}={value!r} is out of range (an integer from 1 to {limit:,})")


def config_from_record(arch: Any, size: Any = None, overrides: Any = None, where: str = "checkpoint"
                       ) -> PretrainedConfig:
    """Rebuild the model config of a lab.train checkpoint from its plain hyper-parameters, trusting nothing.

    `arch._target_` must be one of the classes conf/arch names; every value must be plain; sizes are bounded,
    and so is the parameter count the config describes.
    """
    arch = check_plain_values(arch, f"{where}: hyper_parameters.arch")
    target = arch.get("_target_")
    classes = file_config_classes()
    if target not in classes:
        raise LabError(f"{where}: arch _target_ {target!r} is not one of the lab's config classes "
                       f"({', '.join(sorted(classes))})")
    size = check_plain_values(size or {}, f"{where}: hyper_parameters.size")
    check_size_knobs(size, f"{where}: hyper_parameters.size")
    overrides = check_plain_values(overrides or {}, f"{where}: hyper_parameters.config_overrides")
    unknown = sorted(set(overrides) - config_fields(classes[target]))
    if unknown:
        raise LabError(f"{where}: config_overrides names field(s) {unknown} that {classes[target].__name__} lacks")
    try:
        config = build_config(arch, size, **overrides)
    except LabError as err:
        raise LabError(f"{where}: {err}") from None
    except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError) as err:
        raise LabError(f"{where}: the model config it records is not valid: {type(err).__name__}: {err}") from None
    check_field_limits(config.to_dict(), f"{where}: the resized config")
    check_param_budget(config, where)
    return config


def check_size_knobs(size: Mapping[str, Any], where: str) -> None:
    """The preset knobs that are not config fields, bounded: a crafted target_params would keep lab.sizing's shape
    search busy for hours, a huge min_layers would build a giant model."""

    def number(key: str, low: float, high: float, integer: bool = False) -> None:
        value = size.get(key)
        if value is None:
            return
        kind_ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        if not (kind_ok and low <= value <= high):
            raise LabError(f"{where}: {key}={value!r} is out of range (a{'n integer' if integer else ' number'} "
                           f"from {low:g} to {high:g})")

    number("target_params", 1, FILE_MAX_PARAMS)
    number("depth_divisor", 1, FILE_FIELD_LIMITS["num_hidden_layers"])  # below 1 it would multiply the depth
    number("min_layers", 0, FILE_FIELD_LIMITS["num_hidden_layers"], integer=True)
    if size.get("target_basis") is not None and size["target_basis"] not in BASES:
        raise LabError(f"{where}: target_basis={size['target_basis']!r} is not one of {', '.join(BASES)}")


def check_param_budget(config: PretrainedConfig, where: str) -> None:
    try:
        params = count_params_meta(config).total
    except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError, RuntimeError) as err:
        raise LabError(f"{where}: the model config it records cannot be built: {type(err).__name__}: "
                       f"{(str(err).splitlines() or [''])[0][:200]}") from None
    if params > FILE_MAX_PARAMS:
        raise LabError(f"{where}: the model it describes has {params:,} parameters, more than the "
                       f"{FILE_MAX_PARAMS:,.0f} this lab loads")


# -- HF folders (model_path=, init_from=) --------------------------------------------------------------------------
# Tokenizer classes a folder may ask for: the fast tokenizer the lab saves (tokenizer.json, no code of its own).
FILE_TOKENIZER_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file from elsewhere, or one LabError line saying what is wrong with it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabError(f"{what}: {path} is missing") from None
    except OSError as err:
        raise LabError(f"{what}: cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LabError(f"{what}: {path} is not valid JSON ({err}); the file is damaged or not what it is named") from None


def check_hf_folder(folder: Path, allowed_quant_types: set[str] | None = None) -> dict[str, Any]:
    """Check an HF model folder's config.json before transformers reads it; returns the parsed config.

    It may only describe one of the lab's own config classes (by `model_type`), with plain values and bounded
    sizes, no `auto_map` (code shipped with the folder) and, if quantized, only the lab's torchao configs.
    """
    where = f"model folder {folder}"
    config = read_json_file(folder / "config.json", where)
    if not isinstance(config, dict):
        raise LabError(f"{where}: config.json holds a {type(config).__name__}, not an object of config fields")
    types = file_model_types()
    if config.get("model_type") not in types:
        raise LabError(f"{where}: model_type {config.get('model_type')!r} is not one the lab builds "
                       f"({', '.join(sorted(types))})")
    if "auto_map" in config:
        raise LabError(f"{where}: config.json has auto_map (code shipped with the folder); the lab runs no such code")
    quant = config.get("quantization_config")
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    check_plain_values({k: v for k, v in plain.items() if not k.startswith("_")}, where)
    if quant is not None:
        if allowed_quant_types is None or not isinstance(quant, dict) or quant.get("quant_method") != "torchao":
            raise LabError(f"{where}: quantization_config is not one of the lab's torchao variants")
        named = serialized_types(quant)
        if not named or not named <= allowed_quant_types:
            raise LabError(f"{where}: quantization_config names {sorted(named - allowed_quant_types) or 'nothing'}, "
                           "not one of the lab's torchao variants")
    return config


def serialized_types(node: Any) -> set[str]:
    """Every `_type` named in a serialized torchao config (the classes from_pretrained would build)."""
    if isinstance(node, dict):
        found = {str(node["_type"])} if "_type" in node else set()
        for value in node.values():
            found |= serialized_types(value)
        return found
    if isinstance(node, list):
        return set().union(*(serialized_types(v) for v in node)) if node else set()
    return set()


def check_tokenizer_folder(folder: Path) -> None:
    """A tokenizer folder from elsewhere may only hold the fast tokenizer the lab saves (no code, no auto_map)."""
    where = f"tokenizer folder {folder}"
    if (folder / "tokenizer_config.json").is_file():
        config = read_json_file(folder / "tokenizer_config.json", where)
        if not isinstance(config, dict):
            raise LabError(f"{where}: tokenizer_config.json is not an object")
        if "auto_map" in config:
            raise LabError(f"{where}: tokenizer_config.json has auto_map (code shipped with the folder); "
                           "the lab runs no such code")
        name = config.get("tokenizer_class")
        if name is not None and name not in FILE_TOKENIZER_CLASSES:
            raise LabError(f"{where}: tokenizer_class {name!r} is not the fast tokenizer the lab saves "
                           f"({', '.join(sorted(FILE_TOKENIZER_CLASSES))})")
    # the fast tokenizer is tokenizer.json; without it transformers would try to convert a slow tokenizer
    if not isinstance(read_json_file(folder / "tokenizer.json", where), dict):
        raise LabError(f"{where}: tokenizer.json is not an object (the file is damaged or not a tokenizers file)")


def load_tokenizer_folder(folder: Path) -> Any:
    """The fast tokenizer saved in `folder`, checked first; a damaged one is one LabError line."""
    from transformers import PreTrainedTokenizerFast

    check_tokenizer_folder(folder)
    try:
        return PreTrainedTokenizerFast.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception types for damaged files
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        raise LabError(f"tokenizer folder {folder} cannot be loaded ({type(err).__name__}: {first_line}); "
                       "tokenizer.json is damaged or not a tokenizers file") from None
