"""Quantize a trained model into small torchao variants: `python -m lab.quantize model_path=<run>/hf`.

    python -m lab.quantize model_path=outputs/<run>/<time>/hf [variants=[int8wo,intx4wo]] [device=cpu]
    python -m lab.quantize model_path=outputs/<run>/<time>/checkpoints/last.ckpt

`model_path` is an HF export (save_pretrained + tokenizer) or a lab.train Lightning checkpoint.
Every variant is written as a self-contained HF folder (config.json with its `quantization_config`,
safetensors holding torchao tensors, the tokenizer) that `AutoModelForCausalLM.from_pretrained`
loads back; `load_model` here additionally handles checkpoints and the one fix-up quantized models
need (below). The float reference is written beside them, so every variant is measured the same way.

Variants (torchao 0.18 `quantize_` configs, applied while transformers loads the float reference):

    name      torchao config                                              runs on
    int8wo    Int8WeightOnlyConfig (per-channel)                          cpu, cuda
    int8dq    Int8DynamicActivationInt8WeightConfig (per-token x per-ch.) cpu, cuda
    intx4wo   IntxWeightOnlyConfig(int4, PerGroup(group_size))            cpu  (int4 values stored unpacked in int8)
    int4wo    Int4WeightOnlyConfig(group_size, tile_packed_to_4d)         cuda (tinygemm kernel, bf16)
    float8dq  Float8DynamicActivationFloat8WeightConfig(PerRow)           cuda, compute capability >= 8.9 (H100)

What is quantized: the weight of every nn.Linear inside the blocks (attention q/k/v/o or the fused
query_key_value, the MLP, Mamba2's in_proj/out_proj). The tied input embedding / LM head: for int8wo
by default (`variant_options.<variant>.quantize_embedding`; int8wo and int8dq only), quantized ONCE as
the head's int8 weight (one scale per vocabulary row, which is also per token for the lookup) and that
single tensor is shared with the embedding, so the model stays tied and stores one int8 copy; the
other variants keep it float (quantizing only the head would untie it and store a second copy).
What stays float: norms, biases, Mamba2's conv1d and SSM parameters (A_log, D, dt_bias). Per variant,
a layer is also left float when its width does not divide into the variant's groups, or when its
class overrides `forward` with something other than F.linear; quantize.json lists every such layer
with the reason, and says per variant whether the embedding / head are quantized.

A shared int8 embedding is saved once (under the embedding's name; the head is tied to it on load,
as transformers does for float tied weights), so plain `from_pretrained` rebuilds the tied pair.
torchao's F.embedding on an int8 tensor dequantizes the whole table per call; `load_model` routes the
lookup through a row gather that dequantizes only the looked-up rows (the same numbers).

Output: `<run_dir>/quantized/<model name>/` (`output_dir=` to change), one folder per variant plus
quantize.json: per variant its path, bytes on disk, in-memory weight bytes, quantized/skipped layers,
the torchao config and the reload check (logits of the saved folder vs the in-memory model).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import shutil
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lab import LabError, run_or_exit

log = logging.getLogger("lab.quantize")

INDEX_FILE = "quantize.json"        # in the output root: every variant written there
VARIANT_FILE = "lab_variant.json"   # in each variant folder: what it is and where it came from
RUN_ID_FILE = "mlflow_run_id"       # written by lab.train into its run folder
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# -- variants -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    make_config: Callable[[Mapping[str, Any], torch.device], Any]   # (options, device) -> torchao AOBaseConfig
    devices: tuple[str, ...]                    # device types whose kernels it targets
    min_capability: tuple[int, int] | None = None   # CUDA compute capability it needs
    dtype: torch.dtype | None = None            # float dtype its kernels need (None: the reference dtype)
    group_size: int | None = None               # default group size (per-group schemes)
    # can quantize the tied embedding / LM head once and share it: the weight tensor it makes implements
    # both F.linear (head) and F.embedding (lookup) and one scale per vocabulary row
    shares_embedding: bool = False
    quantize_embedding: bool = False            # default of variant_options.<name>.quantize_embedding

    def unsupported_reason(self, device: torch.device) -> str | None:
        if device.type not in self.devices:
            return f"runs on {' / '.join(self.devices)} only"
        if self.min_capability and device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < self.min_capability:
                need = ".".join(map(str, self.min_capability))
                return f"needs CUDA compute capability >= {need} (this GPU: {capability[0]}.{capability[1]})"
        return None


def _int8wo(options: Mapping[str, Any], device: torch.device) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig, PerRow

    return Int8WeightOnlyConfig(granularity=PerRow())


def _int8dq(options: Mapping[str, Any], device: torch.device) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.utils import should_reduce_range

    # CPUs without VNNI overflow int8 x int8 accumulation unless the range is reduced
    return Int8DynamicActivationInt8WeightConfig(reduce_range=should_reduce_range(device))


def _intx4wo(options: Mapping[str, Any], device: torch.device) -> Any:
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(int(options["group_size"])))


def _int4wo(options: Mapping[str, Any], device: torch.device) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig

    # tile_packed_to_4d is the tinygemm layout stock PyTorch CUDA builds ship a kernel for; the
    # default "plain" layout needs the separate mslk package
    return Int4WeightOnlyConfig(group_size=int(options["group_size"]), int4_packing_format="tile_packed_to_4d")


def _float8dq(options: Mapping[str, Any], device: torch.device) -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("int8wo", "int8 weights (per-channel scales), matmul in the float dtype", _int8wo, ("cpu", "cuda"),
            shares_embedding=True, quantize_embedding=True),
    Variant("int8dq", "int8 weights and dynamically quantized int8 activations", _int8dq, ("cpu", "cuda"),
            shares_embedding=True),
    Variant("intx4wo", "int4 weights in groups (stored unpacked, one int8 per value)", _intx4wo, ("cpu",),
            group_size=32),
    Variant("int4wo", "int4 weights in groups, packed for the tinygemm kernel", _int4wo, ("cuda",),
            dtype=torch.bfloat16, group_size=128),
    Variant("float8dq", "float8 e4m3 weights and activations (per-row scales)", _float8dq, ("cuda",),
            min_capability=(8, 9), dtype=torch.bfloat16),
)}


def variant_options(variant: Variant, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The variant's knobs: its defaults (group_size, quantize_embedding) with `overrides` on top."""
    return {"group_size": variant.group_size, "quantize_embedding": variant.quantize_embedding,
            **dict(overrides or {})}


