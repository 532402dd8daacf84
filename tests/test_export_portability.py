"""Every arch's HF export is plain, consistent JSON that transformers 5.x here and 4.x (slow test) load and run:
forward and greedy generate through `**tokenizer(prompt, return_tensors="pt")`, the same tokens in both."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from lab.training.export import export_hf, write_portable_config
from lab.models.build import build_config
from lab.models.arch import build_model
from tests.conftest import compose_config

ARCHS = ("llama_gqa", "mistral_swa", "falcon_mqa", "mamba2", "llama_mha")
PROMPT = "Era odată, în București"


def as_list(value):
    return list(value) if isinstance(value, tuple) else value


def refuse_constant(name: str):
    raise ValueError(f"{name} is not plain JSON")


def tiny_model(arch: str) -> torch.nn.Module:
    cfg = compose_config("train", [f"arch={arch}", "size=tiny", "tokenizer=bpe2k", "data.seq_len=64"])
    torch.manual_seed(0)
    return build_model(build_config(cfg.arch, cfg.size)).eval()


@pytest.fixture(scope="module")
def exports(prepared_sample, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {arch: export_hf(tiny_model(arch), root / arch, prepared_sample / "tokenizer") for arch in ARCHS}


def greedy(folder: Path) -> tuple[list[int], list[float]]:
    """Greedy continuation and the prompt's last logits, as a user of the folder gets them with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0].tolist(), logits[:16].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_config_json_is_plain_json_and_consistent(exports, arch):
    text = (exports[arch] / "config.json").read_text(encoding="utf-8")
    config = json.loads(text, parse_constant=refuse_constant)
    assert "__float__" not in text
    if config.get("multi_query") and config.get("new_decoder_architecture") is False:
        assert config["num_kv_heads"] == 1  # the one K/V head the multi-query block has


@pytest.mark.parametrize("arch", ARCHS)
def test_export_reloads_to_the_same_model_and_generates_from_the_tokenizer_output(exports, arch):
    from transformers import AutoModelForCausalLM

    original = tiny_model(arch)
    loaded = AutoModelForCausalLM.from_pretrained(exports[arch]).eval()
    for key, value in original.config.to_dict().items():
        if key not in ("_name_or_path", "transformers_version", "architectures", "num_kv_heads", "dtype", "torch_dtype"):
            assert as_list(getattr(loaded.config, key, None)) == as_list(value), key
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits, rtol=0, atol=0)
    tokens, _ = greedy(exports[arch])
    assert len(tokens) > 6


def test_the_tokenizer_returns_only_what_a_causal_lm_takes(exports):
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(exports["llama_gqa"])(PROMPT, return_tensors="pt")
    assert set(encoded) == {"input_ids", "attention_mask"}


def test_a_non_default_infinity_is_kept_with_a_warning(tmp_path, caplog):
    import transformers

    config = transformers.Mamba2Config(time_step_limit=(0.5, math.inf), vocab_size=64, hidden_size=16,
                                       num_hidden_layers=1, num_heads=2, head_dim=16)
    config.save_pretrained(tmp_path)
    write_portable_config(tmp_path / "config.json", config)
    assert "time_step_limit" in json.loads((tmp_path / "config.json").read_text())
    assert "time_step_limit" in caplog.text and "not finite" in caplog.text
    default = transformers.Mamba2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_heads=2, head_dim=16)
    default.save_pretrained(tmp_path / "d")
    write_portable_config(tmp_path / "d" / "config.json", default)
    assert "time_step_limit" not in json.loads((tmp_path / "d" / "config.json").read_text())
    assert transformers.Mamba2Config.from_pretrained(tmp_path / "d").time_step_limit == (0.0, math.inf)


@pytest.fixture(scope="module")
def transformers4_python(tmp_path_factory) -> Path:
    """A venv with transformers 4.x (and the deps it pins) from the package registry, which sees this venv's torch
    behind its own packages (a .pth file is read after the venv's site-packages), so no second torch is installed."""
    venv = tmp_path_factory.mktemp("transformers4") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "transformers>=4.57,<5"],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        pytest.skip(f"cannot install transformers<5 here: {pip.stderr[-300:]}")
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "zz_lab_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin" / "python"


@pytest.mark.slow
def test_every_export_runs_in_transformers_4_with_the_same_greedy_tokens(exports, transformers4_python):
    script = (
        "import json, sys, torch, transformers\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "folder, prompt = sys.argv[1], sys.argv[2]\n"
        "tok = AutoTokenizer.from_pretrained(folder)\n"
        "model = AutoModelForCausalLM.from_pretrained(folder).eval()\n"
        "inputs = tok(prompt, return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    logits = model(**inputs).logits[0, -1]\n"
        "    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)\n"
        "print(json.dumps([transformers.__version__, out[0].tolist(), logits[:16].tolist()]))\n")
    for arch, folder in exports.items():
        old = subprocess.run([str(transformers4_python), "-c", script, str(folder), PROMPT], capture_output=True,
                             text=True, timeout=300)
        assert old.returncode == 0, (arch, old.stderr[-2000:])
        version, tokens, logits = json.loads(old.stdout.strip().splitlines()[-1])
        assert version.startswith("4."), version
        new_tokens, new_logits = greedy(folder)
        assert tokens == new_tokens, arch
        torch.testing.assert_close(torch.tensor(logits), torch.tensor(new_logits), rtol=1e-4, atol=1e-4)
