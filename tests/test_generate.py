"""lab.generate on tiny models of every arch: greedy is really greedy, seeds reproduce, settings are checked."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from lab import PROJECT_ROOT, LabError
from lab.generation.sampling import GenerateSettings, Sampling, generate, generate_ids, read_prompts, run
from lab.models.loading import load_model, load_tokenizer
from lab.config.compose import settings_for
from lab.quantization.quantizer import quantize
from tests.conftest import ARCHS
from tests.test_quantize import tiny_runs  # noqa: F401 (fixture)
from lab.quantization.settings import QuantizeSettings

GREEDY = Sampling.greedy(6)


def shipped(**changes) -> Sampling:
    """conf/generate.yaml's decoding settings with `changes` (checked again, as the dataclass is rebuilt)."""
    return dataclasses.replace(settings_for(GenerateSettings, model_path="unused").sampling, **changes)


def manual_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Argmax decoding with a full forward pass per token: what greedy generate must reproduce."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits    # [1, T, V]
            ids.append(int(logits[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_argmax_decoding(tiny_runs, arch):
    model, source = load_model(tiny_runs[arch] / "hf")
    tokenizer = load_tokenizer(source)
    prompt = "Era odată un"
    ((prompt_ids, new),) = generate_ids(model, tokenizer, [prompt], GREEDY, seed=0, prepend_eos=True)
    assert prompt_ids == [tokenizer.eos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    expected = manual_greedy(model, prompt_ids, GREEDY.max_new_tokens)[len(prompt_ids):]
    assert new.tolist() == [expected]
    decoded = tokenizer.decode(expected, skip_special_tokens=True)
    assert generate(model, tokenizer, [prompt], GREEDY, seed=0, prepend_eos=True) == [[decoded]]


def test_sampling_is_reproducible_by_seed_and_varies_across_seeds(tiny_runs):
    model, source = load_model(tiny_runs["mistral_swa"] / "hf")
    tokenizer = load_tokenizer(source)
    # temperature 2 on a random model: nearly uniform over the vocabulary
    hot = Sampling(max_new_tokens=12, do_sample=True, temperature=2.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                   num_return_sequences=2)
    first = generate(model, tokenizer, ["Astăzi", "Mâine"], hot, seed=3, prepend_eos=True)
    assert first == generate(model, tokenizer, ["Astăzi", "Mâine"], hot, seed=3, prepend_eos=True)
    assert first != generate(model, tokenizer, ["Astăzi", "Mâine"], hot, seed=4, prepend_eos=True)
    assert len(first) == 2 and all(len(samples) == 2 for samples in first)
    # top_k=1 leaves one candidate: sampling collapses to greedy
    narrow = Sampling(max_new_tokens=6, do_sample=True, temperature=1.0, top_k=1, top_p=1.0, repetition_penalty=1.0,
                      num_return_sequences=1)
    assert (generate(model, tokenizer, ["Astăzi"], narrow, seed=5, prepend_eos=True)
            == generate(model, tokenizer, ["Astăzi"], GREEDY, seed=0, prepend_eos=True))


def test_long_prompts_are_fitted_to_the_positions(tiny_runs):
    model, source = load_model(tiny_runs["llama_gqa"] / "hf")
    tokenizer = load_tokenizer(source)
    long_prompt = "Era odată un împărat bătrân care avea trei fii și o grădină plină de meri. " * 6
    assert len(tokenizer(long_prompt)["input_ids"]) > 64
    ((prompt_ids, new),) = generate_ids(model, tokenizer, [long_prompt], Sampling.greedy(100), seed=0,
                                          prepend_eos=True)
    # 64 positions: half for new tokens, the other half for the prompt's last tokens
    assert new.shape == (1, 32) and len(prompt_ids) == 32
    assert prompt_ids == tokenizer(long_prompt)["input_ids"][-32:]
    ((prompt_ids, new),) = generate_ids(model, tokenizer, ["Da"], Sampling.greedy(100), seed=0,
                                          prepend_eos=True)
    assert len(prompt_ids) + new.shape[1] == 64  # a short prompt gets all the room left


def test_quantized_variants_and_checkpoints_generate(tiny_runs, tmp_path):
    run_dir = tiny_runs["falcon_mqa"]
    quantize(settings_for(QuantizeSettings, model_path=str(run_dir / "hf"), variants=["int8wo"], device="cpu",
                          output_dir=str(tmp_path / "q")))
    base = {"prompt": "Primăvara", "max_new_tokens": 5, "do_sample": False, "repetition_penalty": 1.0,
            "device": "cpu", "seed": 0}
    from_variant = run(settings_for(GenerateSettings, **base, model_path=str(tmp_path / "q" / "int8wo")))
    from_ckpt = run(settings_for(GenerateSettings, **base, model_path=str(run_dir / "checkpoints" / "last.ckpt")))
    from_hf = run(settings_for(GenerateSettings, **base, model_path=str(run_dir / "hf")))
    assert from_ckpt == from_hf and len(from_variant) == 1 and len(from_variant[0]) == 1


def test_bad_settings_and_inputs_are_clear_errors(tmp_path):
    with pytest.raises(LabError, match="temperature=0.0 must be > 0 when sampling"):
        shipped(temperature=0.0)
    with pytest.raises(LabError, match=r"top_p=1.5 must be in \(0, 1\]"):
        shipped(top_p=1.5)
    with pytest.raises(LabError, match="top_k=-1"):
        shipped(top_k=-1)
    with pytest.raises(LabError, match="max_new_tokens=0"):
        shipped(max_new_tokens=0)
    with pytest.raises(LabError, match="1 for greedy decoding"):
        shipped(do_sample=False, num_return_sequences=3)
    assert settings_for(GenerateSettings, model_path="x", top_k=40, temperature=0.7).sampling.top_k == 40
    with pytest.raises(LabError, match=r"top_k is missing from the config"):
        Sampling.from_config({"max_new_tokens": 4, "do_sample": True, "temperature": 0.7})
    with pytest.raises(LabError, match="give a prompt"):
        read_prompts("", None)
    (tmp_path / "prompts.txt").write_text("Era odată\n\nA fost odată\\nca niciodată\n", encoding="utf-8")
    assert read_prompts("ignored", str(tmp_path / "prompts.txt")) == ["Era odată", "A fost odată\nca niciodată"]
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(LabError, match="has no prompt"):
        read_prompts(None, str(tmp_path / "empty.txt"))
    with pytest.raises(LabError, match="prompt_file not found"):
        read_prompts(None, str(tmp_path / "missing.txt"))
    with pytest.raises(LabError, match="does not exist"):
        run(settings_for(GenerateSettings, model_path=str(tmp_path / "missing"), prompt="x"))


def test_cli(tiny_runs, tmp_path):
    command = [sys.executable, "-m", "lab.generate", f"model_path={tiny_runs['llama_mha'] / 'hf'}",
               "prompt='Bună ziua'", "max_new_tokens=4", "do_sample=false", f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ">>> Bună ziua\nBună ziua" in result.stdout
    result = subprocess.run([*command[:3], "prompt=x", "top_p=2", f"model_path={tmp_path}",
                             f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True,
                            text=True, cwd=PROJECT_ROOT, timeout=120)
    assert result.returncode != 0 and "error: top_p=2.0 must be in (0, 1]" in result.stderr
    assert "Traceback" not in result.stderr
