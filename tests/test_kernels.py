"""lab.models.kernels: which implementation each model gets on CPU and CUDA, that the window is really applied
(and matches a naive reference), the SDPA fixes, the chunked loss against the plain one, SSM kernel
detection. CUDA-only checks are marked `gpu`."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface, MistralForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from lab import LabError
from lab.models.arch import build_model
from lab.models import kernels
from lab.models.kernels import (FLEX, SDPA, apply_fast_paths, attention_choice, causal_lm_loss,
                                chunked_linear_cross_entropy, kernel_bindings, ssm_fast_path)
from test_flops import ARCHS, TINY_SEQ, TINY_VOCAB, arch_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_model(arch: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch_config(arch, **overrides))


def tokens(batch: int = 2, seq: int = TINY_SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --- attention choice -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, on_cpu, on_cuda", [
    ("llama_gqa", SDPA, SDPA), ("llama_mha", SDPA, SDPA), ("falcon_mqa", SDPA, SDPA),
    ("mistral_swa", SDPA, FLEX), ("mamba2", "eager", "eager"),
])
def test_attention_choice_per_device(arch, on_cpu, on_cuda):
    config = arch_config(arch)
    assert attention_choice(config, "cpu").implementation == on_cpu
    assert attention_choice(config, torch.device("cuda")).implementation == on_cuda  # a decision, no GPU needed


def test_window_falls_back_to_sdpa_without_flex(monkeypatch):
    config = arch_config("mistral_swa")
    monkeypatch.setattr(kernels, "flex_available", lambda device: False)
    assert attention_choice(config, "cuda").implementation == SDPA
    monkeypatch.undo()
    monkeypatch.setattr(MistralForCausalLM, "_supports_flex_attn", False)
    choice = attention_choice(config, "cuda")
    assert choice.implementation == SDPA and not choice.fast and "saves nothing" in choice.reason


# --- the window: applied, and as the naive reference defines it --------------------------------------------

def naive_window_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Reference: explicit softmax over keys j with j <= i and i - j < window, ignoring the mask given.
    query: [B, H, T, D], key/value: [B, Hkv, T, D] -> ([B, T, H, D], None)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q_pos = torch.arange(query.shape[2])[:, None]
    k_pos = torch.arange(key.shape[2])[None, :]
    allowed = k_pos <= q_pos
    window = getattr(module.config, "sliding_window", None)
    if window:
        allowed &= q_pos - k_pos < window
    scores = (query @ key.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register("lab_naive", naive_window_attention)
AttentionMaskInterface.register("lab_naive", eager_mask)  # built by transformers, ignored by the reference


def logits_with(model: nn.Module, implementation: str, ids: torch.Tensor) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_sdpa_window_matches_naive_reference():
    model = tiny_model("mistral_swa").eval()
    ids = tokens()
    torch.testing.assert_close(logits_with(model, SDPA, ids), logits_with(model, "lab_naive", ids))


def test_window_is_applied_only_beyond_its_length():
    windowed = tiny_model("mistral_swa").eval()
    window = windowed.config.sliding_window
    full = build_model(arch_config("mistral_swa", sliding_window=None)).eval()
    full.load_state_dict(windowed.state_dict())
    long, short = tokens(seq=4 * window), tokens(seq=window)
    with torch.no_grad():
        assert not torch.allclose(windowed(input_ids=long).logits, full(input_ids=long).logits, atol=1e-4)
        torch.testing.assert_close(windowed(input_ids=short).logits, full(input_ids=short).logits)


class _Abort(Exception):
    pass


@pytest.mark.slow  # flex attention compiles on first use (~20 s on CPU); the numeric check below stays in make test
def test_flex_block_mask_skips_out_of_window_blocks():
    """The BlockMask transformers hands the flex kernel for a windowed model: key blocks beyond the
    window are absent, so the kernel never visits them (a dense mask would visit all of them)."""
    seq, block = 1024, 128
    model = tiny_model("mistral_swa", seq_len=seq, sliding_window=200).eval()
    model.set_attn_implementation(FLEX)
    captured = []

    def grab(module, args, kwargs):
        captured.append(kwargs["attention_mask"])
        raise _Abort  # the mask is what we test; no need to run the kernel

    attention = next(m for name, m in model.named_modules() if name.endswith("self_attn"))
    attention.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad(), pytest.raises(_Abort):
        model(input_ids=tokens(batch=1, seq=seq), use_cache=False)
    mask = captured[0]
    assert type(mask).__name__ == "BlockMask" and mask.BLOCK_SIZE == (block, block)
    visited = (mask.kv_num_blocks + (mask.full_kv_num_blocks if mask.full_kv_num_blocks is not None else 0))
    visited = visited.reshape(-1).tolist()  # key blocks per query block
    # query block q covers rows [128q, 128q+127]; with a 200-token window it reaches back to block
    # floor((128q - 199) / 128): at most 3 blocks, where causal attention needs q + 1
    expected = [min(q + 1, q - (128 * q - 199) // 128 + 1) for q in range(seq // block)]
    assert visited == expected
    assert sum(visited) < sum(range(1, seq // block + 1))


def test_flex_window_matches_naive_reference_on_cpu():
    """The flex path end to end (transformers compiles flex_attention with inductor, on CPU here)."""
    model = tiny_model("mistral_swa").eval()
    ids = tokens()
    torch.testing.assert_close(logits_with(model, FLEX, ids), logits_with(model, "lab_naive", ids),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@cuda
def test_flex_window_on_cuda_matches_reference_and_beats_dense_mask():
    import time

    model = tiny_model("mistral_swa", seq_len=4096, sliding_window=512).cuda().eval()
    ids = tokens(batch=2, seq=4096).cuda()
    reference = logits_with(model, "lab_naive", ids)
    torch.testing.assert_close(logits_with(model, FLEX, ids), reference, atol=1e-3, rtol=1e-3)

    def timed(implementation):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=ids)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                model(input_ids=ids)
            torch.cuda.synchronize()
        return time.perf_counter() - start

    assert timed(FLEX) < timed(SDPA)


# --- SDPA fixes: materialised causal masks and broadcast KV heads ---------------------------------------------

class _RecordSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append({"kv_heads": args[1].shape[-3], "q_heads": args[0].shape[-3],
                               "mask": kwargs.get("attn_mask"), "is_causal": kwargs.get("is_causal"),
                               "enable_gqa": kwargs.get("enable_gqa", False)})
        return func(*args, **kwargs)


@pytest.mark.filterwarnings("ignore:.*(kernel not used|same num_heads).*:UserWarning")
def test_multi_query_sdpa_reaches_the_fused_kernel():
    model = tiny_model("falcon_mqa").eval()
    ids = tokens()
    with torch.no_grad():
        plain = causal_lm_loss(model, ids)
        # as transformers calls it: a materialised mask and one broadcast KV head -> math kernel only
        with pytest.raises(RuntimeError, match="No available kernel"), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            causal_lm_loss(model, ids)
        report = apply_fast_paths(model, "cpu")
        assert report.attention == SDPA and report.gqa_sdpa
        assert report.causal_mask_hooks == model.config.num_hidden_layers
        with _RecordSDPA() as record, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fast = causal_lm_loss(model, ids)
    torch.testing.assert_close(fast, plain)
    assert record.calls and all(c["mask"] is None and c["is_causal"] and c["enable_gqa"] and c["kv_heads"] == 1
                                for c in record.calls)


def test_mask_hook_keeps_masks_that_are_not_causal():
    model = tiny_model("llama_gqa").eval()
    apply_fast_paths(model, "cpu")
    ids = tokens()
    padding = torch.ones_like(ids)
    padding[0, :5] = 0  # left padding: the mask is no longer the causal triangle
    with torch.no_grad():
        kept = model(input_ids=ids, attention_mask=padding).logits
        model2 = tiny_model("llama_gqa").eval()
        reference = model2(input_ids=ids, attention_mask=padding).logits
    torch.testing.assert_close(kept, reference)


def test_apply_fast_paths_is_idempotent_and_copyable():
    import copy

    model = tiny_model("falcon_mqa")
    first, second = apply_fast_paths(model, "cpu"), apply_fast_paths(model, "cpu")
    assert first.as_params() == second.as_params()
    attention = next(m for name, m in model.named_modules() if name.endswith("self_attention"))
    assert len(attention._forward_pre_hooks) == 1
    clone = copy.deepcopy(model)  # e.g. for an EMA copy or quantization
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(clone, ids), causal_lm_loss(model, ids))


def test_fast_paths_report_per_family():
    windowed = apply_fast_paths(tiny_model("mistral_swa"), "cpu")
    assert windowed.causal_mask_hooks == 0 and not windowed.gqa_sdpa  # the window mask must stay
    mha = apply_fast_paths(tiny_model("llama_mha"), "cpu")
    assert not mha.gqa_sdpa and mha.causal_mask_hooks > 0
    ssm = apply_fast_paths(tiny_model("mamba2"), "cpu")
    assert ssm.attention == "eager" and ssm.ssm is not None and not ssm.ssm.ok
    assert set(ssm.as_params()) >= {"fast/attention", "fast/ssm_kernels", "fast/ssm_reason"}


# --- chunked cross-entropy ----------------------------------------------------------------------------------

def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_loss_equals_plain_loss_and_gradient(arch):
    model = tiny_model(arch)
    ids = tokens()
    plain = causal_lm_loss(model, ids)
    plain.backward()
    expected = grads(model)
    model.zero_grad()
    chunked = causal_lm_loss(model, ids, chunk_size=37)  # 126 targets: chunks of 37, 37, 37, 15
    chunked.backward()
    torch.testing.assert_close(chunked, plain)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)


def test_loss_shifts_once_and_ignores_nothing():
    model = tiny_model("llama_gqa")
    ids = tokens()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        assert causal_lm_loss(model, ids) == pytest.approx(by_hand.item(), rel=1e-5)
        assert causal_lm_loss(model, ids, chunk_size=1000) == pytest.approx(by_hand.item(), rel=1e-5)


def test_chunked_loss_under_bf16_autocast():
    model = tiny_model("llama_gqa")
    ids = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = causal_lm_loss(model, ids)
    plain.backward()
    expected = grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = causal_lm_loss(model, ids, chunk_size=50)
    chunked.backward()
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(plain.item(), rel=2e-3)
    for name, grad in grads(model).items():
        cosine = F.cosine_similarity(grad.flatten().float(), expected[name].flatten().float(), dim=0)
        assert cosine > 0.99, name


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_chunked_loss_never_holds_all_logits():
    hidden = torch.randn(512, 16, requires_grad=True)
    weight = torch.randn(1000, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (512,))
    with _LargestTensor() as plain:
        F.cross_entropy(F.linear(hidden, weight).float(), targets).backward()
    with _LargestTensor() as chunked:
        chunked_linear_cross_entropy(hidden, weight, None, targets, chunk_size=64).backward()
    assert plain.largest == 512 * 1000
    assert chunked.largest == 64 * 1000


def test_chunked_cross_entropy_with_bias_matches_plain():
    hidden = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(30, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (40,))
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_linear_cross_entropy(h, w, b, targets, 7), (hidden, weight, bias))
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    torch.testing.assert_close(chunked_linear_cross_entropy(hidden, weight, bias, targets, 7), plain)


def test_loss_rejects_bad_input():
    model = tiny_model("llama_gqa")
    with pytest.raises(LabError, match="seq_len >= 2"):
        causal_lm_loss(model, tokens(seq=1))
    with pytest.raises(LabError, match="chunk_size"):
        chunked_linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), None, torch.zeros(2, dtype=torch.long), 0)


# --- SSM kernels ------------------------------------------------------------------------------------------------

def test_ssm_fast_path_on_this_machine():
    report = ssm_fast_path(tiny_model("mamba2"))
    assert not report.ok  # CPU: either the kernels are missing or the model is not on CUDA
    assert "not importable" in report.reason or "on cpu" in report.reason
    assert not ssm_fast_path(tiny_model("llama_gqa")).ok


def test_kernel_binding_detection_with_a_fake_kernel_package(monkeypatch):
    """transformers' import-time decision, read back: bound where the package imports, None otherwise."""
    from transformers.integrations import use_kernel_func_from_hub_with_fallback

    package = types.ModuleType("lab_fake_kernels")
    exec("def fused_scan(x):\n    return x * 2\n", package.__dict__)  # defined in the package
    monkeypatch.setitem(sys.modules, "lab_fake_kernels", package)
    modelling = types.ModuleType("lab_fake_modelling")

    def reference_scan(x):
        return x * 2

    modelling.fused_scan = use_kernel_func_from_hub_with_fallback("fused_scan", "lab_fake_kernels")(reference_scan)
    modelling.slow_conv = use_kernel_func_from_hub_with_fallback("slow_conv", "lab_absent_pkg")(reference_scan)
    source = ("import torch\nclass Mixer(torch.nn.Module):\n    def forward(self, x):\n"
              "        return fused_scan(x) if self.training else slow_conv(x)\n")
    exec(compile(source, "lab_fake_modelling.py", "exec"), modelling.__dict__)
    bindings = {b.function: b for b in kernel_bindings(modelling.Mixer())}
    assert bindings["fused_scan"].implementation == "lab_fake_kernels.fused_scan"
    assert bindings["slow_conv"].implementation is None and bindings["slow_conv"].package == "lab_absent_pkg"
    report = ssm_fast_path(modelling.Mixer(), device="cuda")
    assert not report.ok and "slow_conv (lab_absent_pkg not importable)" in report.reason

    modelling.slow_conv = modelling.fused_scan  # both bound now
    assert ssm_fast_path(modelling.Mixer(), device="cuda").ok
    assert "on cpu" in ssm_fast_path(modelling.Mixer(), device="cpu").reason


