"""Model I/O for every tool: where a model comes from, loading it, the device and dtype it runs in, its size.

    source = resolve_source("outputs/<run>/<time>/hf")       # HF export, lab.quantize variant folder, or .ckpt
    device = resolve_device("auto")                           # cuda when there is one
    model, source = load_model(source, device, resolve_dtype("auto", device))   # eval mode, on the device
    tokenizer = load_tokenizer(source)

A model is an HF folder (`save_pretrained` + tokenizer, a lab.train export or a lab.quantize variant) or a
lab.train Lightning checkpoint (rebuilt from its hyper-parameters). Everything read is untrusted: config.json
is checked before transformers reads it (lab.models.build.check_hf_folder), checkpoints load weights only, and no
code shipped with a folder runs. Quantized folders get the two run-time fix-ups torchao tensors need
(`use_linear_forward`, `use_gather_embedding`). lab.quantize (the variants and how they are written) imports
this module; the two things loading needs from it, the variant names and the torchao classes they serialize,
are imported lazily.
"""

from __future__ import annotations

import functools
import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lab import LabError
from lab.models.quant_formats import VARIANTS, lab_quant_types
from lab.models.checkpoints import read_checkpoint
from lab.models.arch import build_model
from lab.models.build import check_hf_folder, config_from_record, load_tokenizer_folder, read_json_file

INDEX_FILE = "quantize.json"        # in lab.quantize's output root: every variant written there
VARIANT_FILE = "lab_variant.json"   # in each variant folder: what it is and where it came from
RUN_ID_FILE = "mlflow_run_id"       # written by lab.train into its run folder
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# -- device and dtype -----------------------------------------------------------------------------------------------


def resolve_device(name: str | None, option: str = "device=") -> torch.device:
    """auto (or empty): cuda when there is one, else cpu; else the named torch device, which must exist here.

    `option` is how the caller's users spell the setting in messages (`device=` for the Hydra tools)."""
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise LabError(f"{option}{name!r} is not a torch device (auto | cpu | cuda | cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LabError(f"{option}{name}, but PyTorch sees no CUDA device here; use {option}cpu (or auto)")
    return device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously): a timer read after this is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The float reference dtype: bf16 on CUDA, fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if not name or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise LabError(f"dtype={name!r} is not one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def quiet_transformers() -> None:
    """Progress bars and fallback-kernel notices are noise in a tool's output."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


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
            meta = read_json_file(path / VARIANT_FILE, f"model folder {path}")
            variant, run_dir = (meta.get("variant"), meta.get("run_dir")) if isinstance(meta, dict) else (None, None)
            if (not isinstance(variant, str) or variant not in {*_variant_names(), *_DTYPE_NAMES.values()}
                    or not isinstance(run_dir, (str, type(None)))):
                raise LabError(f"model folder {path}: {VARIANT_FILE} is not one lab.quantize writes "
                               f"(variant {variant!r}, run_dir {run_dir!r}); remove it to load the folder as plain HF")
            run_dir = Path(run_dir) if run_dir else None
            return ModelSource(path, "hf", run_dir if run_dir and run_dir.is_dir() else find_run_dir(path), variant)
        return ModelSource(path, "hf", find_run_dir(path))
    raise LabError(f"model_path={path} does not exist (expected an HF folder or a .ckpt file)")


def _variant_names() -> list[str]:

    return list(VARIANTS)


def default_output_dir(source: ModelSource) -> Path:
    """Where lab.quantize writes (and lab.evaluate looks for) the variants of `source` by default."""
    if source.run_dir is not None:
        return source.run_dir / "quantized" / source.name
    return source.path.parent / f"{source.name}-quantized"


def read_index(out_root: Path) -> dict[str, Any] | None:
    """lab.quantize's index of the variants in `out_root` (None when it has not written one)."""
    path = Path(out_root) / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _load_checkpoint(path: Path) -> nn.Module:
    """The HF model inside a lab.train checkpoint: rebuilt from its hyper-parameters, weights from `model.*`.

    The checkpoint is untrusted input: its config goes through config_from_record (closed list of classes,
    plain values, bounded sizes), never through instantiate."""

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


def check_model_folder(folder: Path) -> dict[str, Any]:
    """config.json of an HF folder checked before transformers reads it (lab.models.build.check_hf_folder: one of the
    lab's config classes, plain values, no auto_map, only the lab's own torchao configs); returns it parsed."""

    return check_hf_folder(folder, set(lab_quant_types()))


def load_hf_model(folder: Path, dtype: Any = None) -> nn.Module:
    """An HF folder from elsewhere as a causal LM on the CPU: checked first (lab.models.build.check_hf_folder), no
    remote code; a damaged weight file is one LabError line."""
    from transformers import AutoModelForCausalLM

    config = check_model_folder(folder)
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


# -- run-time fix-ups for quantized weights ---------------------------------------------------------------------


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


def has_weights(folder: Path) -> bool:
    """Does the HF folder hold a weight file (safetensors, or a torch .bin / .pt)?"""
    return any(f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES) for f in Path(folder).iterdir())


def disk_bytes(folder: Path) -> int:
    """Bytes of the weight files in an HF folder (tokenizer and config files excluded)."""
    path = Path(folder)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))


def is_quantized(tensor: Any) -> bool:
    """Is this a torchao tensor subclass (int8/int4/float8 data + scales)?"""
    return isinstance(tensor, torch.Tensor) and hasattr(tensor, "__tensor_flatten__")