def resolve_device(name: str | None) -> torch.device:
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise LabError(f"device={name!r} is not a torch device (auto | cpu | cuda | cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LabError(f"device={name} but CUDA is not available here; use device=cpu (or auto)")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The float reference dtype: bf16 on CUDA, fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if not name or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise LabError(f"dtype={name!r} is not one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def supported_variants(device: torch.device) -> list[str]:
    return [name for name, variant in VARIANTS.items() if variant.unsupported_reason(device) is None]


def resolve_variants(requested: str | Sequence[str] | None, device: torch.device) -> list[Variant]:
    """`auto` (or empty): every variant this device runs; a list: those, or a LabError naming what is supported."""
    supported = supported_variants(device)
    if requested in (None, "auto") or (not isinstance(requested, str) and not list(requested)):
        return [VARIANTS[name] for name in supported]
    names = [requested] if isinstance(requested, str) else [str(name) for name in requested]
    variants = []
    for name in names:
        if name not in VARIANTS:
            raise LabError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
        reason = VARIANTS[name].unsupported_reason(device)
        if reason:
            raise LabError(f"variant {name} ({VARIANTS[name].description}) {reason}; this device is {device}. "
                           f"Supported here: {', '.join(supported) or '(none)'}")
        variants.append(VARIANTS[name])
    return variants


# -- finding and loading models -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: an HF folder (plain or quantized variant) or a lab.train checkpoint."""

    path: Path
    kind: str                    # "hf" | "ckpt"
    run_dir: Path | None         # the lab.train run folder it belongs to, when there is one
    variant: str | None = None   # set for folders lab.quantize wrote

    @property
    def name(self) -> str:
        return self.path.stem if self.kind == "ckpt" else self.path.name

    @property
    def train_run_id(self) -> str | None:
        if self.run_dir is not None and (self.run_dir / RUN_ID_FILE).is_file():
            return (self.run_dir / RUN_ID_FILE).read_text().strip() or None
        return None

    def run_config(self) -> dict[str, Any] | None:
        """The training run's resolved config (config.yaml, written by lab.train), if there is one."""
        if self.run_dir is None or not (self.run_dir / "config.yaml").is_file():
            return None
        return OmegaConf.to_container(OmegaConf.load(self.run_dir / "config.yaml"), resolve=False)


def find_run_dir(path: Path, levels: int = 5) -> Path | None:
    """The nearest ancestor holding lab.train's mlflow_run_id (hf/, hf_stages/x/, checkpoints/x.ckpt, quantized/...)."""
    for folder in [path if path.is_dir() else path.parent, *path.parents][: levels + 1]:
        if (folder / RUN_ID_FILE).is_file():
            return folder
    return None


def resolve_source(model_path: str | Path | None) -> ModelSource:
    if not model_path or str(model_path) == "???":
        raise LabError("model_path is required: an HF export folder (e.g. outputs/<run>/<time>/hf) "
                       "or a lab.train checkpoint (.../checkpoints/last.ckpt)")
    path = Path(model_path).expanduser().resolve()
    if path.is_file():
        if path.suffix != ".ckpt":
            raise LabError(f"model_path={path} is a file but not a .ckpt; give an HF folder or a Lightning checkpoint")
        return ModelSource(path, "ckpt", find_run_dir(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = ""
            if (path / "hf").is_dir():
                hint = f" (did you mean {path / 'hf'}?)"
            raise LabError(f"model_path={path} has no config.json: not an HF save_pretrained folder{hint}")
        if (path / VARIANT_FILE).is_file():
            from lab.models import read_json_file

            meta = read_json_file(path / VARIANT_FILE, f"model folder {path}")
            variant, run_dir = (meta.get("variant"), meta.get("run_dir")) if isinstance(meta, dict) else (None, None)
            if not isinstance(variant, str) or variant not in {*VARIANTS, *_DTYPE_NAMES.values()} or not isinstance(run_dir, (str, type(None))):
                raise LabError(f"model folder {path}: {VARIANT_FILE} is not one lab.quantize writes "
                               f"(variant {variant!r}, run_dir {run_dir!r}); remove it to load the folder as plain HF")
            run_dir = Path(run_dir) if run_dir else None
            return ModelSource(path, "hf", run_dir if run_dir and run_dir.is_dir() else find_run_dir(path), variant)
        return ModelSource(path, "hf", find_run_dir(path))
    raise LabError(f"model_path={path} does not exist (expected an HF folder or a .ckpt file)")


@functools.lru_cache(maxsize=None)
def _computes_linear(cls: type[nn.Linear]) -> bool:
    """Does this nn.Linear subclass's forward compute F.linear(x, weight, bias)? Checked on a small probe."""
    with torch.random.fork_rng(devices=[]):  # the probe's random init must not move the caller's RNG
        torch.manual_seed(0)
        x = torch.randn(3, 8)
        for bias in (True, False):
            probe = cls.__new__(cls)
            nn.Linear.__init__(probe, 8, 4, bias=bias)  # only weight/bias: the subclass's own state is not there
            try:
                with torch.no_grad():
                    out = probe(x)
            except Exception:  # noqa: BLE001 - any failure means: not a plain linear
                return False
            if not torch.allclose(out, F.linear(x, probe.weight, probe.bias), atol=1e-5):
                return False
    return True


def use_linear_forward(model: nn.Module) -> dict[str, str]:
    """Route nn.Linear subclasses that compute F.linear in their own way (e.g. `x @ W.T`) through
    nn.Linear.forward: torchao's weight tensors implement F.linear, not arbitrary transposes.

    Returns {module name: reason} for Linear modules that must stay float (their forward is not F.linear).
    """
    keep_float = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or type(module).forward is nn.Linear.forward:
            continue
        if _computes_linear(type(module)):
            module.forward = types.MethodType(nn.Linear.forward, module)
        else:
            keep_float[name] = f"{type(module).__name__}.forward is not F.linear"
    return keep_float


def _gather_embedding_forward(self: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    # index the quantized table (qdata, scales, zero points alike), then dequantize only those rows:
    # elementwise the same numbers as F.embedding, which dequantizes the whole [vocab, d] table per call
    rows = self.weight[input_ids.reshape(-1)]                        # torchao tensor [n, d]
    return rows.dequantize().reshape(*input_ids.shape, -1)           # [*ids, d]


def use_gather_embedding(model: nn.Module) -> bool:
    """Give a plain nn.Embedding whose weight is a torchao tensor the row-gather lookup; True if it had one."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if (type(embedding) is not nn.Embedding or not is_quantized(embedding.weight)
            or embedding.max_norm is not None):
        return False
    embedding.forward = types.MethodType(_gather_embedding_forward, embedding)
    return True


@functools.lru_cache(maxsize=1)
def lab_quant_types() -> frozenset[str]:
    """Every torchao class name the lab's own variants serialize into a folder's quantization_config: what a
    quantized folder from elsewhere may name (from_pretrained builds whatever it names)."""
    from transformers import TorchAoConfig

    from lab.models import _serialized_types

    names: set[str] = set()
    for variant in VARIANTS.values():
        config = variant.make_config(variant_options(variant), torch.device(variant.devices[0]))
        names |= _serialized_types(TorchAoConfig(config).to_dict())
    return frozenset(names)


def _load_checkpoint(path: Path) -> nn.Module:
    """The HF model inside a lab.train checkpoint: rebuilt from its hyper-parameters, weights from `model.*`.

    The checkpoint is untrusted input: its config goes through config_from_record (closed list of classes,
    plain values, bounded sizes), never through instantiate."""
    from lab.checkpoints import read_checkpoint
    from lab.models import build_model, config_from_record

    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    state_dict = checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or "arch" not in hparams or not isinstance(state_dict, dict):
        raise LabError(f"{path} is not a lab.train checkpoint (no hyper_parameters.arch / state_dict)")
    config = config_from_record(hparams["arch"], hparams.get("size"), hparams.get("config_overrides"),
                                where=f"checkpoint {path}")
    model = build_model(config)
    state = {key.removeprefix("model."): value for key, value in state_dict.items()
             if isinstance(key, str) and key.startswith("model.") and isinstance(value, torch.Tensor)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not fit
        raise LabError(f"checkpoint {path} does not fit the model its hyper-parameters describe: "
                       f"{str(err).splitlines()[-1].strip()}") from None
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise LabError(f"checkpoint {path} does not fit the model its hyper-parameters describe: "
                       f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model


def load_hf_model(folder: Path, dtype: Any = None) -> nn.Module:
    """An HF folder from elsewhere as a causal LM on the CPU: checked first (lab.models.check_hf_folder), no
    remote code; a damaged weight file is one LabError line."""
    from transformers import AutoModelForCausalLM

    from lab.models import check_hf_folder

    config = check_hf_folder(folder, set(lab_quant_types()))
    quantized = "quantization_config" in config
    # "auto": the dtype the folder was saved in (transformers' own default would be float32)
    load_dtype = "auto" if quantized or dtype is None else dtype
    try:
        # loaded on the CPU, then moved by the caller: a device_map would need accelerate
        return AutoModelForCausalLM.from_pretrained(folder, dtype=load_dtype, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - safetensors, torch and transformers each raise their own types
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        raise LabError(f"cannot load {folder} as a causal LM ({type(err).__name__}: {first_line}); the weights "
                       "are damaged or do not match config.json") from None


def load_model(source: ModelSource | str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> tuple[nn.Module, ModelSource]:
    """Any model lab can evaluate, in eval mode on `device`: HF folder, quantized variant, or checkpoint.

    `dtype` casts a float model; None keeps the dtype it was saved in (quantized variants always do).
    """
    source = source if isinstance(source, ModelSource) else resolve_source(source)
    device = torch.device(device)
    if source.kind == "ckpt":
        model = _load_checkpoint(source.path)
        model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    else:
        model = load_hf_model(source.path, dtype).to(device)
    use_linear_forward(model)
    use_gather_embedding(model)
    return model.eval(), source


def load_tokenizer(source: ModelSource, tokenizer_path: str | Path | None = None) -> Any:
    """The tokenizer: tokenizer_path, else the model folder's, else the run's HF export or prepared data."""
    from lab.models import load_tokenizer_folder

    candidates: list[Path] = []
    if tokenizer_path:
        candidates.append(Path(tokenizer_path))
    else:
        if source.kind == "hf":
            candidates.append(source.path)
        if source.run_dir is not None:
            candidates.append(source.run_dir / "hf")
            prepared = (source.run_config() or {}).get("data", {}).get("prepared_dir")
            if prepared:
                candidates.append(Path(prepared) / "tokenizer")
    for folder in candidates:
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return load_tokenizer_folder(folder)
    tried = ", ".join(str(c) for c in candidates) or "(nothing to try)"
    raise LabError(f"no tokenizer found for {source.path}; tried {tried}. Pass tokenizer_path=<folder>")


# -- sizes ----------------------------------------------------------------------------------------------------------


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds; torchao subclasses are summed over their inner tensors (qdata, scales...)."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: nn.Module) -> int:
    """In-memory bytes of all parameters and buffers (tied weights counted once)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(tensor), tensor_bytes(tensor))
    return sum(seen.values())


def disk_bytes(folder: Path) -> int:
    """Bytes of the weight files in an HF folder (tokenizer and config files excluded)."""
    path = Path(folder)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))


def is_quantized(tensor: Any) -> bool:
    """Is this a torchao tensor subclass (int8/int4/float8 data + scales)?"""
    return isinstance(tensor, torch.Tensor) and hasattr(tensor, "__tensor_flatten__")


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of modules whose weight is a torchao tensor subclass (a shared tied weight: every module using it)."""
    return [name for name, module in model.named_modules() if is_quantized(getattr(module, "weight", None))]


def tied_embedding(model: nn.Module) -> tuple[str, str] | None:
    """(input embedding name, LM head name) when the two modules share one weight, else None."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return None
    names = {id(module): name for name, module in model.named_modules()}
    return names[id(embedding)], names[id(head)]


def embedding_state(model: nn.Module) -> dict[str, Any]:
    """What quantize.json / lab_variant.json say about the embedding and the LM head."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return {"embedding_quantized": embedding is not None and is_quantized(embedding.weight),
            "lm_head_quantized": head is not None and is_quantized(head.weight),
            "embedding_tied": head is not None and embedding is not None and head.weight is embedding.weight}


# -- quantizing -----------------------------------------------------------------------------------------------------


def layers_to_keep_float(model: nn.Module, group_size: int | None, quantize_embedding: bool = False) -> dict[str, str]:
    """{module name: reason} of the Linear layers a variant leaves float (see the module docstring).

    quantize_embedding: the LM head is quantized too when it is tied to a plain nn.Embedding (the caller
    then shares the quantized weight with the embedding, `share_quantized_embedding`)."""
    keep = use_linear_forward(model)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in keep:
            continue
        if module is head:
            if quantize_embedding and tied and type(embedding) is nn.Embedding:
                continue
            if tied and quantize_embedding:
                keep[name] = f"LM head (tied to a {type(embedding).__name__}, not an nn.Embedding)"
            elif tied:
                keep[name] = "LM head (tied to the input embedding; quantize_embedding=false)"
            else:
                keep[name] = "LM head (output layer, kept float)"
        elif group_size and module.in_features % group_size:
            keep[name] = f"in_features={module.in_features} is not a multiple of group_size={group_size}"
    return keep


def share_quantized_embedding(model: nn.Module, tied: tuple[str, str] | None) -> bool:
    """After quantize_ replaced the tied head's weight by a torchao tensor (untying it), make the input
    embedding use that same Parameter again: one int8 copy for the lookup and the head. True if shared."""
    if tied is None:
        return False
    embedding, head = model.get_submodule(tied[0]), model.get_submodule(tied[1])
    if not is_quantized(head.weight) or head.weight.shape != embedding.weight.shape:
        return False
    embedding.weight = head.weight
    use_gather_embedding(model)
    return True


def quantize_model(model: nn.Module, variant: Variant, options: Mapping[str, Any],
                   device: torch.device) -> tuple[Any, dict[str, str]]:
    """Quantize `model` in place with `variant` (the layer choice of the module docstring).

    Returns (torchao config, {layer kept float: reason})."""
    from torchao.quantization import quantize_

    quantize_embedding = bool(options.get("quantize_embedding", False))
    if quantize_embedding and not variant.shares_embedding:
        sharing = ", ".join(name for name, v in VARIANTS.items() if v.shares_embedding)
        raise LabError(f"variant {variant.name}: quantize_embedding=true is supported for {sharing} only "
                       f"(their weight tensor serves both the embedding lookup and the LM head)")
    config = variant.make_config(options, device)
    tied = tied_embedding(model)
    keep_float = layers_to_keep_float(model, options.get("group_size") if variant.group_size else None,
                                      quantize_embedding)
    quantize_(model, config, filter_fn=lambda module, name: isinstance(module, nn.Linear) and name not in keep_float)
    if quantize_embedding and tied is not None and tied[1] not in keep_float:
        if not share_quantized_embedding(model, tied):
            raise LabError(f"variant {variant.name}: the tied LM head {tied[1]} was not quantized; "
                           "cannot share a quantized embedding")
    return config, keep_float


def default_output_dir(source: ModelSource) -> Path:
    if source.run_dir is not None:
        return source.run_dir / "quantized" / source.name
    return source.path.parent / f"{source.name}-quantized"


@dataclass
class VariantResult:
    name: str
    path: Path
    description: str
    disk_bytes: int
    weight_bytes: int
    quantized_layers: int
    kept_float: dict[str, str] = field(default_factory=dict)
    torchao_config: str = ""
    reload_max_abs_diff: float = 0.0
    seconds: float = 0.0
    embedding: dict[str, Any] = field(default_factory=dict)   # embedding_state(): quantized / tied flags

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "description": self.description, "disk_bytes": self.disk_bytes,
                "weight_bytes": self.weight_bytes, "quantized_layers": self.quantized_layers,
                "kept_float": self.kept_float, **self.embedding, "torchao_config": self.torchao_config,
                "reload_max_abs_diff": self.reload_max_abs_diff, "seconds": round(self.seconds, 3)}


def _probe_ids(model: nn.Module, length: int = 16) -> torch.Tensor:
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(min(2, vocab - 1), vocab, (1, length), generator=generator)   # [1, length]


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(model.device), use_cache=False).logits.float().cpu()   # [1, length, vocab]


def _write_variant_meta(folder: Path, variant: str, source: ModelSource, **extra: Any) -> None:
    meta = {"variant": variant, "source": str(source.path), "source_kind": source.kind,
            "run_dir": str(source.run_dir) if source.run_dir else None, "train_run_id": source.train_run_id, **extra}
    (folder / VARIANT_FILE).write_text(json.dumps(meta, indent=1))


def save_reference(model: nn.Module, tokenizer: Any, folder: Path, source: ModelSource, dtype: torch.dtype) -> None:
    """The float model as an HF folder (the baseline every variant is compared with)."""
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_variant_meta(folder, dtype_name(dtype), source, quantized=False, **embedding_state(model))


def _flat_state_dict_once(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The torchao-flattened state dict with every tied target left out (its source holds the tensor).

    transformers' own de-duplication of tied weights matches `lm_head.weight`, which the flattened
    names (`lm_head._weight_qdata`...) no longer are, so a shared quantized weight would be written twice."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = model.state_dict()
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in state and source in state and model.get_parameter(target) is model.get_parameter(source):
            del state[target]
    return flatten_tensor_state_dict(state)


def attach_hf_quantizer(model: nn.Module, config: Any, keep_float: Mapping[str, str]) -> None:
    """Make a model quantized in place by `quantize_` saveable by save_pretrained, as from_pretrained
    would have left it: a torchao HF quantizer (safetensors of flattened torchao tensors + metadata) and
    `quantization_config` in config.json, naming the layers left float."""
    from transformers import TorchAoConfig
    from transformers.quantizers import AutoHfQuantizer

    shared = embedding_state(model)
    # exact module names: transformers matches these as regexes up to a module boundary
    quant_config = TorchAoConfig(config, modules_to_not_convert=[re.escape(name) for name in keep_float],
                                 include_input_output_embeddings=shared["embedding_quantized"])
    quantizer = AutoHfQuantizer.from_config(quant_config, pre_quantized=False)
    if shared["embedding_quantized"]:
        quantizer.get_state_dict_and_metadata = _flat_state_dict_once
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def quantize_variant(variant: Variant, reference_dir: Path, out_dir: Path, source: ModelSource, tokenizer: Any,
                     device: torch.device, options: Mapping[str, Any], reference_dtype: torch.dtype) -> VariantResult:
    """Quantize the float reference with `variant`'s torchao config, save it, and check it loads back."""
    start = time.perf_counter()
    model, _ = load_model(reference_dir, device, variant.dtype or reference_dtype)
    config, keep_float = quantize_model(model, variant, options, device)
    embedding = embedding_state(model)
    layers = quantized_layers(model)
    if not layers:
        raise LabError(f"variant {variant.name}: no layer could be quantized ({len(keep_float)} kept float: "
                       f"{dict(list(keep_float.items())[:3])})")
    attach_hf_quantizer(model, config, keep_float)
    probe = _probe_ids(model)
    expected = _logits(model, probe)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_variant_meta(out_dir, variant.name, source, quantized=True, kept_float=dict(keep_float), **embedding)
    weights = weight_bytes(model)
    del model
    reloaded, _ = load_model(out_dir, device)
    diff = (_logits(reloaded, probe) - expected).abs().max().item()
    if not math.isfinite(diff) or diff > 1e-3 * max(1.0, expected.abs().max().item()):
        raise LabError(f"variant {variant.name}: the saved folder {out_dir} does not reproduce the quantized model "
                       f"(max |logit diff| {diff:.3g} after reload)")
    if embedding_state(reloaded) != embedding:
        raise LabError(f"variant {variant.name}: the saved folder {out_dir} reloads with embedding/head "
                       f"{embedding_state(reloaded)}, not {embedding}")
    return VariantResult(variant.name, out_dir, variant.description, disk_bytes(out_dir), weights, len(layers),
                         dict(keep_float), repr(config), diff, time.perf_counter() - start, embedding)


def quantize(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Write the float reference and each variant; returns (and writes) the quantize.json index."""
    quiet_transformers()
    source = resolve_source(cfg.get("model_path"))
    device = resolve_device(cfg.get("device"))
    reference_dtype = resolve_dtype(cfg.get("dtype"), device)
    variants = resolve_variants(cfg.get("variants"), device)
    out_root = Path(cfg["output_dir"]).resolve() if cfg.get("output_dir") else default_output_dir(source)
    out_root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(source, cfg.get("tokenizer_path"))

    model, _ = load_model(source, "cpu", reference_dtype)
    reference_name = dtype_name(reference_dtype)
    reference_dir = out_root / reference_name
    save_reference(model, tokenizer, reference_dir, source, reference_dtype)
    index: dict[str, Any] = {
        "source": str(source.path), "source_kind": source.kind,
        "run_dir": str(source.run_dir) if source.run_dir else None, "train_run_id": source.train_run_id,
        "device": str(device), "reference": reference_name,
        "variants": {reference_name: {"path": str(reference_dir), "description": f"unquantized ({reference_name})",
                                      "disk_bytes": disk_bytes(reference_dir), "weight_bytes": weight_bytes(model),
                                      "quantized_layers": 0, **embedding_state(model)}},
    }
    previous = read_index(out_root)
    if previous and previous.get("reference") == reference_name and previous.get("source") == str(source.path):
        # variants quantized earlier from the same reference stay listed (unless redone now)
        for name, item in previous["variants"].items():
            if name not in index["variants"] and Path(item["path"]).is_dir():
                index["variants"][name] = item
    log.info("quantizing %s (%s) on %s into %s: %s", source.path, source.kind, device, out_root,
             ", ".join(v.name for v in variants))
    options_cfg = cfg.get("variant_options") or {}
    for variant in variants:
        options = variant_options(variant, options_cfg.get(variant.name))
        result = quantize_variant(variant, reference_dir, out_root / variant.name, source, tokenizer, device,
                                  options, reference_dtype)
        index["variants"][variant.name] = result.to_json()
    del model
    (out_root / INDEX_FILE).write_text(json.dumps(index, indent=1))
    print(format_index(index))
    log.info("wrote %s", out_root / INDEX_FILE)
    return index


def read_index(out_root: Path) -> dict[str, Any] | None:
    path = Path(out_root) / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def format_index(index: Mapping[str, Any]) -> str:
    reference = index["variants"][index["reference"]]
    lines = [f"{'variant':<10} {'disk MB':>9} {'x ref':>6} {'weights MB':>10} {'quantized':>9} {'kept float':>10} "
             f"{'emb/head':>8}  description"]
    for name, item in index["variants"].items():
        embedding = "quant" if item.get("embedding_quantized") else "float"   # absent in older indexes: float
        lines.append(f"{name:<10} {item['disk_bytes'] / 1e6:>9.3f} {item['disk_bytes'] / reference['disk_bytes']:>6.3f} "
                     f"{item['weight_bytes'] / 1e6:>10.3f} {item['quantized_layers']:>9} "
                     f"{len(item.get('kept_float', {})):>10} {embedding:>8}  {item['description']}")
    return "\n".join(lines)


def quiet_transformers() -> None:
    """Progress bars and fallback-kernel notices are noise in a tool's output."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@hydra.main(config_path="../conf", config_name="quantize")
def main(cfg: DictConfig) -> None:
    from lab.settings import check_knobs

    run_or_exit(lambda checked: quantize(check_knobs(checked, "quantize")), cfg, log)


if __name__ == "__main__":
    main()