@pytest.mark.gpu
@cuda
def test_ssm_kernels_on_cuda_match_the_pytorch_reference(monkeypatch):
    """Loss and gradients through the fused kernels against transformers' own PyTorch reference path."""
    from lab.models.kernels import _fallback_closure

    model = tiny_model("mamba2").cuda().train()
    report = ssm_fast_path(model)
    if not report.ok:
        pytest.skip(f"SSM kernels not built here: {report.reason} (scripts/build_gpu_kernels.sh)")
    ids = tokens().cuda()
    fused = causal_lm_loss(model, ids)
    fused.backward()
    fused_grads = grads(model)
    model.zero_grad()

    mixer = next(m for m in model.modules() if kernel_bindings(m))
    namespace = sys.modules[type(mixer).__module__]
    for name in inspect.unwrap(type(mixer).forward).__code__.co_names:
        state = _fallback_closure(getattr(namespace, name, None))
        if state is not None:
            monkeypatch.setattr(namespace, name, state["torch_function"])
    assert kernel_bindings(mixer) == []  # every kernel-backed call now goes to its PyTorch reference
    reference = causal_lm_loss(model, ids)
    reference.backward()
    assert fused.item() == pytest.approx(reference.item(), rel=1e-3)
    for name, grad in grads(model).items():
        cosine = F.cosine_similarity(grad.flatten(), fused_grads[name].flatten(), dim=0)
        assert cosine > 0.999, name
