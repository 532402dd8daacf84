"""Quantization with torchao: the variants (what each quantizes, where it runs), quantizing a model, saving and
re-checking each variant folder, and the quantize.json index. The command and its usage: lab/quantize.py."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from lab import LabError
from lab.models.loading import (INDEX_FILE, VARIANT_FILE, ModelSource, default_output_dir, disk_bytes, dtype_name,
                                is_quantized, load_model, load_tokenizer, quiet_transformers, read_index,
                                resolve_device, resolve_dtype, resolve_source, use_gather_embedding,
                                use_linear_forward, weight_bytes)
from lab.config.units import MB
from lab.models.quant_formats import Variant, no_embedding_sharing, resolve_variants
from lab.quantization.settings import QuantizeSettings
from lab.runs.selection import for_each_model, model_config, selection_from_config

log = logging.getLogger("lab.quantize")  # the command's name: its console lines keep their prefix


# -- what a model has quantized -------------------------------------------------------------------------------------


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


def layers_to_keep_float(model: nn.Module, group_size: int | None, quantize_embedding: bool) -> dict[str, str]:
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

    unknown = set(options) - set(variant.knobs)
    if unknown:
        if "quantize_embedding" in unknown:
            raise no_embedding_sharing(variant)
        raise LabError(f"variant {variant.name}: unknown option(s) {sorted(unknown)} (its knobs: {list(variant.knobs)})")
    # a knob the variant does not have is off: float8dq and int4wo never quantize the embedding
    quantize_embedding = bool(options.get("quantize_embedding", False))
    config = variant.make_config(options, device)
    tied = tied_embedding(model)
    keep_float = layers_to_keep_float(model, options.get("group_size"), quantize_embedding)
    quantize_(model, config, filter_fn=lambda module, name: isinstance(module, nn.Linear) and name not in keep_float)
    if quantize_embedding and tied is not None and tied[1] not in keep_float:
        if not share_quantized_embedding(model, tied):
            raise LabError(f"variant {variant.name}: the tied LM head {tied[1]} was not quantized; "
                           "cannot share a quantized embedding")
    return config, keep_float


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
    options: dict[str, Any] = field(default_factory=dict)     # the variant_options it was made with

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "description": self.description, "options": self.options,
                "disk_bytes": self.disk_bytes,
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
                         dict(keep_float), repr(config), diff, time.perf_counter() - start, embedding,
                         dict(options))


def made_with(index: Mapping[str, Any] | None, source: ModelSource, name: str, options: Mapping[str, Any]) -> bool:
    """Whether quantize.json holds variant `name` of this model, made with these variant_options (an index from
    before options were recorded: no), and its folder is there: then it need not be made again."""
    item = (index or {}).get("variants", {}).get(name) if (index or {}).get("source") == str(source.path) else None
    return bool(item) and item.get("options") == dict(options) and Path(item.get("path", "")).is_dir()


def quantize(settings: QuantizeSettings) -> dict[str, Any]:
    """Write the float reference and each variant; returns (and writes) the quantize.json index."""
    quiet_transformers()
    source = resolve_source(settings.model_path)
    device = resolve_device(settings.device)
    reference_dtype = resolve_dtype(settings.dtype, device)
    variants = resolve_variants(settings.variants, device)
    out_root = Path(settings.output_dir).resolve() if settings.output_dir else default_output_dir(source)
    out_root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(source, settings.tokenizer_path)

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
    for variant in variants:
        result = quantize_variant(variant, reference_dir, out_root / variant.name, source, tokenizer, device,
                                  settings.variant_options[variant.name], reference_dtype)
        index["variants"][variant.name] = result.to_json()
    del model
    (out_root / INDEX_FILE).write_text(json.dumps(index, indent=1))
    print(format_index(index))
    log.info("wrote %s", out_root / INDEX_FILE)
    return index


def format_index(index: Mapping[str, Any]) -> str:
    reference = index["variants"][index["reference"]]
    lines = [f"{'variant':<10} {'disk MB':>9} {'x ref':>6} {'weights MB':>10} {'quantized':>9} {'kept float':>10} "
             f"{'emb/head':>8}  description"]
    for name, item in index["variants"].items():
        embedding = "quant" if item.get("embedding_quantized") else "float"   # absent in older indexes: float
        lines.append(f"{name:<10} {item['disk_bytes'] / MB:>9.3f} {item['disk_bytes'] / reference['disk_bytes']:>6.3f} "
                     f"{item['weight_bytes'] / MB:>10.3f} {item['quantized_layers']:>9} "
                     f"{len(item.get('kept_float', {})):>10} {embedding:>8}  {item['description']}")
    return "\n".join(lines)


def quantize_command(settings: QuantizeSettings) -> dict[str, Any]:
    """`model_path=`: quantize that model (its quantize.json index). `runs=`: quantize every selected run's
    export, going on past failures; {run label: index}, or one LabError line naming the runs that failed."""

    selection = selection_from_config(settings)
    if selection is None:
        return quantize(settings)
    return for_each_model(selection, lambda run: quantize(model_config(settings, run, folders=("output_dir",))),
                          "lab.quantize")
