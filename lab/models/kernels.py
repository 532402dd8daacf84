"""Fast paths for training on a GPU, each chosen from the model's config and the device, each with a
fallback that is what a CPU machine runs (and what the tests check is chosen there).

    attention_choice(config, device) -> AttentionChoice   attn_implementation to build/set the model with, and why
    apply_fast_paths(model, device)  -> FastPaths    sets it, plus the SDPA fixes below; a report to log
    causal_lm_loss(model, input_ids, chunk_size)     next-token loss, the LM head optionally chunked
    ssm_fast_path(model)             -> FastPath     whether the model's SSM mixers run fused kernels
    compile_model(model, chunked_loss)               torch.compile in place, covering the chosen loss path

Attention: full causal attention goes to SDPA with `is_causal` (flash / cuDNN kernels on CUDA). A
sliding window under SDPA is a dense [T, T] mask, which costs full attention; on CUDA it goes to
flex attention instead, whose block mask skips the key blocks outside the window (transformers builds
that BlockMask from `sliding_window` for the families that support flex). Two SDPA calls in
transformers miss the fused kernels and fall back to the O(T²)-memory math kernel: a materialised
causal mask (attention modules that always build one, e.g. Falcon's) and K/V with fewer heads than Q
passed without `enable_gqa` (multi-query attention written as broadcasting). apply_fast_paths drops
the first (a pure causal mask becomes `is_causal`) and the loss context rewrites the second.

Nothing here names a family: the decisions read config fields and what the model classes declare.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import PretrainedConfig, PreTrainedModel

from lab import LabError
from lab.models.flops import kv_head_count, layer_kinds

log = logging.getLogger(__name__)

FLEX = "flex_attention"
SDPA = "sdpa"
EAGER = "eager"
# Config fields that change the logits after the head; the chunked loss does not model them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


# --- attention ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FastPath:
    ok: bool
    reason: str


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str   # attn_implementation: "sdpa" | "flex_attention" | "eager"
    fast: bool            # False where a faster kernel exists for this model but cannot be used
    reason: str


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The causal-LM class transformers builds for this config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as err:
        raise LabError(f"{type(config).__name__} has no causal-LM class in transformers") from err


def flex_available(device: torch.device | str) -> bool:
    """Whether `auto` may choose flex attention here. On CPU (torch 2.13) flex runs forward only: its backward
    raises NotImplementedError, and each shape compiles an inductor C++ kernel first (~10 s), so a CPU run
    never chooses it (train.attention=flex_attention still forces it, e.g. for inference checks)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def attention_choice(config: PretrainedConfig, device: torch.device | str) -> AttentionChoice:
    """The attention implementation for this config on this device, and why."""
    kinds = set(layer_kinds(config))
    if not kinds & {"full_attention", "sliding_attention"}:
        return AttentionChoice(EAGER, True, "no attention layers: the setting is unused")
    cls = model_class(config)
    fallback = SDPA if getattr(cls, "_supports_sdpa", False) else EAGER
    device_type = torch.device(device).type
    if "sliding_attention" in kinds:
        if not flex_available(device):
            return AttentionChoice(fallback, True, f"sliding window as a dense mask (flex needs CUDA, device is "
                                                   f"{device_type})")
        if not getattr(cls, "_supports_flex_attn", False):
            return AttentionChoice(fallback, False, f"{cls.__name__} does not support flex attention: the window "
                                                    "is a dense mask that saves nothing")
        return AttentionChoice(FLEX, True, "the block mask skips the key blocks outside the window")
    if fallback == EAGER:
        return AttentionChoice(EAGER, False, f"{cls.__name__} does not support SDPA")
    return AttentionChoice(SDPA, True, "full causal attention: flash/cuDNN kernels via is_causal")


def set_attention(model: PreTrainedModel, implementation: str) -> None:
    if model.config._attn_implementation == implementation:
        return
    if not model._can_set_attn_implementation():
        raise LabError(f"{type(model).__name__} cannot switch to attn_implementation={implementation!r} after it "
                       f"is built; set config._attn_implementation before build_model")
    model.set_attn_implementation(implementation)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Causal self-attention modules: they declare `is_causal` and own projection layers."""
    return [m for m in model.modules()
            if getattr(m, "is_causal", None) is True and any(isinstance(c, nn.Linear) for c in m.children())]


def _is_pure_causal(mask: torch.Tensor) -> bool:
    """A [B, 1, T, T] mask (bool: True = attend; float: 0 = attend) that is exactly the causal triangle."""
    if mask.ndim != 4 or mask.shape[-1] != mask.shape[-2]:
        return False
    allowed = mask if mask.dtype == torch.bool else mask == 0
    causal = torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril()
    return bool((allowed == causal).all())


def _drop_causal_mask(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    """Forward pre-hook: replace a materialised causal mask by None, so SDPA gets `is_causal=True`.

    Installed only where the config has no window or bias in the mask and the inputs carry no padding
    (lab never passes an attention_mask), so every square mask here is the causal triangle. Eager calls
    verify that once per shape; compiled graphs rely on it.
    """
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[-1] != mask.shape[-2]:
        return None
    if not torch.compiler.is_compiling():
        checked = module.__dict__.setdefault("_lab_causal_checked", set())
        if mask.shape not in checked:
            if not _is_pure_causal(mask):
                return None  # padding or another pattern: keep the mask, correctness first
            checked.add(mask.shape)
    return args, {**kwargs, "attention_mask": None}


class _BroadcastKVAsGQA(TorchFunctionMode):
    """Within this mode, SDPA calls whose K/V have fewer heads than Q get `enable_gqa=True`.

    Broadcasting one KV head (multi-query attention) is valid for SDPA, but only its math kernel takes
    it: flash and memory-efficient kernels require equal head counts unless `enable_gqa` is set.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) >= 2 and not kwargs.get("enable_gqa"):
            query, key = args[0], args[1]
            q_heads, kv_heads = query.shape[-3], key.shape[-3]
            if kv_heads < q_heads and q_heads % kv_heads == 0:
                kwargs = {**kwargs, "enable_gqa": True}
        return func(*args, **kwargs)


