"""lab.models.flops against independent counts: torch's FlopCounterMode on the built models, the attention mask
transformers really applies, and the Falcon KV heads as built."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from transformers import FalconConfig, LlamaConfig, PretrainedConfig

from lab import CONF_DIR, LabError
from lab.models.flops import (device_peaks, flop_breakdown, flops_per_token, kv_head_count, layer_kinds,
                              mean_attended_keys, measured_matmul_flops, mfu, peak_flops)
from lab.models.build import build_config
from lab.models.arch import build_model, kv_heads

ARCHS = ["llama_gqa", "mistral_swa", "falcon_mqa", "mamba2", "llama_mha"]
TINY_SEQ, TINY_VOCAB = 64, 256


def arch_config(arch: str, size: str = "tiny", seq_len: int = TINY_SEQ, vocab: int = TINY_VOCAB,
                **overrides) -> PretrainedConfig:
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "arch" / f"{arch}.yaml"), resolve=False)
    node["vocab_size"] = vocab  # the ${tokenizer.vocab_size} / ${data.seq_len} interpolations
    if "max_position_embeddings" in node:
        node["max_position_embeddings"] = seq_len
    size_node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "size" / f"{size}.yaml"))
    return build_config(node, size_node, **overrides)


def eager_model(config: PretrainedConfig) -> torch.nn.Module:
    config._attn_implementation = "eager"  # explicit matmuls over all T keys: what FlopCounterMode sees
    return build_model(config).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_flop_counter(arch):
    """count_masked=True is what the eager reference executes: every matmul torch dispatches, counted."""
    config = arch_config(arch)
    model = eager_model(config)
    tokens = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=tokens, use_cache=False)
    counted = counter.get_total_flops() / tokens.numel()
    ours = flop_breakdown(config, TINY_SEQ, count_masked=True)

    if "ssm" in layer_kinds(config):
        # The PyTorch fallback of the SSD scan does more than the algorithm needs, all of it known:
        # B and C are repeated per head before C·Bᵀ, the chunk recurrence runs as a (chunks+1)² einsum,
        # and the conv computes K-1 padded outputs that are then cut.
        heads, groups, state = config.num_heads, config.n_groups, config.state_size
        chunk, head_dim, kernel = config.chunk_size, config.head_dim, config.conv_kernel
        chunks = -(-TINY_SEQ // chunk) + 1
        conv_dim = config.expand * config.hidden_size + 2 * groups * state
        per_layer = 2 * ((heads - groups) * chunk * state
                         + chunks**2 * heads * head_dim * state / TINY_SEQ
                         + (kernel - 1) * conv_dim * kernel / TINY_SEQ)
        assert counted == pytest.approx(ours.forward + config.num_hidden_layers * per_layer, rel=1e-9)
    else:
        assert counted == pytest.approx(ours.forward, rel=1e-9)
        by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
        # mm: every Linear (projections, MLP, head); bmm: the two attention matmuls
        assert by_op["aten.mm"] / tokens.numel() == pytest.approx(ours.attn_proj + ours.mlp + ours.lm_head)
        assert by_op["aten.bmm"] / tokens.numel() == pytest.approx(ours.attn_scores)


def test_training_is_three_forwards_and_backward_matches_counter():
    config = arch_config("llama_gqa")
    model = eager_model(config).train()
    tokens = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
    counted = counter.get_total_flops() / tokens.numel()
    # backward skips the gradient w.r.t. the integer input, i.e. nothing a matmul computes: exactly 3×
    assert counted == pytest.approx(flops_per_token(config, TINY_SEQ, count_masked=True), rel=1e-9)
    assert flops_per_token(config, TINY_SEQ) == pytest.approx(3 * flop_breakdown(config, TINY_SEQ).forward)


@pytest.mark.parametrize("arch", ["llama_gqa", "mistral_swa"])
def test_attended_keys_match_the_mask_transformers_applies(arch):
    """The causal/window count against the additive mask the eager attention really receives."""
    config = arch_config(arch)
    model = eager_model(config)
    masks = []
    attention = next(m for name, m in model.named_modules() if name.endswith("self_attn"))
    attention.register_forward_pre_hook(lambda mod, args, kwargs: masks.append(kwargs["attention_mask"]),
                                        with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, TINY_VOCAB, (1, TINY_SEQ)), use_cache=False)
    allowed = (masks[0] == 0).sum().item() / TINY_SEQ  # [1, 1, T, T] additive: 0 where attended
    window = getattr(config, "sliding_window", None)
    assert allowed == pytest.approx(mean_attended_keys(TINY_SEQ, window))
    heads, head_dim = config.num_attention_heads, config.head_dim
    expected = config.num_hidden_layers * 2 * 2 * heads * head_dim * allowed
    assert flop_breakdown(config, TINY_SEQ).attn_scores == pytest.approx(expected)


def test_window_cuts_attention_only_when_the_sequence_is_longer():
    windowed, full = arch_config("mistral_swa"), arch_config("llama_gqa")
    window = windowed.sliding_window
    assert layer_kinds(windowed) == ["sliding_attention"] * windowed.num_hidden_layers
    long_w, long_f = flop_breakdown(windowed, 4 * window), flop_breakdown(full, 4 * window)
    assert long_w.attn_scores < long_f.attn_scores
    assert long_w.attn_proj == long_f.attn_proj and long_w.mlp == long_f.mlp
    short_w, short_f = flop_breakdown(windowed, window), flop_breakdown(full, window)
    assert short_w.attn_scores == short_f.attn_scores
    # the masked count ignores the window: a kernel that does not skip blocks does all of them
    assert flop_breakdown(windowed, 4 * window, count_masked=True).attn_scores == \
        flop_breakdown(full, 4 * window, count_masked=True).attn_scores


def test_mean_attended_keys():
    assert mean_attended_keys(4) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert mean_attended_keys(5, window=2) == pytest.approx((1 + 2 + 2 + 2 + 2) / 5)
    assert mean_attended_keys(3, window=8) == mean_attended_keys(3)


def test_projection_flops_order_mqa_gqa_mha():
    def per_layer_proj(arch: str) -> float:
        config = arch_config(arch, size="full", seq_len=2048, vocab=40000)
        return flop_breakdown(config, 2048).attn_proj / config.num_hidden_layers

    assert per_layer_proj("falcon_mqa") < per_layer_proj("llama_gqa") < per_layer_proj("llama_mha")


@pytest.mark.parametrize("fields, expected", [
    (dict(multi_query=True, num_kv_heads=4), 1),                                  # MQA ignores num_kv_heads
    (dict(multi_query=False, new_decoder_architecture=False, num_kv_heads=2), 4),  # fused 3·d QKV
    (dict(new_decoder_architecture=True, num_kv_heads=2), 2),
])
def test_falcon_kv_heads_follow_the_fields_as_built(fields, expected):
    config = FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=32,
                          ffn_hidden_size=128, **fields)
    with torch.device("meta"):
        model = build_model(config)
    assert kv_head_count(config) == kv_heads(model) == expected


def test_full_size_figure_against_the_issue():
    """Issue #7 quotes ≈2.38 GFLOP/token for llama_gqa at 2048: PaLM's 6N + 12·L·d·T (all T keys)."""
    config = arch_config("llama_gqa", size="full", seq_len=2048, vocab=40000)
    d, layers, seq = config.hidden_size, config.num_hidden_layers, 2048
    matmul_params = layers * (d * d * 2 + 2 * d * 256 + 3 * d * config.intermediate_size) + d * 40000
    palm = 6 * matmul_params + 12 * layers * d * seq
    assert flops_per_token(config, seq, count_masked=True) == pytest.approx(palm)
    assert palm == pytest.approx(2.38e9, rel=2e-3)
    # causal: each query sees (T+1)/2 keys on average, so attention costs about half as much
    assert flops_per_token(config, seq) == pytest.approx(palm - 6 * layers * d * (seq - 1), rel=1e-9)


