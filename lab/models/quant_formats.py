"""The registry of the lab's quantized formats: each torchao variant (what it quantizes, where it runs, its knobs),
checked variant options, and the torchao class names a quantized folder may name. It sits below the model loader
(lab/models/loading.py), as transformers' `quantizers` sit below its `modeling_utils`; quantizing a model is
lab/quantization/."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from lab import LabError
from lab.config.checks import boolean, integer, list_of, text
from lab.models.build import serialized_types

@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    make_config: Callable[[Mapping[str, Any], torch.device], Any]   # (options, device) -> torchao AOBaseConfig
    devices: tuple[str, ...]                    # device types whose kernels it targets
    min_capability: tuple[int, int] | None = None   # CUDA compute capability it needs
    dtype: torch.dtype | None = None            # float dtype its kernels need (None: the reference dtype)
    # its knobs, each set in conf/quantize.yaml variant_options.<name>: group_size (per-group schemes);
    # quantize_embedding (variants that can quantize the tied embedding / LM head once and share it: the weight
    # tensor they make implements both F.linear (head) and F.embedding (lookup), one scale per vocabulary row)
    knobs: tuple[str, ...] = ()

    @property
    def shares_embedding(self) -> bool:
        return "quantize_embedding" in self.knobs

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
            knobs=("quantize_embedding",)),
    Variant("int8dq", "int8 weights and dynamically quantized int8 activations", _int8dq, ("cpu", "cuda"),
            knobs=("quantize_embedding",)),
    Variant("intx4wo", "int4 weights in groups (stored unpacked, one int8 per value)", _intx4wo, ("cpu",),
            knobs=("group_size",)),
    Variant("int4wo", "int4 weights in groups, packed for the tinygemm kernel", _int4wo, ("cuda",),
            dtype=torch.bfloat16, knobs=("group_size",)),
    Variant("float8dq", "float8 e4m3 weights and activations (per-row scales)", _float8dq, ("cuda",),
            min_capability=(8, 9), dtype=torch.bfloat16),
)}


_KNOB_CHECKS = {"group_size": integer(1), "quantize_embedding": boolean}


def check_variant_options(node: Any, key: str = "variant_options") -> dict[str, dict[str, Any]]:
    """conf/quantize.yaml `variant_options`: {variant: {knob: value}} with every knob of every variant that has one
    (Variant.knobs) stated and checked; an unknown variant or knob is refused."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if not isinstance(node, Mapping):
        raise LabError(f"{key}={node!r} must be a mapping {{variant: {{knob: value}}}}")
    unknown = sorted(set(map(str, node)) - set(VARIANTS))
    if unknown:
        raise LabError(f"{key}.{unknown[0]}: not a variant; known: {', '.join(VARIANTS)}")
    options: dict[str, dict[str, Any]] = {}
    for name, variant in VARIANTS.items():
        given = node.get(name) or {}
        if not isinstance(given, Mapping):
            raise LabError(f"{key}.{name}={given!r} must be a mapping of the variant's knobs {list(variant.knobs)}")
        for knob, value in given.items():
            if knob == "quantize_embedding" and knob not in variant.knobs and value is False:
                continue  # what the variant does anyway: it never quantizes the embedding
            if knob not in variant.knobs:
                if knob == "quantize_embedding":
                    raise no_embedding_sharing(variant)
                raise LabError(f"{key}.{name}.{knob}: not a knob of {name} (its knobs: {list(variant.knobs) or 'none'})")
        missing = [knob for knob in variant.knobs if knob not in given]
        if missing:
            raise LabError(f"{key}.{name}.{missing[0]} is missing from the config (it has no default in code; "
                           "restore it in conf/quantize.yaml)")
        options[name] = {knob: _KNOB_CHECKS[knob](given[knob], f"{key}.{name}.{knob}") for knob in variant.knobs}
    return options


def no_embedding_sharing(variant: Variant) -> LabError:
    sharing = ", ".join(name for name, v in VARIANTS.items() if v.shares_embedding)
    return LabError(f"variant {variant.name}: quantize_embedding=true is supported for {sharing} only "
                    f"(their weight tensor serves both the embedding lookup and the LM head)")


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


@functools.lru_cache(maxsize=1)
def lab_quant_types() -> frozenset[str]:
    """Every torchao class name the lab's own variants serialize into a folder's quantization_config: what a
    quantized folder from elsewhere may name (from_pretrained builds whatever it names)."""
    from transformers import TorchAoConfig


    names: set[str] = set()
    for variant in VARIANTS.values():
        # any valid knob values: only the class names the config serializes into matter here
        probe = {knob: {"group_size": 128, "quantize_embedding": False}[knob] for knob in variant.knobs}
        config = variant.make_config(probe, torch.device(variant.devices[0]))
        names |= serialized_types(TorchAoConfig(config).to_dict())
    return frozenset(names)


def check_variant_list(value: Any, key: str) -> str | tuple[str, ...]:
    """`auto` or a list of names; the names themselves are checked against this device's variants later."""
    if value == "auto" or value is None:
        return "auto"
    if isinstance(value, str):
        return (text(value, key),)
    return list_of(text)(value, key)
