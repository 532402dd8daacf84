"""The lab's GPU code paths, run on CPU wherever this torch allows it: torch.compile (inductor's C++ backend) of
the training step per arch, with its graph breaks counted; the sliding-window mask of the SDPA and flex paths
against a plain softmax reference; bf16-mixed precision; and FSDP over gloo, as far as Lightning and torch let it
run without a GPU. What was measured is in experiments/2026-12-07_gpu_paths_on_cpu/README.md."""

from __future__ import annotations

import copy
import os
import re
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lab.models import kernels
from lab.models.build import build_config
from lab.models.arch import build_model
from lab.models.kernels import FLEX, SDPA, apply_fast_paths, causal_lm_loss, compile_model
from tests.conftest import ARCHS, compose_config, tiny_train_overrides
from test_flops import TINY_SEQ, TINY_VOCAB, arch_config


def tiny_model(arch: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch_config(arch, **overrides))


def tokens(batch: int = 2, seq: int = TINY_SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- torch.compile of the training step ---------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    """Compiled graphs and dynamo's counters are process-wide: each compile test starts and ends clean."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


def compiled_step_against_eager(arch: str, chunk_size: int | None = None, steps: int = 2, **overrides):
    """The lab's train.compile=true path (apply_fast_paths, then compile_model, then causal_lm_loss + backward) and
    the same model eager, from the same weights. Returns (eager loss, compiled losses, eager grads, compiled grads,
    seconds of the first compiled step)."""
    model = tiny_model(arch, **overrides).train()
    apply_fast_paths(model, "cpu")
    eager = copy.deepcopy(model)
    ids = tokens()
    eager_loss = causal_lm_loss(eager, ids, chunk_size)
    eager_loss.backward()
    compile_model(model, chunked_loss=bool(chunk_size))
    losses, first_step_s = [], None
    for _ in range(steps):  # a second step must reuse the graph: no recompile
        model.zero_grad()
        start = time.perf_counter()
        loss = causal_lm_loss(model, ids, chunk_size)
        loss.backward()
        first_step_s = first_step_s or time.perf_counter() - start
        losses.append(loss.detach())
    return eager_loss.detach(), losses, grads(eager), grads(model), first_step_s


def assert_same_step(eager_loss, losses, eager_grads, compiled_grads) -> None:
    for loss in losses:
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_training_step_matches_eager_without_graph_breaks(fresh_dynamo):
    """One layer of falcon_mqa: the arch with both SDPA fixes active (the causal-mask pre-hook and the
    enable_gqa TorchFunctionMode), the two things most likely to break a graph. ~8 s on 2 cores, cold cache."""
    counters = fresh_dynamo
    result = compiled_step_against_eager("falcon_mqa", num_hidden_layers=1)
    assert_same_step(*result[:4])
    assert dict(counters["graph_break"]) == {}
    assert dict(counters["recompiles"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # forward + loss in one graph (backward is AOT-compiled from it)


@pytest.mark.slow  # five archs x two loss paths, ~2-3 min on 2 cores with a cold inductor cache
@pytest.mark.parametrize("chunk_size", [None, 37], ids=["transformers_loss", "chunked_loss"])
@pytest.mark.parametrize("arch", ARCHS)
def test_compile_every_arch_matches_eager(fresh_dynamo, arch, chunk_size):
    """Every arch at size=tiny. Mamba2 (the PyTorch reference SSD scan on CPU) has no graph break either,
    so the same assertion holds for all five; with the CUDA kernels installed its mixers call Triton ops instead."""
    counters = fresh_dynamo
    result = compiled_step_against_eager(arch, chunk_size=chunk_size)
    assert_same_step(*result[:4])
    assert dict(counters["graph_break"]) == {}, f"{arch}: {dict(counters['graph_break'])}"
    assert dict(counters["recompiles"]) == {}


@pytest.mark.slow  # two lab.train runs, one compiled (~40 s cold on 2 cores: a training and an eval graph)
def test_train_compile_true_gives_the_eager_losses(prepared_sample, tmp_path, fresh_dynamo):
    from lab.train import train

    def run(name: str, *extra: str) -> dict:
        cfg = compose_config("train", tiny_train_overrides(prepared_sample, "trainer.max_steps=2",
                                                           "train.export_hf=false", "train.val_max_blocks=2", *extra),
                             run_dir=tmp_path / name)
        return train(cfg)["metrics"]

    eager = run("eager")
    compiled = run("compiled", "train.compile=true")
    counters = fresh_dynamo
    assert compiled["train/loss"] == pytest.approx(eager["train/loss"], rel=1e-5)
    assert compiled["val/loss"] == pytest.approx(eager["val/loss"], rel=1e-5)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2  # training (grad) and validation (no_grad) graphs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU")
def test_flex_attention_asked_for_on_a_cpu_is_one_line_before_the_first_step(prepared_sample, tmp_path):
    """torch has no CPU backward for flex attention: training would die at the first backward with a traceback."""
    from lab import LabError
    from lab.train import train

    cfg = compose_config("train", tiny_train_overrides(prepared_sample, "arch=mistral_swa", "train.attention=flex_attention",
                                                       "train.export_hf=false"), run_dir=tmp_path / "run")
    with pytest.raises(LabError, match="train.attention=flex_attention trains on CUDA only"):
        train(cfg)
    assert not (tmp_path / "run" / "steps.jsonl").exists()


# --- the sliding window: the lab's mask against a plain softmax reference -------------------------------------

def reference_attention(query, key, value, window: int | None) -> torch.Tensor:
    """softmax(q·kᵀ/√d) over keys j <= i (and i − j < window), written out. query: [B, H, T, D], key/value:
    [B, Hkv, T, D] -> [B, T, H, D] (the layout transformers' attention functions return)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    allowed = reference_mask(query.shape[2], window)
    scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ value).transpose(1, 2)


def reference_mask(seq: int, window: int | None) -> torch.Tensor:
    q_pos, k_pos = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    allowed = k_pos <= q_pos
    return allowed & (q_pos - k_pos < window) if window else allowed


def record_attention(monkeypatch, implementation: str) -> list[dict]:
    """Wrap the attention function transformers dispatches to for `implementation`: every call's q/k/v, the mask
    the model built for it and the output are recorded, and the real function still computes the output."""
    real = ALL_ATTENTION_FUNCTIONS[implementation]
    calls: list[dict] = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = real(module, query, key, value, attention_mask, **kwargs)
        calls.append({"query": query, "key": key, "value": value, "mask": attention_mask, "out": out,
                      "scaling": kwargs.get("scaling")})
        return out, weights

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, implementation, recording)
    return calls