@dataclass
class FastPaths:
    """What apply_fast_paths chose for a model; `as_params()` is flat, for run records."""

    attention: str
    attention_reason: str
    causal_mask_hooks: int = 0     # attention modules whose materialised causal mask becomes is_causal
    gqa_sdpa: bool = False         # SDPA calls run under _BroadcastKVAsGQA
    ssm: FastPath | None = None
    notes: list[str] = field(default_factory=list)

    def as_params(self) -> dict[str, str]:
        params = {"fast/attention": self.attention, "fast/attention_reason": self.attention_reason,
                  "fast/causal_mask_hooks": str(self.causal_mask_hooks), "fast/gqa_sdpa": str(self.gqa_sdpa)}
        if self.ssm is not None:
            params |= {"fast/ssm_kernels": str(self.ssm.ok), "fast/ssm_reason": self.ssm.reason}
        return params


def apply_fast_paths(model: PreTrainedModel, device: torch.device | str, attention: str = "auto") -> FastPaths:
    """Switch the model to the attention implementation for `device` (or the one named by `attention`)
    and fix the SDPA calls that would miss the fused kernels; returns what was done. Idempotent; weights
    and parameter names unchanged."""
    config = model.config
    kinds = layer_kinds(config)
    choice = attention_choice(config, device)
    if attention != "auto" and attention != choice.implementation:
        choice = AttentionChoice(attention, True, f"requested (the default here would be {choice.implementation})")
    if {"full_attention", "sliding_attention"} & set(kinds):
        set_attention(model, choice.implementation)
    report = FastPaths(attention=model.config._attn_implementation, attention_reason=choice.reason)
    if not choice.fast:
        report.notes.append(choice.reason)

    plain_causal = "sliding_attention" not in kinds and not getattr(config, "alibi", False)
    if report.attention == SDPA and plain_causal:
        for module in _attention_modules(model):
            if _drop_causal_mask not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_drop_causal_mask, with_kwargs=True)
            report.causal_mask_hooks += 1
    if report.attention == SDPA and "full_attention" in kinds:
        report.gqa_sdpa = kv_head_count(config) < config.num_attention_heads
    model._lab_gqa_sdpa = report.gqa_sdpa
    if "ssm" in kinds:
        report.ssm = ssm_fast_path(model, device)
        if not report.ssm.ok:
            report.notes.append(report.ssm.reason)
    return report


@contextlib.contextmanager
def fast_context(model: nn.Module) -> Iterator[None]:
    """The context the model's forward runs in (enter it around any forward, loss or not)."""
    if getattr(model, "_lab_gqa_sdpa", False):
        with _BroadcastKVAsGQA():
            yield
    else:
        yield


# --- SSM kernels ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelBinding:
    function: str               # the kernel's name in its package, e.g. "causal_conv1d_fn"
    package: str                # the package transformers tried to import it from
    implementation: str | None  # "module.function" bound at import, None: the PyTorch reference


def kernel_bindings(module: nn.Module) -> list[KernelBinding]:
    """The kernel-backed functions a module's forward calls and what transformers bound them to.

    transformers wraps such functions with `use_kernel_func_from_hub_with_fallback(name, package)`, which
    imports the package once, at import of the modelling file, and closes over the result (there is no
    `is_fast_path_available` flag any more); this reads that decision back from the closure.
    """
    forward = inspect.unwrap(type(module).forward)
    bindings = []
    for name in forward.__code__.co_names:
        state = _fallback_closure(forward.__globals__.get(name))
        if state is not None:
            impl = state["implementation"]
            bound = f"{impl.__module__}.{impl.__name__}" if state["is_new_implementation"] else None
            bindings.append(KernelBinding(state.get("func_name", name), state.get("package", "?"), bound))
    return bindings


def _fallback_closure(obj: Any) -> dict[str, Any] | None:
    for _ in range(8):  # through decorators that keep __wrapped__
        if not inspect.isfunction(obj):
            return None
        nonlocals = inspect.getclosurevars(obj).nonlocals
        if "is_new_implementation" in nonlocals and "implementation" in nonlocals:
            return nonlocals
        obj = getattr(obj, "__wrapped__", None)
    return None


