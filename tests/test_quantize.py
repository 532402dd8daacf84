"""lab.quantize on tiny models of every arch: variants, what they quantize, saving and loading back, errors.

The module also holds the fixtures test_evaluate.py and test_generate.py reuse: a byte-level BPE
trained on a few Romanian sentences, a prepared-data folder in the CONTRACTS.md layout, and a
lab.train-like run folder per arch (hf/ export, checkpoints/last.ckpt, config.yaml).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lab import CONF_DIR, PROJECT_ROOT, LabError
from lab.models.build import build_config
from lab.models.arch import build_model
from lab.models.loading import (_computes_linear, load_model, load_tokenizer, resolve_source, tensor_bytes,
                                use_linear_forward)
from lab.config.compose import settings_for
from lab.models.quant_formats import VARIANTS, resolve_variants
from lab.quantization.quantizer import embedding_state, layers_to_keep_float, quantize, quantized_layers
from tests.conftest import ARCHS
from lab.quantization.settings import QuantizeSettings

SEQ_LEN = 32          # prepared blocks in the fixture
MAX_POSITIONS = 64    # the tiny models' context
RO_TEXT = [
    "Dimineața, piața din centrul orașului se umple de țărani care vând brânză, ouă și legume proaspete.",
    "Profesoara le-a cerut elevilor să citească o poveste și să scrie un rezumat de o pagină.",
    "Trenul de noapte spre Constanța a plecat cu o întârziere de douăzeci de minute.",
    "Pe dealurile din jurul satului, viile se îngălbenesc toamna, iar culesul strugurilor ține o săptămână.",
    "Biblioteca județeană a primit o donație de cărți vechi, unele tipărite acum mai bine de un secol.",
    "Medicii recomandă mișcare zilnică, somn suficient și o alimentație cu multe fructe.",
    "Echipa de fotbal a orașului a câștigat meciul de sâmbătă după o repriză a doua foarte bună.",
    "Bunica păstrează rețeta de cozonac într-un caiet cu coperți albastre, scris de mână.",
    "Era o seară liniștită de iarnă, iar zăpada acoperise drumul care ducea spre moară.",
    "Bătrânul pescar își repara plasa pe malul râului și privea cum se lasă ceața peste apă.",
    "În casa cea veche de lângă biserică locuia o familie cu trei copii și un câine credincios.",
    "Tânărul a plecat la oraș să învețe meserie, dar în fiecare vară se întorcea acasă la părinți.",
    "Drumul prin pădure era lung și întunecat, iar călătorul se oprea des să asculte foșnetul frunzelor.",
    "Când s-a întors primăvara, livada era plină de flori, iar albinele zumzăiau printre crengi.",
]


# -- fixtures shared with test_evaluate.py and test_generate.py -----------------------------------------------------


def make_tokenizer(folder: Path, vocab_size: int = 320):
    """A byte-level BPE (as lab.prepare trains) with EOS id 0 and PAD id 1, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(RO_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(folder)
    return fast


def make_prepared(root: Path, tokenizer) -> Path:
    """manifest.json + tokenizer/ + <source>/val.bin (docs joined by EOS, cut into SEQ_LEN blocks)."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(root / "tokenizer")
    sources = {}
    for name, docs in {"web": RO_TEXT[:8], "books": RO_TEXT[8:]}.items():
        ids: list[int] = []
        for doc in docs:
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        blocks = len(ids) // SEQ_LEN
        array = np.array(ids[: blocks * SEQ_LEN], dtype=np.uint16)
        (root / name).mkdir(exist_ok=True)
        array.tofile(root / name / "val.bin")
        split = {"file": f"{name}/val.bin", "docs": len(docs), "text_bytes": sum(len(d.encode()) for d in docs),
                 "tokens": len(ids), "blocks": blocks, "tail_tokens": len(ids) - blocks * SEQ_LEN,
                 "sha256": hashlib.sha256(array.tobytes()).hexdigest()}
        sources[name] = {"docs_in": len(docs), "splits": {"val": split}}
    manifest = {"version": 1, "seq_len": SEQ_LEN, "dtype": "uint16", "vocab_size": len(tokenizer),
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                "tokenizer_sha256": "t" * 64, "data_sha256": "d" * 64, "sources": sources}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def tiny_config(arch: str, vocab_size: int):
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "arch" / f"{arch}.yaml"), resolve=False)
    node["vocab_size"] = vocab_size
    if "max_position_embeddings" in node:
        node["max_position_embeddings"] = MAX_POSITIONS
    size = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "size" / "tiny.yaml"))
    return node, size


def make_run(root: Path, arch: str, tokenizer, prepared: Path, seed: int = 0) -> Path:
    """A lab.train-like run folder: hf/ (export + tokenizer), checkpoints/last.ckpt, config.yaml."""
    node, size = tiny_config(arch, len(tokenizer))
    overrides = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                 "bos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(seed)
    model = build_model(build_config(node, size, **overrides)).eval()
    run_dir = root / f"{arch}-tiny"
    model.save_pretrained(run_dir / "hf")
    tokenizer.save_pretrained(run_dir / "hf")
    (run_dir / "checkpoints").mkdir(parents=True)
    # the parts of a Lightning checkpoint of lab.training.module.CausalLMModule that lab.quantize reads
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"arch": node, "size": size, "config_overrides": overrides},
                "pytorch-lightning_version": "2.6.6", "global_step": 0}, run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml({"experiment_name": "test", "arch_name": arch,
                                                            "data": {"prepared_dir": str(prepared)}}))
    (run_dir / "mlflow_run_id").write_text("")  # filled in by tests that log a training run
    return run_dir


def register_training_run(run_dir: Path, arch: str, experiment: str = "test") -> str:
    """A finished MLflow training run (in the test's store) for run_dir, as lab.train would leave it."""
    from mlflow.tracking import MlflowClient

    from lab.runs.tracking import get_or_create_experiment, tracking_uri

    client = MlflowClient(tracking_uri())
    run = client.create_run(get_or_create_experiment(experiment), run_name=f"{arch}-tiny",
                            tags={"arch": arch, "size": "tiny", "seed": "0"})
    client.log_metric(run.info.run_id, "val/loss", 5.0)
    client.set_terminated(run.info.run_id, "FINISHED")
    (run_dir / RUN_ID).write_text(run.info.run_id)
    return run.info.run_id


RUN_ID = "mlflow_run_id"


def make_runs(root: Path, archs) -> dict[str, Path]:
    """{arch: lab.train-like run folder} (hf/ export, checkpoint, config.yaml), one shared tokenizer and data."""
    tokenizer = make_tokenizer(root / "tokenizer")
    prepared = make_prepared(root / "prepared", tokenizer)
    return {arch: make_run(root, arch, tokenizer, prepared, seed=index) for index, arch in enumerate(archs)}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """{arch: run folder} for the five archs."""
    return make_runs(tmp_path_factory.mktemp("runs"), ARCHS)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


PROBE = torch.randint(2, 300, (1, 24), generator=torch.Generator().manual_seed(1))   # [1, 24]


# -- tests ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_every_arch_saves_variants_that_load_back(tiny_runs, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tiny_runs[arch]
    index = quantize(settings_for(QuantizeSettings, model_path=str(run_dir / "hf"), variants="auto", device="cpu",
                                  output_dir=str(tmp_path / "q"), variant_options={"intx4wo": {"group_size": 16}}))
    assert index["reference"] == "fp32" and index["train_run_id"] is None  # empty mlflow_run_id: no link
    assert list(index["variants"]) == ["fp32", "int8wo", "int8dq", "intx4wo"]   # auto on CPU
    # each variant records its options: one asked for with others is made again (lab.study, lab.bench_eval)
    from lab.quantization.quantizer import made_with

    source = resolve_source(run_dir / "hf")
    assert index["variants"]["intx4wo"]["options"] == {"group_size": 16}
    assert made_with(index, source, "intx4wo", {"group_size": 16})
    assert not made_with(index, source, "intx4wo", {"group_size": 32})
    assert not made_with(index, resolve_source(tiny_runs["llama_mha" if arch != "llama_mha" else "mamba2"] / "hf"),
                         "intx4wo", {"group_size": 16})   # another model's index
    older = {**index, "variants": {**index["variants"], "int8wo": {
        k: v for k, v in index["variants"]["int8wo"].items() if k != "options"}}}
    assert not made_with(older, source, "int8wo", {"quantize_embedding": True})   # from before options were kept
    reference = index["variants"]["fp32"]
    float_model, _ = load_model(tmp_path / "q" / "fp32")
    expected = logits_of(float_model, PROBE)
    for name in ("int8wo", "int8dq", "intx4wo"):
        item = index["variants"][name]
        folder = Path(item["path"])
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        assert item["disk_bytes"] < reference["disk_bytes"] and item["weight_bytes"] < reference["weight_bytes"]
        assert item["reload_max_abs_diff"] == 0.0
        # int8wo (by default) quantizes the tied embedding / head once; the others keep both float
        shared = name == "int8wo"
        flags = {"embedding_quantized": shared, "lm_head_quantized": shared, "embedding_tied": True}
        assert {key: item[key] for key in flags} == flags
        meta = json.loads((folder / "lab_variant.json").read_text())
        assert {key: meta[key] for key in flags} == flags
        head_name = next(n for n, m in float_model.named_modules() if m is float_model.get_output_embeddings())
        assert (head_name in item["kept_float"]) is not shared
        # plain transformers reads the folder (quantization_config + torchao safetensors)
        plain = AutoModelForCausalLM.from_pretrained(folder)
        assert "quantization_config" in plain.config.to_dict()
        use_linear_forward(plain)
        layers = quantized_layers(plain)
        # a shared weight counts once per module using it (embedding and head)
        assert len(layers) == item["quantized_layers"] > 0
        # the tied pair stays one tensor; float unless shared; norms and (Mamba2) conv1d / SSM parameters float
        assert plain.get_input_embeddings().weight is plain.get_output_embeddings().weight
        assert embedding_state(plain) == flags
        if not shared:
            assert type(plain.get_input_embeddings().weight) is nn.Parameter
        for module_name, module in plain.named_modules():
            if isinstance(module, nn.Conv1d):
                assert type(module.weight) is nn.Parameter, module_name
        got = logits_of(plain, PROBE)
        # plain transformers' F.embedding (whole table dequantized) and load_model's row gather agree exactly
        assert torch.equal(got, logits_of(load_model(folder)[0], PROBE))
        # relative error of the logits (an unrelated model would be ~1.4); random-init Mamba2 is the most
        # sensitive (its in_proj also drives the gates and time steps): int8 weight-only 2-4% (+0.3-0.6
        # points with the embedding / head in int8), with dynamic int8 activations up to ~8%, int4 34%
        error = ((got - expected).norm() / expected.norm()).item()
        assert error < {"int8wo": 0.06, "int8dq": 0.15, "intx4wo": 0.5}[name], (name, error)


def test_shared_int8_embedding_is_stored_once_and_can_be_turned_off(tiny_runs, tmp_path):
    from safetensors import safe_open

    hf = tiny_runs["falcon_mqa"] / "hf"
    shared = quantize(settings_for(QuantizeSettings, model_path=str(hf), variants=["int8wo"], device="cpu",
                                   output_dir=str(tmp_path / "on")))["variants"]
    apart = quantize(settings_for(QuantizeSettings, model_path=str(hf), variants=["int8wo"], device="cpu",
                                  output_dir=str(tmp_path / "off"),
                                  variant_options={"int8wo": {"quantize_embedding": False}}))["variants"]
    assert shared["int8wo"]["embedding_quantized"] and not apart["int8wo"]["embedding_quantized"]
    assert apart["int8wo"]["kept_float"] == {
        "lm_head": "LM head (tied to the input embedding; quantize_embedding=false)"}
    assert shared["int8wo"]["kept_float"] == {} and shared["fp32"]["embedding_quantized"] is False
    # one int8 copy, under the embedding's name: the fp32 [vocab, d] table became int8 + a float32 scale
    # and an int8 zero point per vocabulary row
    model, _ = load_model(shared["int8wo"]["path"])
    vocab, width = model.get_input_embeddings().weight.shape
    saved = apart["int8wo"]["weight_bytes"] - shared["int8wo"]["weight_bytes"]
    assert saved == vocab * width * 4 - (vocab * width + vocab * 4 + vocab)
    with safe_open(Path(shared["int8wo"]["path"]) / "model.safetensors", "pt") as f:
        keys = [k for k in f.keys() if "word_embeddings" in k or "lm_head" in k]
    assert sorted(keys) == [f"transformer.word_embeddings._weight_{s}" for s in ("qdata", "scale", "zero_point")]
    assert shared["int8wo"]["disk_bytes"] < apart["int8wo"]["disk_bytes"] - vocab * width * 2
    # the lookup gathers rows: the same numbers as F.embedding on the whole (dequantized) table
    embedding = model.get_input_embeddings()
    ids = torch.tensor([[0, 5, vocab - 1], [3, 3, 1]])                      # [2, 3]
    torch.testing.assert_close(embedding(ids), F.embedding(ids, embedding.weight), rtol=0, atol=0)


def test_embedding_quantization_only_for_int8_variants(tiny_runs):
    model, _ = load_model(tiny_runs["llama_gqa"] / "hf")
    from lab.quantization.quantizer import quantize_model

    with pytest.raises(LabError, match=r"intx4wo: quantize_embedding=true is supported for int8wo, int8dq only"):
        quantize_model(model, VARIANTS["intx4wo"], {"group_size": 32, "quantize_embedding": True}, torch.device("cpu"))
    with pytest.raises(LabError, match=r"intx4wo: quantize_embedding=true is supported for int8wo, int8dq only"):
        settings_for(QuantizeSettings, ["+variant_options.intx4wo.quantize_embedding=true"], model_path="x")
    assert layers_to_keep_float(model, None, quantize_embedding=True) == {}


def test_which_layers_are_quantized(tiny_runs, tmp_path):
    index = quantize(settings_for(QuantizeSettings, model_path=str(tiny_runs["mamba2"] / "hf"),
                                  variants=["int8wo", "intx4wo"], device="cpu", output_dir=str(tmp_path / "m")))
    model, _ = load_model(index["variants"]["int8wo"]["path"])
    layers = quantized_layers(model)
    n_blocks = model.config.num_hidden_layers
    assert sorted(layers) == sorted([f"backbone.layers.{i}.mixer.{p}" for i in range(n_blocks)
                                     for p in ("in_proj", "out_proj")] + ["backbone.embeddings", "lm_head"])
    mixer = model.backbone.layers[0].mixer
    for name in ("A_log", "D", "dt_bias"):
        assert type(getattr(mixer, name)) is nn.Parameter
    # group size 32: in_proj (in_features 64) and out_proj (128) both divide; nothing kept but the head
    assert index["variants"]["intx4wo"]["quantized_layers"] == 2 * n_blocks

    # a llama MLP of width 176 does not split into groups of 32: down_proj stays float, with the reason
    llama, _ = load_model(tiny_runs["llama_gqa"] / "hf")
    keep = layers_to_keep_float(llama, 32, quantize_embedding=False)
    assert keep["model.layers.0.mlp.down_proj"] == "in_features=176 is not a multiple of group_size=32"
    assert "model.layers.0.mlp.up_proj" not in keep


def test_checkpoint_and_export_give_the_same_model(tiny_runs, tmp_path):
    run_dir = tiny_runs["llama_gqa"]
    from_ckpt, source = load_model(run_dir / "checkpoints" / "last.ckpt")
    from_hf, _ = load_model(run_dir / "hf")
    assert source.kind == "ckpt" and source.run_dir == run_dir
    torch.testing.assert_close(logits_of(from_ckpt, PROBE), logits_of(from_hf, PROBE))
    index = quantize(settings_for(QuantizeSettings, model_path=str(run_dir / "checkpoints" / "last.ckpt"),
                                  variants=["int8wo"], device="cpu", output_dir=str(tmp_path / "c")))
    assert index["source_kind"] == "ckpt" and set(index["variants"]) == {"fp32", "int8wo"}
    # the tokenizer came from the run (hf/ beside the checkpoint)
    assert (tmp_path / "c" / "int8wo" / "tokenizer.json").is_file()
    # a second call adds to the index instead of replacing it
    quantize(settings_for(QuantizeSettings, model_path=str(run_dir / "checkpoints" / "last.ckpt"), variants=["int8dq"],
                          device="cpu", output_dir=str(tmp_path / "c")))
    assert set(json.loads((tmp_path / "c" / "quantize.json").read_text())["variants"]) == {"fp32", "int8wo", "int8dq"}


def test_default_output_is_inside_the_run_and_variant_folders_know_their_run(tiny_runs):
    run_dir = tiny_runs["falcon_mqa"]
    index = quantize(settings_for(QuantizeSettings, model_path=str(run_dir / "hf"), variants=["int8wo"], device="cpu"))
    assert Path(index["variants"]["int8wo"]["path"]) == run_dir / "quantized" / "hf" / "int8wo"
    source = resolve_source(run_dir / "quantized" / "hf" / "int8wo")
    assert source.variant == "int8wo" and source.run_dir == run_dir
    assert load_tokenizer(source).eos_token_id == 0


def test_unsupported_and_unknown_variants_name_what_is_supported():
    cpu = torch.device("cpu")
    assert [v.name for v in resolve_variants("auto", cpu)] == ["int8wo", "int8dq", "intx4wo"]
    with pytest.raises(LabError, match=r"int4wo .* runs on cuda only.*Supported here: int8wo, int8dq, intx4wo"):
        resolve_variants(["int4wo"], cpu)
    with pytest.raises(LabError, match=r"float8dq .* runs on cuda only"):
        resolve_variants(["int8wo", "float8dq"], cpu)
    with pytest.raises(LabError, match=r"unknown variant 'int3'; known variants: int8wo, int8dq, intx4wo, int4wo"):
        resolve_variants(["int3"], cpu)
    assert VARIANTS["float8dq"].min_capability == (8, 9)


def test_missing_or_wrong_model_paths(tmp_path, tiny_runs):
    with pytest.raises(LabError, match="model_path is required"):
        resolve_source(None)
    with pytest.raises(LabError, match="does not exist"):
        resolve_source(tmp_path / "nope.ckpt")
    with pytest.raises(LabError, match=r"no config.json.*did you mean .*/hf\?"):
        resolve_source(tiny_runs["llama_gqa"])
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(LabError, match="not a .ckpt"):
        resolve_source(tmp_path / "weights.bin")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(LabError, match="not a lab.train checkpoint"):
        load_model(tmp_path / "other.ckpt")
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(LabError, match="cannot read checkpoint"):
        load_model(tmp_path / "broken.ckpt")


def test_cli_prints_the_error_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lab.quantize", f"model_path={tmp_path / 'missing'}",
                             f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True, text=True,
                            cwd=PROJECT_ROOT, timeout=120)
    assert result.returncode != 0
    assert "error: model_path=" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


class _TransposedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + (self.bias if self.bias is not None else 0)


class _ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * F.linear(x, self.weight, self.bias)


def test_linear_subclasses_are_routed_through_f_linear_only_when_equivalent():
    assert _computes_linear(_TransposedLinear) and not _computes_linear(_ScaledLinear)
    model = nn.Sequential(_TransposedLinear(8, 8), _ScaledLinear(8, 8), nn.Linear(8, 8))
    x = torch.randn(2, 8)
    before = model(x)
    keep = use_linear_forward(model)
    assert keep == {"1": "_ScaledLinear.forward is not F.linear"}
    torch.testing.assert_close(model(x), before)  # same numbers through F.linear


def test_tensor_bytes_counts_quantized_storage():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = nn.Sequential(nn.Linear(64, 32, bias=False))
    assert tensor_bytes(layer[0].weight) == 64 * 32 * 4
    quantize_(layer, Int8WeightOnlyConfig())
    # int8 values + per output row a float32 scale and an int8 zero point
    inner = layer[0].weight.__tensor_flatten__()[0]
    assert {"qdata", "scale"} <= set(inner)
    assert tensor_bytes(layer[0].weight) == 64 * 32 + 32 * 4 + 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_variants_quantize_and_load_back(tiny_runs, tmp_path):
    from lab.models.quant_formats import supported_variants

    device = torch.device("cuda")
    wanted = [v for v in ("int8wo", "int8dq", "int4wo", "float8dq") if v in supported_variants(device)]
    assert "int4wo" in wanted
    index = quantize(settings_for(QuantizeSettings, model_path=str(tiny_runs["llama_gqa"] / "hf"), variants=wanted,
                                  device="cuda", output_dir=str(tmp_path / "g"),
                                  variant_options={"int4wo": {"group_size": 32}}))
    assert index["reference"] == "bf16"
    reference, _ = load_model(tmp_path / "g" / "bf16", device)
    expected = logits_of(reference, PROBE.to(device))
    for name in wanted:
        assert index["variants"][name]["reload_max_abs_diff"] <= 1e-3
        model, _ = load_model(index["variants"][name]["path"], device)
        got = logits_of(model, PROBE.to(device))
        assert ((got - expected).norm() / expected.norm()).item() < 0.5, name
