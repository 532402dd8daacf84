"""Checkpoints and HF folders are untrusted input: crafted ones run no code, damaged ones give one clear line.

Every case here is a file someone else could hand the user: a checkpoint of plain data (it passes
`torch.load(weights_only=True)`) whose hyper-parameters name a function, a module or a giant model; an HF
folder asking for remote code or a foreign config class; files cut short or overwritten with noise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab import PROJECT_ROOT, LabError
from lab.models.build import check_hf_folder, config_from_record, file_config_classes
from lab.models.loading import load_model, load_tokenizer, resolve_source
from tests.test_quantize import make_prepared, make_run, make_tokenizer, tiny_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust_models")
    tokenizer = make_tokenizer(root / "tokenizer")
    return make_run(root, "llama_gqa", tokenizer, make_prepared(root / "prepared", tokenizer))


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def rewrite_checkpoint(path: Path, edit) -> None:
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)


def write_sentinel_module(folder: Path, name: str, marker: Path) -> None:
    """A module whose import alone leaves a marker file: proof that nothing imported it."""
    (folder / f"{name}.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
                                       "class EvilConfig:\n    pass\n")


# -- checkpoints: what the hyper-parameters may name ------------------------------------------------------------


def test_the_closed_list_is_what_conf_arch_names():
    assert set(file_config_classes()) == {"transformers.LlamaConfig", "transformers.MistralConfig",
                                          "transformers.FalconConfig", "transformers.Mamba2Config"}


@pytest.mark.parametrize("target", ["torch.save", "os.system", "builtins.exec", "lab.prepare.run",
                                    "transformers.BertConfig", "torch.nn.Linear", ""])
def test_checkpoint_target_outside_the_closed_list_is_refused(target):
    node, size = tiny_config("llama_gqa", 320)
    node["_target_"] = target
    with pytest.raises(LabError, match="not one of the lab's config classes"):
        config_from_record(node, size)


def test_checkpoint_naming_a_module_never_imports_it(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    write_sentinel_module(tmp_path, "lab_trust_sentinel", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    node, size = tiny_config("llama_gqa", 320)
    for target in ("lab_trust_sentinel.EvilConfig", "transformers.lab_trust_sentinel.EvilConfig"):
        with pytest.raises(LabError):
            config_from_record({**node, "_target_": target}, size)
    assert not marker.exists() and "lab_trust_sentinel" not in sys.modules


@pytest.mark.parametrize("where", ["arch", "size", "config_overrides"])
def test_nested_targets_are_refused_wherever_they_hide(tmp_path, where):
    marker = tmp_path / "written.pt"
    payload = {"_target_": "torch.save", "obj": [1], "f": str(marker)}
    node, size = tiny_config("llama_gqa", 320)
    parts = {"arch": node, "size": size, "config_overrides": {}}
    field = {"arch": "rope_parameters", "size": "hidden_size", "config_overrides": "rope_parameters"}[where]
    parts[where][field] = payload
    with pytest.raises(LabError):
        config_from_record(parts["arch"], parts["size"], parts["config_overrides"])
    assert not marker.exists()


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 10**9, "out of range"),
    ("num_hidden_layers", 100_000, "out of range"),
    ("vocab_size", -5, "out of range"),
    ("hidden_size", "1024", "out of range"),
    ("hidden_size", True, "out of range"),
    ("rms_norm_eps", float("nan"), "not a finite number"),
    ("no_such_field", 3, "has no field"),
    ("_convert_x", 1, "not allowed"),
])
def test_checkpoint_values_are_plain_bounded_and_known(field, value, message):
    node, size = tiny_config("llama_gqa", 320)
    node[field] = value
    with pytest.raises(LabError, match=message):
        config_from_record(node, size)


def test_a_checkpoint_describing_a_giant_model_is_refused_before_allocation():
    node, _ = tiny_config("llama_gqa", 320)
    node.update(vocab_size=2_000_000, hidden_size=65_536, num_hidden_layers=1, intermediate_size=256,
                num_attention_heads=256, num_key_value_heads=256, head_dim=256)
    with pytest.raises(LabError, match="parameters, more than"):
        config_from_record(node, {})


@pytest.mark.parametrize("knobs, message", [
    ({"target_params": 1e15}, "target_params=.* out of range"),  # lab.sizing would search for hours
    ({"target_params": "50e6"}, "target_params=.* out of range"),
    ({"target_params": 1e6, "target_basis": "evil"}, "target_basis='evil' is not one of"),
    ({"depth_divisor": 0}, "depth_divisor=0 is out of range"),
    ({"depth_divisor": 0.01}, "depth_divisor=0.01 is out of range"),  # would multiply the depth by 100
    ({"depth_divisor": 1, "min_layers": 10**9}, "min_layers=.* out of range"),
    ({"min_layers": 2.5}, "min_layers=2.5 is out of range"),
])
def test_size_knobs_of_a_record_are_bounded(knobs, message):
    node, size = tiny_config("llama_gqa", 320)
    with pytest.raises(LabError, match=message):
        config_from_record(node, {**size, **knobs})


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "vocab_size", "num_hidden_layers"])
def test_zero_widths_are_refused_before_transformers_divides_by_them(field):
    node, size = tiny_config("llama_gqa", 320)
    with pytest.raises(LabError, match=f"{field}=0 is out of range"):
        config_from_record({**node, field: 0}, {})
    with pytest.raises(LabError, match="out of range"):
        config_from_record(node, {**size, "hidden_size": 0})


def test_a_record_with_a_matched_size_still_builds():
    node, size = tiny_config("llama_gqa", 320)
    config = config_from_record(node, {**size, "target_params": 1e6, "target_basis": "non_embedding"})
    assert config.hidden_size >= 8 and config.num_hidden_layers >= 1


def test_wrong_container_types_are_one_line():
    node, size = tiny_config("llama_gqa", 320)
    for arch, size_, overrides in ((["a"], size, {}), (node, "tiny", {}), (node, size, [1, 2])):
        with pytest.raises(LabError, match="not a mapping"):
            config_from_record(arch, size_, overrides)


def test_a_good_checkpoint_still_loads(tiny_run):
    model, source = load_model(tiny_run / "checkpoints" / "last.ckpt")
    assert source.kind == "ckpt" and sum(p.numel() for p in model.parameters()) > 0


# -- checkpoints: damaged files ----------------------------------------------------------------------------------


def damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_empty(path: Path) -> None:
    path.write_bytes(b"")


def damage_noise(path: Path) -> None:
    path.write_bytes(b"\x89not a checkpoint at all\x00" * 100)


def damage_pickled_objects(path: Path) -> None:
    torch.save({"state_dict": {}, "hyper_parameters": {"arch": Path("/etc")}}, path)  # needs full unpickling


def damage_not_a_dict(path: Path) -> None:
    torch.save([1, 2, 3], path)


def damage_no_hparams(path: Path) -> None:
    rewrite_checkpoint(path, lambda c: c.pop("hyper_parameters"))


def damage_wrong_shapes(path: Path) -> None:
    def edit(checkpoint):
        key = next(k for k in checkpoint["state_dict"] if k.endswith("embed_tokens.weight"))
        checkpoint["state_dict"][key] = torch.zeros(3, 3)
    rewrite_checkpoint(path, edit)


@pytest.mark.parametrize("damage, message", [
    (damage_truncate, "damaged or truncated"),
    (damage_empty, "damaged or truncated"),
    (damage_noise, "damaged or truncated"),
    (damage_pickled_objects, "beyond plain data"),
    (damage_not_a_dict, "not a lab.train checkpoint"),
    (damage_no_hparams, "not a lab.train checkpoint"),
    (damage_wrong_shapes, "does not fit"),
])
def test_damaged_checkpoint_is_one_line_without_unsafe_advice(tiny_run, tmp_path, damage, message):
    run = copy_run(tiny_run, tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    damage(ckpt)
    with pytest.raises(LabError, match=message) as caught:
        load_model(ckpt)
    text = str(caught.value)
    assert "\n" not in text and "weights_only" not in text and str(ckpt) in text


# -- HF folders --------------------------------------------------------------------------------------------------


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="bert"), "not one the lab builds"),
    (lambda c: c.update(auto_map={"AutoModelForCausalLM": "evil.Model"}), "auto_map"),
    (lambda c: c.update(quantization_config={"quant_method": "bitsandbytes"}), "torchao variants"),
    (lambda c: c.update(quantization_config={"quant_method": "torchao", "quant_type": {
        "default": {"_type": "SomeOtherConfig", "_data": {}}}}), "SomeOtherConfig"),
    (lambda c: c.update(quantization_config={"quant_method": "torchao", "quant_type": "int4_weight_only"}),
     "names nothing"),
    (lambda c: c.update(quantization_config=["torchao"]), "torchao variants"),
    (lambda c: c.update(hidden_size=10**8), "out of range"),
    (lambda c: c.update(num_attention_heads=0), "out of range"),
    (lambda c: c.pop("model_type"), "model_type None"),
    (lambda c: c.update(rope_parameters={"_target_": "os.system"}), "not an allowed field"),
])
def test_hf_folder_config_is_checked_before_transformers_reads_it(tiny_run, tmp_path, edit, message):
    run = copy_run(tiny_run, tmp_path)
    edit_json(run / "hf" / "config.json", edit)
    with pytest.raises(LabError, match=message):
        load_model(run / "hf")


def plant_remote_code(folder: Path, marker: Path) -> None:
    """An HF folder shipping its own model code (auto_map), which would leave a marker if anything ran it."""
    write_sentinel_module(folder, "modeling_evil", marker)
    edit_json(folder / "config.json", lambda c: c.update(auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                                   "AutoModelForCausalLM": "modeling_evil.Evil"}))


def test_model_folder_code_never_runs(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    marker = tmp_path / "ran.txt"
    plant_remote_code(run / "hf", marker)
    with pytest.raises(LabError, match="auto_map"):
        load_model(run / "hf")
    assert not marker.exists() and "modeling_evil" not in sys.modules


@pytest.mark.parametrize("damage, message", [
    (lambda hf, marker: plant_remote_code(hf, marker), "auto_map"),
    (lambda hf, marker: edit_json(hf / "config.json", lambda c: c.update(model_type="gpt2")), "not one the lab builds"),
    (lambda hf, marker: damage_truncate(hf / "model.safetensors"), "weights cannot be loaded"),
])
def test_init_from_folder_is_checked_like_a_model_path(tiny_run, tmp_path, damage, message):
    from lab.models.build import build_config
    from lab.models.arch import build_model
    from lab.training.module import load_initial_weights

    run = copy_run(tiny_run, tmp_path)
    marker = tmp_path / "ran.txt"
    damage(run / "hf", marker)
    node, size = tiny_config("llama_gqa", 320)
    with pytest.raises(LabError, match=message) as caught:
        load_initial_weights(build_model(build_config(node, size)), str(run / "hf"))
    assert str(run / "hf") in str(caught.value) and not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2, 3]", "holds a list"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
])
def test_hf_folder_with_damaged_config_json(tiny_run, tmp_path, content, message):
    run = copy_run(tiny_run, tmp_path)
    (run / "hf" / "config.json").write_bytes(content)
    with pytest.raises(LabError, match=message):
        check_hf_folder(run / "hf")


def test_hf_folder_with_truncated_weights(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    damage_truncate(run / "hf" / "model.safetensors")
    with pytest.raises(LabError, match="damaged or do not match"):
        load_model(run / "hf")


@pytest.mark.parametrize("file, edit, message", [
    ("tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": ["evil.Tok", None]}), "auto_map"),
    ("tokenizer_config.json", lambda c: c.update(tokenizer_class="EvilTokenizer"), "EvilTokenizer"),
])
def test_tokenizer_folder_from_elsewhere_is_checked(tiny_run, tmp_path, file, edit, message):
    run = copy_run(tiny_run, tmp_path)
    edit_json(run / "hf" / file, edit)
    with pytest.raises(LabError, match=message):
        load_tokenizer(resolve_source(run / "hf"))


@pytest.mark.parametrize("content, message", [
    (None, "tokenizer.json is missing"),  # tokenizer_config.json alone: transformers would convert a slow one
    (b"", "not valid JSON"),
    (b'{"version": "1.0", "model": {"type": "BPE", "vo', "not valid JSON"),
    (b"[1, 2]", "not an object"),
    (b'{"model": {"type": "BPE", "vocab": 5}}', "cannot be loaded"),
])
def test_damaged_tokenizer_json_is_one_line(tiny_run, tmp_path, content, message):
    run = copy_run(tiny_run, tmp_path)
    tokenizer_json = run / "hf" / "tokenizer.json"
    if content is None:
        tokenizer_json.unlink()
    else:
        tokenizer_json.write_bytes(content)
    with pytest.raises(LabError, match=message) as caught:
        load_tokenizer(resolve_source(run / "hf"))
    assert "\n" not in str(caught.value) and str(run / "hf") in str(caught.value)


@pytest.mark.parametrize("content", ['{"variant": ["x"]}', "[]", "{bad", '{"variant": "int8wo", "run_dir": 5}'])
def test_damaged_variant_file_is_one_line(tiny_run, tmp_path, content):
    run = copy_run(tiny_run, tmp_path)
    (run / "hf" / "lab_variant.json").write_text(content)
    with pytest.raises(LabError, match="lab_variant.json|not valid JSON"):
        resolve_source(run / "hf")


def test_cli_gives_one_line_for_a_crafted_checkpoint_and_a_damaged_folder(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    rewrite_checkpoint(run / "checkpoints" / "last.ckpt",
                       lambda c: c["hyper_parameters"]["arch"].update(_target_="torch.save"))
    damage_truncate(run / "hf" / "model.safetensors")
    for model_path in (run / "checkpoints" / "last.ckpt", run / "hf"):
        result = subprocess.run([sys.executable, "-m", "lab.generate", f"model_path={model_path}", "max_new_tokens=2",
                                 f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True, text=True,
                                cwd=PROJECT_ROOT, timeout=120)
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(model_path) in errors[0]
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["lab.quantize", "lab.evaluate"])
def test_quantize_and_evaluate_refuse_a_crafted_checkpoint_in_one_line(tiny_run, tmp_path, command):
    run = copy_run(tiny_run, tmp_path)
    marker = tmp_path / "written.pt"
    rewrite_checkpoint(run / "checkpoints" / "last.ckpt", lambda c: c["hyper_parameters"].update(
        config_overrides={"rope_parameters": {"_target_": "torch.save", "obj": [1], "f": str(marker)}}))
    result = subprocess.run([sys.executable, "-m", command, f"model_path={run / 'checkpoints' / 'last.ckpt'}",
                             "device=cpu", f"output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                            capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rope_parameters" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()