def ssm_fast_path(model: nn.Module, device: torch.device | str | None = None) -> FastPath:
    """Whether the model's SSM mixers run the fused CUDA/Triton kernels (training calls the fused
    conv+scan+norm+out_proj kernel, evaluation the conv and chunked-scan kernels), or why not.
    `device` defaults to where the model's parameters are."""
    one_per_class = {type(m): m for m in model.modules()}.values()
    bindings = {b for m in one_per_class for b in kernel_bindings(m)}
    if not bindings:
        return FastPath(False, "no module calls a kernel-backed function (no SSM mixer)")
    missing = sorted(f"{b.function} ({b.package} not importable)" for b in bindings if b.implementation is None)
    if missing:
        return FastPath(False, "PyTorch reference path, much slower: " + ", ".join(missing))
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
    if torch.device(device).type != "cuda":
        return FastPath(False, f"kernels installed, but the model is on {torch.device(device).type}; they run on CUDA")
    return FastPath(True, "fused kernels: " + ", ".join(sorted(b.implementation for b in bindings)))


# --- loss -----------------------------------------------------------------------------------------------

def causal_lm_loss(model: PreTrainedModel, input_ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over a batch of packed blocks. input_ids: [B, T] -> scalar.

    Position t predicts token t+1: B·(T−1) targets, the shift done exactly once and nothing ignored
    (blocks carry no padding). chunk_size=None is transformers' own loss (labels=input_ids). With a
    chunk_size, the backbone's hidden states go through the LM head `chunk_size` tokens at a time and
    the gradient is formed chunk by chunk, so the [B·T, V] fp32 logits never exist at once.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise LabError(f"input_ids must be [batch, seq_len >= 2], got shape {tuple(input_ids.shape)}")
    with fast_context(model):
        if not chunk_size:
            return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise LabError(f"{type(model).__name__}: the chunked loss needs a Linear LM head, "
                           f"got {type(head).__name__}")
        transforms = [k for k in _LOGIT_TRANSFORMS if getattr(model.config, k, None) not in (None, 1, 1.0)]
        if transforms:
            raise LabError(f"{type(model).__name__} transforms its logits ({transforms}); use loss_chunk_size=null")
        hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, d]
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])                              # [B·(T−1), d]
    targets = input_ids[:, 1:].reshape(-1)                                              # [B·(T−1)]
    return chunked_linear_cross_entropy(hidden, head.weight, head.bias, targets, int(chunk_size))


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """mean_i CE(hidden_i · weightᵀ + bias, targets_i), never holding more than [chunk_size, V] logits.
    hidden: [N, d], weight: [V, d], bias: [V] | None, targets: [N] (all valid) -> scalar fp32."""
    if chunk_size < 1:
        raise LabError(f"loss chunk_size must be >= 1, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:  # evaluation: the loss alone, still chunk by chunk
        acc = torch.promote_types(weight.dtype, torch.float32)
        total = sum(F.cross_entropy(F.linear(hidden[i:i + chunk_size], weight, bias).to(acc),
                                    targets[i:i + chunk_size], reduction="sum")
                    for i in range(0, hidden.shape[0], chunk_size))
        return total / hidden.shape[0]
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """LM head + cross-entropy whose forward also forms the gradients, a chunk at a time: the backward
    only scales them. Same FLOPs as the plain head (no recomputation); memory O(chunk · V) instead of
    O(N · V). Matmuls run in the dtype the head's matmul produces (bf16 under autocast), softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=acc)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]                       # [c, d]
            t = targets[start:start + chunk_size]                      # [c]
            logits = F.linear(h, weight, bias)                         # [c, V] in the matmul dtype
            log_probs = torch.log_softmax(logits.to(acc), dim=-1)      # [c, V], a new tensor
            loss = loss - log_probs.gather(1, t[:, None]).sum()
            # d(mean CE)/d logits = (softmax − onehot) / N, formed in place over log_probs
            grad = log_probs.exp_()
            grad.scatter_add_(1, t[:, None], torch.full_like(t[:, None], -1, dtype=grad.dtype))
            grad = grad.mul_(1.0 / n).to(logits.dtype)                 # [c, V]
            # same dtypes as the forward matmul: autocast casts as it did there, or all already match
            grad_hidden[start:start + chunk_size] = grad @ weight
            grad_weight += (grad.t() @ h).to(acc)
            if grad_bias is not None:
                grad_bias += grad.to(acc).sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_hidden * grad_loss.to(grad_hidden.dtype),
                (grad_weight * grad_loss).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_loss).to(bias_dtype),
                None, None)


# --- compile --------------------------------------------------------------------------------------------

def compile_model(model: PreTrainedModel, chunked_loss: bool = False, **options: Any) -> None:
    """torch.compile in place (parameter names and checkpoints unchanged). The plain loss runs
    model(...), so the whole model is compiled, the head and loss included; the chunked loss calls the
    backbone directly, which a compiled top-level forward would not cover, so the backbone is compiled."""
    (model.base_model if chunked_loss else model).compile(**options)