def test_unknown_layout_is_a_lab_error():
    with pytest.raises(LabError, match="no FLOP model"):
        flops_per_token(PretrainedConfig(hidden_size=8, num_hidden_layers=1, vocab_size=8), 16)
    with pytest.raises(LabError, match="seq_len"):
        flops_per_token(LlamaConfig(), 0)


def test_measured_matmul_rate_is_a_plausible_cpu_figure():
    rate = measured_matmul_flops("cpu", torch.float32, size=256, repeats=2)
    assert 1e8 < rate < 1e14  # 0.1 GFLOP/s .. 100 TFLOP/s: a real measurement, not a constant


def test_peak_flops_table_and_overrides(monkeypatch):
    monkeypatch.delenv("LAB_PEAK_TFLOPS", raising=False)
    assert peak_flops("cpu", torch.bfloat16) is None
    assert peak_flops("cpu", torch.bfloat16, peak_tflops=100) == 100e12
    monkeypatch.setenv("LAB_PEAK_TFLOPS", "989.4")
    assert peak_flops("cpu", torch.float32) == pytest.approx(989.4e12)
    monkeypatch.setenv("LAB_PEAK_TFLOPS", "fast")
    with pytest.raises(LabError, match="LAB_PEAK_TFLOPS"):
        peak_flops("cpu", torch.bfloat16)
    assert device_peaks("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert device_peaks("NVIDIA H100 PCIe")[0] == 756.0
    assert device_peaks("NVIDIA H200")[0] == 989.4
    assert device_peaks("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert device_peaks("NVIDIA L40S")[0] == 362.0
    assert device_peaks("NVIDIA L4")[0] == 121.0
    assert device_peaks("NVIDIA GeForce RTX 4090")[0] == 165.2
    assert device_peaks("Some Future GPU") is None


def test_mfu():
    assert mfu(208_000, 2.38e9, 989.4e12) == pytest.approx(0.5, rel=1e-3)
    assert mfu(None, 2.38e9, 989.4e12) is None
    assert mfu(1000.0, 2.38e9, None) is None
