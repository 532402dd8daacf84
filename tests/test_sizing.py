"""lab.sizing: every family lands within ±1% of a parameter target, with its shape rules kept."""

from __future__ import annotations

import shlex

import pytest
from omegaconf import OmegaConf

from lab import LabError
from lab.models.arch import apply_size, build_model, count_params, count_params_meta
from lab.models.build import build_config
from lab.models.sizes import match_size
from lab.sizing import main as sizing_main
from tests.conftest import ARCHS, compose_config


def arch_and_size(arch: str, *overrides: str) -> tuple[dict, dict]:
    cfg = compose_config("train", [f"arch={arch}", *overrides])
    return OmegaConf.to_container(cfg.arch, resolve=True), OmegaConf.to_container(cfg.size, resolve=True)


def assert_shape_rules(original: dict, matched: dict) -> None:
    """Head width unchanged, query:KV sharing kept, SSD heads cover expand · width."""
    if "num_attention_heads" in original:
        head_dim = original["hidden_size"] // original["num_attention_heads"]
        assert matched["hidden_size"] == head_dim * matched["num_attention_heads"]
        for kv in ("num_key_value_heads", "num_kv_heads"):
            if kv in original:
                ratio = original["num_attention_heads"] // original[kv]
                assert matched["num_attention_heads"] == ratio * matched[kv]
    if "num_heads" in original and "expand" in original:
        assert matched["num_heads"] * matched["head_dim"] == matched["expand"] * matched["hidden_size"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("target", [50e6, 1e9])
def test_total_params_within_one_percent(arch, target):
    node, _ = arch_and_size(arch)
    match = match_size(node, target)
    assert abs(match.params / target - 1) <= 0.01
    config = build_config({**node, **match.overrides})
    counted = count_params_meta(config)
    assert counted.total == match.total == match.params
    assert set(match.overrides) <= set(node)  # only fields the arch already has
    assert match.hydra_overrides() == [f"arch.{k}={v}" for k, v in sorted(match.overrides.items())]
    assert_shape_rules(node, {**node, **match.overrides})


@pytest.mark.parametrize("arch", ["llama_gqa", "mamba2"])
def test_non_embedding_basis_on_the_tiny_preset(arch):
    # tiny preset and 2k vocab: the match starts from the preset's shape and is checked on a real model
    node, size = arch_and_size(arch, "size=tiny", "tokenizer=bpe2k", "data.seq_len=64")
    start = apply_size(node, size)
    match = match_size(start, 1e6, basis="non_embedding")
    assert abs(match.non_embedding / 1e6 - 1) <= 0.01
    model = build_model(build_config(match.node))
    assert count_params(model).non_embedding == match.non_embedding
    assert_shape_rules(start, match.node)


def test_keeps_the_depth_to_width_ratio_when_scaling_down():
    node, _ = arch_and_size("llama_gqa")
    match = match_size(node, 50e6)
    depth, width = match.node["num_hidden_layers"], match.node["hidden_size"]
    ratio, ratio0 = depth / width, node["num_hidden_layers"] / node["hidden_size"]
    assert 0.7 < ratio / ratio0 < 1.4
    assert width < node["hidden_size"] and depth < node["num_hidden_layers"]


def test_target_already_met_changes_nothing():
    node, _ = arch_and_size("falcon_mqa")
    total = count_params_meta(build_config(node)).total
    match = match_size(node, total * 1.004)
    assert match.overrides == {} and match.total == total


def test_restricted_vary_and_bad_input():
    node, _ = arch_and_size("llama_gqa")
    # depth alone moves in ~12.6M steps at this width: 50M within ±1% needs the width too
    with pytest.raises(LabError, match=r"no shape within ±1.0%.*closest.*vary=num_hidden_layers,hidden_size"):
        match_size(node, 50e6, vary=("num_hidden_layers",))
    match = match_size(node, 250e6, vary=("num_hidden_layers", "intermediate_size"))
    assert set(match.overrides) <= {"num_hidden_layers", "intermediate_size"}
    assert match.node["hidden_size"] == node["hidden_size"]
    with pytest.raises(LabError, match="cannot vary.*state_size"):
        match_size(node, 50e6, vary=("num_hidden_layers", "state_size"))
    with pytest.raises(LabError, match="basis"):
        match_size(node, 50e6, basis="embedding")
    with pytest.raises(LabError, match="positive"):
        match_size(node, -5)
    with pytest.raises(LabError, match="unresolved"):
        match_size({**node, "vocab_size": "${tokenizer.vocab_size}"}, 50e6)


def test_extra_grid_field_for_state_space_models():
    node, _ = arch_and_size("mamba2")
    match = match_size(node, 200e6, vary=("num_hidden_layers", "hidden_size", "state_size"))
    assert abs(match.params / 200e6 - 1) <= 0.01
    assert_shape_rules(node, match.node)


def test_cli_overrides_rebuild_the_match(capsys):
    assert sizing_main(["arch=mamba2", "target=50e6", "size=tiny"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("# mamba2: ") and "target 50.00M total" in out[0]
    overrides = shlex.split(out[1])
    assert overrides[0] == "size=full"  # the printed fields already include the preset's changes
    cfg = compose_config("train", ["arch=mamba2", *overrides])
    total = count_params_meta(build_config(cfg.arch, cfg.size)).total
    assert abs(total / 50e6 - 1) <= 0.01

    assert sizing_main(["arch=mamba2"]) == 1
    assert "target=<params> is required" in capsys.readouterr().err
    assert sizing_main(["arch=nope", "target=1e6"]) == 1
    assert "Could not find 'arch/nope'" in capsys.readouterr().err
