"""The HF export others use (pipeline, transformers 4.x tokenizer, model card, registry) and the generations
logged at each stage end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lab import LabError
from lab.training.export import export_hf, register_export, registry_name, save_tokenizer
from lab.generation.stage_samples import GenerationSpec
from lab.training.model_card import read_card_metadata, write_model_card
from lab.train import train
from tests.conftest import compose_config, tiny_train_overrides

# 3 web steps then 2 books steps (4 blocks of 64 tokens per step)
SHORT_STAGES = ["trainer.max_steps=-1", "train.eval_every_steps=2", "train.val_max_blocks=2",
                "curriculum.stages=[{name:web,sources:[web],tokens:768},{name:books,sources:[books],tokens:512}]"]


def run_train(prepared: Path, run_dir: Path, *overrides: str) -> dict:
    return train(compose_config("train", tiny_train_overrides(prepared, *SHORT_STAGES, *overrides), run_dir=run_dir))


@pytest.fixture(scope="module")
def trained(prepared_sample, tmp_path_factory):
    """One tiny two-stage run with the export registered; its own MLflow store (tests read it explicitly)."""
    run_dir = tmp_path_factory.mktemp("export_run")
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        result = run_train(prepared_sample, run_dir, "arch=llama_gqa", "callbacks.register_model=true",
                           "experiment_name=export_test")
    return {**result, "client": MlflowClient(tracking_uri=uri), "hf": run_dir / "hf", "prepared": prepared_sample}


# -- the export folder -------------------------------------------------------------------------------------------

def test_export_loads_with_the_text_generation_pipeline(trained):
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(trained["hf"]))
    out = generate("Era odată", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert out.startswith("Era odată") and len(out) > len("Era odată")
    assert generate.tokenizer.model_max_length == 64  # the trained window, not transformers' "unlimited"


def test_tokenizer_config_is_one_transformers_4_reads(trained):
    from transformers import AutoTokenizer

    config = json.loads((trained["hf"] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # 5.x writes TokenizersBackend, unknown to 4.x
    assert not {"backend", "auto_map", "is_local", "local_files_only"} & set(config)
    assert config["clean_up_tokenization_spaces"] is False  # 4.x's default (True) would decode other text
    assert config["model_max_length"] == 64
    assert config["eos_token"] == config["bos_token"] == "<|endoftext|>" and config["pad_token"] == "<|pad|>"
    special = json.loads((trained["hf"] / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|endoftext|>" and special["pad_token"] == "<|pad|>"
    ours = AutoTokenizer.from_pretrained(trained["hf"])
    prepared = AutoTokenizer.from_pretrained(trained["prepared"] / "tokenizer")
    text = "Șoseaua spre București, ţară şi ș (s\u0326): 123 🙂"
    assert ours(text)["input_ids"] == prepared(text)["input_ids"]
    assert (ours.eos_token_id, ours.pad_token_id) == (prepared.eos_token_id, prepared.pad_token_id)


@pytest.mark.slow
def test_tokenizer_loads_with_transformers_4(trained, tmp_path):
    """A fresh venv with transformers<5 from the package registry loads the exported tokenizer: same ids."""
    venv = tmp_path / "venv4"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "transformers<5", "tokenizers"],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        pytest.skip(f"cannot install transformers<5 here: {pip.stderr[-300:]}")
    text = "Era odată , în București , o ţară şi o țară ."  # 4.x's space cleanup would drop " ," and " ."
    script = ("import json, sys, transformers; from transformers import AutoTokenizer; "
              "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
              "print(json.dumps([transformers.__version__, type(t).__name__, t.model_max_length, t.eos_token, "
              "t.pad_token, t(sys.argv[2])['input_ids'], t.decode(t(sys.argv[2])['input_ids'])]))")
    old = subprocess.run([str(venv / "bin" / "python"), "-c", script, str(trained["hf"]), text],
                         capture_output=True, text=True, timeout=300)
    assert old.returncode == 0, old.stderr[-2000:]
    version, cls, max_length, eos, pad, ids, decoded = json.loads(old.stdout.strip().splitlines()[-1])
    from transformers import AutoTokenizer

    assert version.startswith("4.") and cls == "PreTrainedTokenizerFast"
    assert (max_length, eos, pad) == (64, "<|endoftext|>", "<|pad|>")
    ours = AutoTokenizer.from_pretrained(trained["hf"])
    assert ids == ours(text)["input_ids"] and decoded == ours.decode(ids)
    assert " ," in decoded and decoded.endswith(" .")  # the tokenizer folds ş to ș, but keeps the spacing


# -- the model card ----------------------------------------------------------------------------------------------

def test_card_holds_the_runs_numbers(trained):
    run = trained["client"].get_run(trained["run_id"])
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    meta = read_card_metadata(trained["hf"] / "README.md")
    assert meta["language"] == ["ro"] and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and "license" not in meta  # the licence is the user's choice
    assert "llama_gqa" in meta["tags"]
    results = {r["dataset"]["type"]: {m["type"]: m["value"] for m in r["metrics"]}
               for r in meta["model-index"][0]["results"]}
    assert set(results) == {"web", "books"}
    for source, values in results.items():
        for name in ("loss", "bpb", "ppl"):
            assert values[name] == metrics[f"val/{source}/{name}"]  # exactly the run's last value
    text = (trained["hf"] / "README.md").read_text(encoding="utf-8")
    for source in ("web", "books"):
        assert f"| {source} | {metrics[f'val/{source}/loss']:.4f} | {metrics[f'val/{source}/bpb']:.4f} |" in text
        assert f"{int(metrics[f'tokens/{source}']):,}" in text
    assert f"{int(params['model/params_total']):,}" in text and f"{int(params['model/params_non_embedding']):,}" in text
    assert tags["data_sha256"] in text and tags["tokenizer_sha256"] in text and tags["git_sha"] in text
    assert trained["run_id"] in text and f"{5 * 256:,}" in text  # 5 steps of 256 tokens
    assert tags["command"].startswith("python -m lab.train") and "arch=llama_gqa" in tags["command"]
    assert tags["command"] in text and "Intended use" in text and "Limits" in text


def test_each_stage_export_has_its_own_card(trained):
    stages = trained["hf"].parent / "hf_stages"
    assert sorted(p.name for p in stages.iterdir()) == ["0-web", "1-books"]
    web = (stages / "0-web" / "README.md").read_text(encoding="utf-8")
    assert "stage `web` (optimizer step 3)" in web and f"{3 * 256:,}" in web
    assert "| tokens from `web` | 768 |" in web and "| tokens from `books` | 0 |" in web
    assert json.loads((stages / "0-web" / "tokenizer_config.json").read_text())["model_max_length"] == 64


def test_card_without_a_run_says_what_is_unknown(tmp_path):
    path = write_model_card(tmp_path, None, stage="final", step=None, command=None)
    text = path.read_text()
    assert read_card_metadata(path)["language"] == ["ro"] and "No validation was recorded" in text
    assert "(not recorded)" in text
    assert "## Model\n\n| property | value |\n|---|---|\n| architecture |" in text  # real headers, not "| | |"
    assert "## Training\n\n| property | value |\n|---|---|\n| tokens trained | unknown |" in text


def test_card_front_matter_survives_odd_names(tmp_path):
    class Run:  # the attributes of an MLflow run the card reads
        class info:
            run_id, run_name = "abc", 'x: "y"\n---\nz'
        class data:
            tags = {"arch": "a: b\n- c", "command": "python -m lab.train 'tags.note=x: y'"}
            params = {}
            metrics = {"val/web/bpb": 1.5}
    path = write_model_card(tmp_path, Run, stage="final", step=1)
    meta = read_card_metadata(path)
    assert "a: b\n- c" in meta["tags"] and meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 1.5
    # a line break in a value cannot cut the card's tables: the row stays one line
    assert "| architecture | `a: b - c` (None) |" in path.read_text(encoding="utf-8")


# -- the model registry ------------------------------------------------------------------------------------------

def test_final_export_is_registered_as_experiment_dot_arch(trained):
    client = trained["client"]
    versions = client.search_model_versions("name='export_test.llama_gqa'")
    assert {v.run_id for v in versions} == {trained["run_id"]}
    versions = [v for v in versions if str(v.version) == "1"]
    assert versions[0].source == f"runs:/{trained['run_id']}/hf" and versions[0].tags["arch"] == "llama_gqa"
    files = {a.path for a in client.list_artifacts(trained["run_id"], "hf")}
    assert {"hf/config.json", "hf/README.md", "hf/tokenizer_config.json", "hf/model.safetensors"} <= files


def test_registry_names_avoid_what_mlflow_refuses():
    assert registry_name("demo", "llama_gqa") == "demo.llama_gqa"
    assert registry_name("team/ro:v1", "mamba2") == "team-ro-v1.mamba2"  # MLflow: no '/' or ':' in names


def test_a_second_registration_adds_a_version(trained, tmp_path):
    client = trained["client"]
    before = len(client.search_model_versions("name='export_test.llama_gqa'"))
    version = register_export(client, trained["run_id"], "hf")
    assert version.name == "export_test.llama_gqa" and int(version.version) == before + 1


# -- generations ---------------------------------------------------------------------------------------------------

def test_generations_are_logged_per_stage_and_at_the_end(trained):
    client, run_id = trained["client"], trained["run_id"]
    prompts = generations_node()["prompts"]
    files = {a.path for a in client.list_artifacts(run_id, "generations")}
    assert files == {"generations/0-web.md", "generations/1-books.md", "generations/final.md"}
    pages = {name: Path(client.download_artifacts(run_id, name)).read_text(encoding="utf-8") for name in files}
    for name, page in pages.items():
        assert page.count("greedy:") == page.count("sampled:") == len(prompts), name
        assert all(prompt in page for prompt in prompts) and "Generation failed" not in page
    assert "stage `web` (optimizer step 3)" in pages["generations/0-web.md"]
    assert "end of training (optimizer step 5)" in pages["generations/final.md"]
    # the run ends at the books stage's end: the same weights, the same texts
    assert pages["generations/final.md"].split("\n", 1)[1] == pages["generations/1-books.md"].split("\n", 1)[1]


def test_generations_leave_the_training_losses_and_rng_untouched(prepared_sample, tmp_path):
    """The same run with and without generations: bit-identical losses, and the same global RNG state after."""
    def losses_and_rng(name: str, *extra: str) -> tuple[list[float], torch.Tensor]:
        run_train(prepared_sample, tmp_path / name, "arch=llama_gqa", "train.export_hf=false", *extra)
        rows = [json.loads(line) for line in (tmp_path / name / "steps.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows], torch.get_rng_state()

    with_generations = losses_and_rng("with", "callbacks.generations.max_new_tokens=4")
    without = losses_and_rng("without", "callbacks.generations.prompts=[]")
    assert len(with_generations[0]) == 5
    assert with_generations[0] == without[0]  # exact float equality
    assert torch.equal(with_generations[1], without[1])
    assert not (tmp_path / "without" / "generations").exists()


def hf_model_and_tokenizer(folder: Path):
    from transformers import AutoModelForCausalLM

    from lab.models.build import load_tokenizer_folder

    return AutoModelForCausalLM.from_pretrained(folder), load_tokenizer_folder(folder)


def test_generation_restores_mode_and_rng_and_is_seeded(trained):
    model, tokenizer = hf_model_and_tokenizer(trained["hf"])
    spec = generation_spec(prompts=["Era odată"], max_new_tokens=5)
    model.train()
    state = torch.get_rng_state()
    first = spec.run(model, tokenizer)
    assert model.training and torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # another global state: the seeded texts do not depend on it
    assert spec.run(model, tokenizer) == first
    other = generation_spec(prompts=["Era odată"], max_new_tokens=5, seed=7, temperature=5.0).run(model, tokenizer)
    assert other[0]["greedy"] == first[0]["greedy"] and other[0]["sampled"] != first[0]["sampled"]


def test_odd_prompts_generate_and_render(trained):
    model, tokenizer = hf_model_and_tokenizer(trained["hf"])
    long_prompt = "Era odată un împărat care avea trei fete. " * 40  # far beyond the 64-token window
    prompts = ("", "ș ş s\u0326 s\u0327 ț ţ", "```\n## not a heading\n````", long_prompt, "🙂\u200b\ufeffx")
    spec = generation_spec(prompts=list(prompts), max_new_tokens=4)
    results = spec.run(model, tokenizer)
    assert not any("error" in r for r in results)
    assert [r["cut"] for r in results] == [False, False, False, True, False]
    assert all(r["greedy"].startswith(r["fed"]) or r["fed"] == "" for r in results)
    page = spec.markdown(results, "a test")
    for prompt in prompts[:3]:
        assert prompt in page  # kept as written: ş (cedilla) is not folded into ș (comma) in the record
    assert "The prompt was cut to its end" in page
    # the backticks in prompt 3 cannot close the fence around them: it is longer than any run inside
    assert "`````text\n```\n## not a heading\n````\n`````" in page
    page.encode("utf-8")  # MLflow's log_text writes UTF-8


def test_generation_failure_is_recorded_not_raised(trained):
    model, tokenizer = hf_model_and_tokenizer(trained["hf"])
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # sampling from NaN probabilities fails inside generate
    spec = generation_spec(prompts=["Era odată"], max_new_tokens=3, greedy=False)
    results = spec.run(model, tokenizer)
    assert "error" in results[0] and "Generation failed" in spec.markdown(results, "x")


# -- adversarial settings ------------------------------------------------------------------------------------------

def generations_node(**changes):
    node = dict(compose_config("train", ["debug=fast"]).callbacks.generations)
    node["prompts"] = list(node["prompts"])
    return {**node, **changes}


def generation_spec(**changes) -> GenerationSpec:
    """The shipped `callbacks.generations` settings with `changes`, checked as training checks them."""
    return GenerationSpec.from_config(generations_node(**changes))


def test_default_generations_settings_are_valid():
    spec = GenerationSpec.from_config(generations_node())
    assert spec.enabled and spec.max_new_tokens == 24 and len(spec.prompts) >= 3


@pytest.mark.parametrize("changes, message", [
    ({"max_new_tokens": 0}, r"callbacks.generations.max_new_tokens=0 is not allowed: expected an integer >= 1"),
    ({"max_new_tokens": -5}, r"max_new_tokens=-5"),
    ({"max_new_tokens": True}, r"max_new_tokens=True"),
    ({"max_new_tokens": "24"}, r"max_new_tokens='24'"),
    ({"max_new_tokens": 10**9}, r"at most 2048"),
    ({"prompts": "Era odată"}, r"must be a list of strings"),
    ({"prompts": ["ok", 3]}, r"prompts\[1\]=3 is not a string"),
    ({"prompts": [None]}, r"prompts\[0\]=None is not a string"),
    ({"prompts": ["bad \ud800 surrogate"]}, r"prompts\[0\] is not valid Unicode"),
    ({"prompts": ["x" * 5000]}, r"5000 characters"),
    ({"prompts": ["a"] * 100}, r"100 prompts"),
    ({"temperature": 0}, r"temperature=0"),
    ({"top_p": 0}, r"top_p=0"),
    ({"top_p": 1.5}, r"top_p=1.5"),
    ({"seed": -1}, r"seed=-1"),
    ({"greedy": "yes"}, r"greedy='yes'"),
    ({"max_new_token": 5}, r"unknown key\(s\) \['max_new_token'\]"),
])
def test_bad_generation_settings_are_one_clear_error(changes, message):
    with pytest.raises(LabError, match=message):
        GenerationSpec.from_config(generations_node(**changes))


def test_missing_or_malformed_generations_node():
    node = generations_node()
    del node["seed"]
    with pytest.raises(LabError, match=r"callbacks.generations.seed is missing"):
        GenerationSpec.from_config(node)
    with pytest.raises(LabError, match=r"must be a mapping"):
        GenerationSpec.from_config(["Era odată"])
    assert not GenerationSpec.from_config(None).enabled
    assert not GenerationSpec.from_config(generations_node(prompts=[])).enabled
    assert not GenerationSpec.from_config(generations_node(greedy=False, sampled=False)).enabled


def test_bad_generation_setting_stops_training_with_one_line(prepared_sample, tmp_path):
    with pytest.raises(LabError, match=r"callbacks.generations.max_new_tokens=0"):
        run_train(prepared_sample, tmp_path, "callbacks.generations.max_new_tokens=0", "train.export_hf=false")


# -- exporting from damaged or crafted tokenizer folders --------------------------------------------------------------

def test_export_refuses_a_tokenizer_folder_that_ships_code(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    source = tmp_path / "tok"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((trained["prepared"] / "tokenizer" / name).read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": ["x.Y", None]}}))
    model = AutoModelForCausalLM.from_pretrained(trained["hf"])
    with pytest.raises(LabError, match="auto_map"):
        export_hf(model, tmp_path / "out", source)
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    (source / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(LabError, match="not valid JSON"):
        save_tokenizer(source, tmp_path / "out2", 64)
    with pytest.raises(LabError, match="tokenizer folder not found"):
        save_tokenizer(tmp_path / "missing", tmp_path / "out3", 64)


def test_export_without_a_window_keeps_the_tokenizer_unbounded(trained, tmp_path):
    """Mamba2 has no max_position_embeddings: model_max_length comes only from the trained seq_len."""
    save_tokenizer(trained["prepared"] / "tokenizer", tmp_path, None)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] > 10**9


def test_a_sharded_models_stand_in_computes_the_same(trained):
    """Under FSDP rank 0 generates with a copy built from the gathered weights: the same model."""
    from types import SimpleNamespace

    from lab.training.export import model_from_weights

    model, _ = hf_model_and_tokenizer(trained["hf"])
    stand_in = model_from_weights(SimpleNamespace(config=model.config, device=torch.device("cpu")),
                                  {k: v.clone() for k, v in model.state_dict().items()})
    ids = torch.tensor([[0, 5, 17, 300, 42]])
    with torch.no_grad():
        torch.testing.assert_close(stand_in.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
