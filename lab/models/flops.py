"""Training FLOPs per token from a transformers config, peak FLOP/s of the device, and MFU.

    flops_per_token(config, seq_len) -> float     # forward + backward, per trained token
    peak_flops(device, dtype)        -> float | None
    mfu(tokens_per_s, flops_per_token, peak)     -> float | None

Like lab.models.build, nothing here knows a family by name: every term follows from the fields a config has
(`num_key_value_heads` or Falcon's `multi_query`/`new_decoder_architecture`, `sliding_window`,
`ffn_hidden_size` vs `intermediate_size`, Mamba2's `state_size`/`n_groups`/`chunk_size`, ...).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

import torch
from transformers import PretrainedConfig

from lab import LabError

log = logging.getLogger(__name__)

# Backward costs twice the forward (one matmul for the input gradient, one for the weight gradient).
TRAIN_MULTIPLIER = 3
PEAK_ENV = "LAB_PEAK_TFLOPS"


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs per token (2 per multiply-accumulate), one field per term, summed over layers."""

    attn_proj: float = 0.0     # Q, K, V and output projections
    attn_scores: float = 0.0   # Q·Kᵀ and scores·V over the keys each query may see
    mlp: float = 0.0
    ssm_proj: float = 0.0      # Mamba2 in_proj + out_proj
    ssm_conv: float = 0.0      # depthwise causal conv over x, B, C
    ssm_scan: float = 0.0      # SSD: intra-chunk (C·Bᵀ, masked mixing) + chunk states in and out
    lm_head: float = 0.0
    embedding: float = 0.0     # a table lookup: no FLOPs

    @property
    def forward(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def training(self) -> float:
        return TRAIN_MULTIPLIER * self.forward


def flops_per_token(config: PretrainedConfig, seq_len: int, count_masked: bool = False) -> float:
    """Training FLOPs per token: 3 × forward matmul FLOPs, at 2 FLOPs per multiply-accumulate.

    Per token, with d = hidden_size, V = vocab_size, T = seq_len, summed over the layers:

    attention layer (heads h, KV heads k, head width e, FFN width f):
        projections   2·d·e·(2h + 2k)            Q and O are h·e wide, K and V k·e wide
        scores+values 2·2·h·e·n̄                  n̄ = mean number of keys a query attends to:
                                                  causal (T+1)/2; with a window w < T,
                                                  (w(w+1)/2 + (T−w)·w) / T  (query i sees min(i+1, w) keys)
        MLP           2·3·d·f  gated (gate, up, down: the `intermediate_size` families)
                      2·2·d·f  plain (in, out: the `ffn_hidden_size` families)
    Mamba2 layer (inner width D = expand·d, H heads of P, state N, G groups, conv width K, chunk Q):
        projections   2·d·(2D + 2GN + H) + 2·D·d  in_proj (z, x, B, C, dt) and out_proj
        conv          2·(D + 2GN)·K               depthwise, over x, B, C
        SSD scan      2·(G·N·q̄ + H·P·q̄ + 2·H·N·P) C·Bᵀ and its masked product with x inside a chunk
                                                  (q̄ = (Q'+1)/2 causal positions, Q' = min(Q, T)), then
                                                  the chunk state written (Bᵀx) and read (C·state)
    LM head           2·d·V (tied or not, it is a matmul); the embedding lookup counts 0.

    KV heads: `new_decoder_architecture` -> `num_kv_heads`; a `multi_query` field -> 1 if set, else all
    heads (Falcon's `num_kv_heads` holds the query head count under MQA and is then ignored by the
    model); otherwise `num_key_value_heads`, defaulting to `num_attention_heads`.

    Norms, rotary embeddings, activations, softmax and the loss are left out (< 1% here), as is the
    recomputation of activation checkpointing: MFU counts the model's FLOPs, not the hardware's.

    count_masked=True counts attention over all T keys (and full chunks), i.e. the FLOPs a kernel that
    does not skip masked blocks executes; PaLM's 6N + 12·L·d·T MFU convention counts attention this way.
    """
    return flop_breakdown(config, seq_len, count_masked=count_masked).training


def flop_breakdown(config: PretrainedConfig, seq_len: int, count_masked: bool = False) -> FlopBreakdown:
    """The forward FLOPs per token of `flops_per_token`, term by term (see its docstring)."""
    if seq_len < 1:
        raise LabError(f"seq_len must be >= 1, got {seq_len}")
    d = _required(config, "hidden_size")
    vocab = _required(config, "vocab_size")
    totals = dict(attn_proj=0.0, attn_scores=0.0, mlp=0.0, ssm_proj=0.0, ssm_conv=0.0, ssm_scan=0.0)
    for kind in layer_kinds(config):
        if kind == "ssm":
            proj, conv, scan = _ssm_layer(config, d, seq_len, count_masked)
            totals["ssm_proj"] += proj
            totals["ssm_conv"] += conv
            totals["ssm_scan"] += scan
        else:
            window = _window(config) if kind == "sliding_attention" else None
            proj, scores = _attention_layer(config, d, seq_len, window, count_masked)
            totals["attn_proj"] += proj
            totals["attn_scores"] += scores
        totals["mlp"] += _mlp(config, d)
    return FlopBreakdown(**totals, lm_head=2.0 * d * vocab)


def layer_kinds(config: PretrainedConfig) -> list[str]:
    """One of "full_attention" | "sliding_attention" | "ssm" per layer, from the config's fields."""
    n_layers = _required(config, "num_hidden_layers")
    declared = getattr(config, "layer_types", None)
    if declared is not None and len(declared) == n_layers:
        kinds = [_normalise_kind(config, kind) for kind in declared]
    elif getattr(config, "num_attention_heads", None):
        kinds = ["full_attention"] * n_layers
    elif _has_ssd_fields(config):
        kinds = ["ssm"] * n_layers
    else:
        raise LabError(f"{type(config).__name__}: no attention heads and no SSD fields; no FLOP model for it")
    # A config-wide window (Mistral) applies to every attention layer that does not declare its type.
    if declared is None and _window(config) is not None:
        kinds = ["sliding_attention" if k == "full_attention" else k for k in kinds]
    return kinds


def _normalise_kind(config: PretrainedConfig, kind: str) -> str:
    if kind in ("full_attention", "attention"):
        return "full_attention"
    if kind == "sliding_attention":
        return "sliding_attention" if _window(config) is not None else "full_attention"
    if kind in ("linear_attention", "mamba", "ssm") and _has_ssd_fields(config):
        return "ssm"
    raise LabError(f"{type(config).__name__}: layer type {kind!r} has no FLOP model in lab.models.flops")


def _has_ssd_fields(config: PretrainedConfig) -> bool:
    return all(getattr(config, key, None) is not None
               for key in ("state_size", "num_heads", "head_dim", "expand", "conv_kernel", "chunk_size"))


def _window(config: PretrainedConfig) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def kv_head_count(config: PretrainedConfig) -> int:
    """KV heads the attention really builds (see flops_per_token's docstring for the field rules)."""
    heads = _required(config, "num_attention_heads")
    if getattr(config, "new_decoder_architecture", False):
        return int(config.num_kv_heads)
    if hasattr(config, "multi_query"):
        return 1 if config.multi_query else heads
    return int(getattr(config, "num_key_value_heads", None) or heads)


def mean_attended_keys(seq_len: int, window: int | None = None) -> float:
    """Mean over the T queries of the keys each attends to: query i sees min(i + 1, window) keys."""
    w = seq_len if window is None else min(int(window), seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _attention_layer(config: PretrainedConfig, d: int, seq_len: int, window: int | None,
                     count_masked: bool) -> tuple[float, float]:
    heads = _required(config, "num_attention_heads")
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = kv_head_count(config)
    proj = 2.0 * d * head_dim * (2 * heads + 2 * kv)
    keys = float(seq_len) if count_masked else mean_attended_keys(seq_len, window)
    return proj, 2.0 * 2 * heads * head_dim * keys


def _mlp(config: PretrainedConfig, d: int) -> float:
    plain = getattr(config, "ffn_hidden_size", None)
    if plain:
        return 2.0 * 2 * d * plain
    gated = getattr(config, "intermediate_size", None)
    if gated:
        return 2.0 * 3 * d * gated
    return 0.0  # mixer-only blocks (Mamba2)


def _ssm_layer(config: PretrainedConfig, d: int, seq_len: int, count_masked: bool) -> tuple[float, float, float]:
    inner = int(config.expand * d)
    heads, head_dim = int(config.num_heads), int(config.head_dim)
    state, groups = int(config.state_size), int(getattr(config, "n_groups", 1) or 1)
    conv_dim = inner + 2 * groups * state
    proj = 2.0 * d * (inner + conv_dim + heads) + 2.0 * inner * d
    conv = 2.0 * conv_dim * int(config.conv_kernel)
    chunk = min(int(config.chunk_size), seq_len)
    causal = float(chunk) if count_masked else (chunk + 1) / 2
    scan = 2.0 * (groups * state * causal + heads * head_dim * causal + 2 * heads * state * head_dim)
    return proj, conv, scan


def _required(config: PretrainedConfig, key: str) -> int:
    value = getattr(config, key, None)
    if value is None:
        raise LabError(f"{type(config).__name__} has no {key!r}; lab.models.flops cannot count its FLOPs")
    return int(value)


# --- peak FLOP/s -----------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) tensor-core peaks from the vendors' datasheets, TFLOP/s:
# (bf16/fp16 with fp32 accumulate, tf32, plain fp32). First substring match of the device name wins,
# so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 417.5, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),       # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", (989.4, 494.7, 66.9)),
    ("GH200", (989.4, 494.7, 66.9)),
    ("H800", (989.4, 494.7, 66.9)),
    ("B200", (2250.0, 1100.0, 80.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("A800", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L40", (181.0, 90.5, 90.5)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10G", (70.0, 35.0, 31.2)),
    ("RTX 4090", (165.2, 82.6, 82.6)),
    ("RTX 3090", (71.0, 35.6, 35.6)),
    ("MI300X", (1307.4, 653.7, 163.4)),
)


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
               peak_tflops: float | None = None) -> float | None:
    """Dense peak FLOP/s of `device` for matmuls in `dtype`, or None where unknown (CPU, unlisted GPU).

    `peak_tflops` (or the env var LAB_PEAK_TFLOPS) overrides the table, on any device. fp32 counts as
    TF32 when PyTorch lets matmuls use it (torch.backends.cuda.matmul.allow_tf32 / matmul precision).
    """
    override = peak_tflops if peak_tflops is not None else os.environ.get(PEAK_ENV)
    if override not in (None, ""):
        try:
            value = float(override)
        except ValueError as err:
            raise LabError(f"{PEAK_ENV}={override!r} is not a number of TFLOP/s") from err
        if value <= 0:
            raise LabError(f"peak TFLOP/s must be positive, got {value}")
        return value * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    peaks = device_peaks(name)
    if peaks is None:
        log.warning("no peak FLOP/s known for GPU %r; set %s to get MFU", name, PEAK_ENV)
        return None
    half, tf32, fp32 = peaks
    if dtype in (torch.bfloat16, torch.float16):
        return half * 1e12
    if dtype == torch.float32:
        uses_tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        return (tf32 if uses_tf32 else fp32) * 1e12
    return None


def measured_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          size: int = 1024, repeats: int = 5) -> float:
    """The FLOP/s a square matmul reaches here: the best of `repeats` after a warm-up.

    For devices with no published peak (a CPU: its peak depends on cores, vector width and clocks),
    this achievable GEMM rate stands in, so MFU on a CPU reads "share of what a large matmul gets",
    an upper bound a training step cannot beat by much. Takes well under a second.
    """
    import time

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        torch.mm(a, b)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if attempt:  # the first is the warm-up
            best = min(best, elapsed)
    return 2 * size**3 / best


def device_peaks(device_name: str) -> tuple[float, float, float] | None:
    """(bf16, tf32, fp32) dense TFLOP/s for a CUDA device name, e.g. "NVIDIA H100 80GB HBM3"."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks
    return None


def mfu(tokens_per_s: float | None, flops_per_token: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None if either is unknown)."""
    if not tokens_per_s or not flops_per_token or not peak:
        return None
    return tokens_per_s * flops_per_token / peak