def dense_allowed(mask, seq: int) -> torch.Tensor:
    """[T, T] bool (True = may attend) from a dense SDPA mask or from a flex BlockMask's mask_mod."""
    if type(mask).__name__ == "BlockMask":
        from torch.nn.attention.flex_attention import create_mask

        return create_mask(mask.mask_mod, 1, 1, seq, seq, device="cpu")[0, 0]
    mask = mask[0, 0]
    return mask if mask.dtype == torch.bool else mask == 0


@pytest.mark.parametrize("implementation", [
    SDPA,
    # flex on CPU runs forward only (no backward in torch 2.13) and compiles its kernel on first use (~10 s)
    pytest.param(FLEX, marks=pytest.mark.slow),
])
def test_window_mask_equals_the_reference_and_cuts_beyond_the_window(monkeypatch, implementation):
    model = tiny_model("mistral_swa").eval()
    window = model.config.sliding_window
    report = apply_fast_paths(model, "cpu", attention=implementation)
    assert report.attention == implementation and report.causal_mask_hooks == 0  # the window mask must stay
    calls = record_attention(monkeypatch, implementation)
    with torch.no_grad():
        model(input_ids=tokens(seq=TINY_SEQ), use_cache=False)
    assert len(calls) == model.config.num_hidden_layers
    expected_mask = reference_mask(TINY_SEQ, window)
    beyond = torch.arange(TINY_SEQ) >= window  # query positions whose causal past is longer than the window
    for call in calls:
        assert torch.equal(dense_allowed(call["mask"], TINY_SEQ), expected_mask)
        assert call["scaling"] == pytest.approx(call["query"].shape[-1] ** -0.5)
        windowed = reference_attention(call["query"], call["key"], call["value"], window)
        full = reference_attention(call["query"], call["key"], call["value"], None)
        torch.testing.assert_close(call["out"], windowed, atol=2e-5, rtol=1e-4)
        # within the window the two agree; beyond it, every position differs from full attention
        torch.testing.assert_close(call["out"][:, ~beyond], full[:, ~beyond], atol=2e-5, rtol=1e-4)
        per_position = (call["out"] - full).abs().amax(dim=(0, 2, 3))  # [T]
        assert (per_position[beyond] > 1e-4).all(), per_position


def test_the_cpu_default_for_a_window_is_the_dense_mask():
    """Training on CPU cannot take flex (its backward raises NotImplementedError on CPU), so `auto` keeps SDPA with a
    dense window mask there; requesting flex for a forward-only use is allowed (the test above)."""
    assert not kernels.flex_available("cpu")
    assert apply_fast_paths(tiny_model("mistral_swa"), "cpu").attention == SDPA
    model = tiny_model("mistral_swa").train()
    apply_fast_paths(model, "cpu", attention=FLEX)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        causal_lm_loss(model, tokens()).backward()


def test_window_changes_the_logits_only_beyond_its_length():
    """Whole model: the windowed and the full-attention model (same weights) agree at positions < window, at every
    layer's depth, and differ at every position from the window on."""
    windowed = tiny_model("mistral_swa").eval()
    window = windowed.config.sliding_window
    full = build_model(arch_config("mistral_swa", sliding_window=None)).eval()
    full.load_state_dict(windowed.state_dict())
    for model in (windowed, full):
        apply_fast_paths(model, "cpu")
    ids = tokens(seq=TINY_SEQ)
    with torch.no_grad():
        a, b = windowed(input_ids=ids).logits, full(input_ids=ids).logits
    torch.testing.assert_close(a[:, :window], b[:, :window])
    assert ((a[:, window:] - b[:, window:]).abs().amax(dim=(0, 2)) > 1e-4).all()


# --- bf16-mixed --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_step_is_finite_and_close_to_fp32(arch):
    """What precision=bf16-mixed runs (torch.autocast on the device, fp32 weights): per arch, one step's loss and
    gradients against fp32. bf16 keeps 8 bits of mantissa, hence the loose bounds."""
    model = tiny_model(arch).train()
    apply_fast_paths(model, "cpu")
    ids = tokens()
    fp32 = causal_lm_loss(model, ids)
    fp32.backward()
    expected = grads(model)
    model.zero_grad()
    seen_dtypes = set()
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen_dtypes.add(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = causal_lm_loss(model, ids)
    mixed.backward()
    hook.remove()
    assert seen_dtypes == {torch.bfloat16}  # autocast reached the matmuls
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert mixed.item() == pytest.approx(fp32.item(), rel=1e-2)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        assert torch.isfinite(grad).all(), name
        cosine = F.cosine_similarity(grad.flatten(), expected[name].flatten(), dim=0)
        assert cosine > 0.98, (name, cosine.item())


def test_trainer_precision_bf16_mixed_trains_under_autocast(prepared_sample, tmp_path, monkeypatch):
    """Through lab.train and Lightning's precision plugin (trainer.precision=bf16-mixed, accelerator cpu)."""
    import lab.training.module
    from lab.train import train

    autocast_seen = []
    real_loss = lab.training.module.causal_lm_loss

    def loss_recording_autocast(model, input_ids, chunk_size=None):
        autocast_seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_loss(model, input_ids, chunk_size)

    def run(name: str, precision: str) -> dict:
        overrides = tiny_train_overrides(prepared_sample, "trainer.max_steps=2", "train.export_hf=false",
                                         "train.val_max_blocks=2", f"trainer.precision={precision}")
        cfg = compose_config("train", overrides, run_dir=tmp_path / name)
        return train(cfg)["metrics"]

    fp32 = run("fp32", "32-true")
    monkeypatch.setattr(lab.training.module, "causal_lm_loss", loss_recording_autocast)
    mixed = run("bf16", "bf16-mixed")
    assert autocast_seen and all(seen == (True, torch.bfloat16) for seen in autocast_seen)
    for key in ("train/loss", "val/loss"):
        assert torch.isfinite(torch.tensor(mixed[key]))
        assert mixed[key] == pytest.approx(fp32[key], rel=1e-2)


# --- FSDP on CPU -------------------------------------------------------------------------------------------
# Lightning 2.6.6 refuses FSDPStrategy without a CUDA accelerator (AcceleratorConnector._check_strategy_and_fallback,
# tests/test_distributed.py checks that), and past that check it would hand torch FSDP device_id=None for a CPU
# device, which torch refuses too. Torch's FSDP itself runs on CPU over gloo when told the device: these tests
# wrap the model exactly as Lightning's FSDPStrategy._setup_model does with the lab's strategy, device_id aside.

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gloo_world_of_one():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def lab_fsdp_wrap(cfg, model: nn.Module, device_id: torch.device | None):
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lab.training.trainer import fsdp_strategy

    strategy = fsdp_strategy(cfg)  # what lab.train hands Lightning for trainer=fsdp
    return FullyShardedDataParallel(module=model, cpu_offload=strategy.cpu_offload, mixed_precision=None,
                                    sharding_strategy=strategy.sharding_strategy, device_id=device_id,
                                    **strategy.kwargs)


@pytest.mark.filterwarnings("ignore:.*(NO_SHARD|FSDP).*:UserWarning", "ignore::FutureWarning")
def test_torch_refuses_fsdp_on_cpu_as_lightning_calls_it(gloo_world_of_one):
    cfg = compose_config("train", ["experiment=tiny_sample", "trainer=fsdp"])
    model = build_model(build_config(cfg.arch, cfg.size))
    with pytest.raises(RuntimeError, match="FSDP needs a non-CPU accelerator device"):
        lab_fsdp_wrap(cfg, model, device_id=torch.device("cpu").index)  # Lightning passes root_device.index: None


@pytest.mark.filterwarnings("ignore:.*(NO_SHARD|FSDP).*:UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("arch", ["llama_gqa", "mamba2"])
def test_lab_fsdp_units_train_a_step_on_cpu_over_gloo(gloo_world_of_one, arch):
    """One FSDP unit per decoder block (the model's _no_split_modules) plus the root; one AdamW step through the
    wrapped model equals the same step unwrapped. World size 1, so torch runs it as NO_SHARD."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    cfg = compose_config("train", ["experiment=tiny_sample", "trainer=fsdp", f"arch={arch}"])
    torch.manual_seed(0)
    model = build_model(build_config(cfg.arch, cfg.size))
    plain = copy.deepcopy(model)
    wrapped = lab_fsdp_wrap(cfg, model, device_id=torch.device("cpu"))
    units = [m for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel)]
    assert len(units) == plain.config.num_hidden_layers + 1
    ids = torch.randint(0, plain.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    losses = []
    for net in (wrapped, plain):
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        loss = net(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert torch.isfinite(torch.tensor(losses[0]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    with FullyShardedDataParallel.summon_full_params(wrapped):
        after = dict(wrapped.named_parameters())  # FSDP strips its wrapper prefixes
        for name, param in plain.named_parameters():
            torch.testing.assert_close(after[name], param, msg=name)


FULL_SHARD_STEP = '''
import copy, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from lab.models.build import build_config, build_model
from tests.conftest import compose_config
from test_gpu_paths import lab_fsdp_wrap

dist.init_process_group("gloo")
cfg = compose_config("train", ["experiment=tiny_sample", "trainer=fsdp", "arch=" + sys.argv[1]])
torch.manual_seed(0)
model = build_model(build_config(cfg.arch, cfg.size))
plain = copy.deepcopy(model)
wrapped = lab_fsdp_wrap(cfg, model, device_id=torch.device("cpu"))
assert wrapped.sharding_strategy == ShardingStrategy.FULL_SHARD
local = sum(p.numel() for p in wrapped.parameters())  # this rank's shard (use_orig_params: flat views)
ids = torch.randint(0, plain.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
for net in (wrapped, plain):  # the same batch on both ranks: the averaged gradient is the single-process one
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
with FullyShardedDataParallel.summon_full_params(wrapped):
    after = dict(wrapped.named_parameters())
    worst = max((after[n] - p).abs().max().item() for n, p in plain.named_parameters())
total = sum(p.numel() for p in plain.parameters())
print(f"rank {dist.get_rank()} local {local} total {total} worst {worst:.3g}", flush=True)
assert worst < 1e-6 and local < total
dist.destroy_process_group()
'''


@pytest.mark.slow  # torchrun + two processes that each import torch and transformers (~11 s on 2 cores, idle)
def test_lab_fsdp_full_shard_over_two_gloo_ranks(tmp_path):
    """World size 2: parameters really sharded (each rank holds part of them), one AdamW step equals the
    unsharded step."""
    import subprocess
    import sys

    from lab import PROJECT_ROOT

    script = tmp_path / "full_shard_step.py"
    script.write_text(FULL_SHARD_STEP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "tests")]),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), "llama_gqa"],
                          env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # the two ranks share one stdout, so their lines may run together
    reports = sorted(re.findall(r"rank (\d+) local (\d+) total (\d+)", done.stdout))
    assert [rank for rank, _, _ in reports] == ["0", "1"], done.stdout[-2000:]
    assert all(int(local) < int(total) for _, local, total in reports)  # each rank holds only its shard
