"""lm-eval from the lab: the lab's multiple-choice scorer agrees with lm-eval item by item, lab.evaluate runs
lm_eval_tasks on the same model, and task folders, names and options that are wrong (or carry code) are refused."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lab import PROJECT_ROOT, LabError
from lab.config.compose import settings_for
from lab.evaluation.lm_eval_tasks import (check_lm_eval_tasks, flat_metrics, import_lm_eval, lm_eval_metrics,
                                          read_task_dirs, run_lm_eval, task_names)
from lab.models.build import build_config
from lab.models.arch import build_model
from lab.evaluation.tasks import MCItem, choice_logprobs, continuation_ids, item_logprobs, load_task, score_task
from tests.test_quantize import make_tokenizer, tiny_config
from lab.evaluation.settings import EvaluateSettings

TASK_DIR = PROJECT_ROOT / "data" / "sample" / "tasks" / "lm_eval"
EDGES = TASK_DIR / "ro_mc_edges.jsonl"
SAMPLE = PROJECT_ROOT / "data" / "sample" / "tasks" / "ro_mc_sample.jsonl"
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason='lm-eval is not installed (pip install "lm-eval[hf]")')


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def lm_eval_options(**values):
    """conf/evaluate.yaml's `lm_eval` node with `values` set, checked."""
    return settings_for(EvaluateSettings, model_path="unused", lm_eval=values).lm_eval


def random_model(arch: str, tokenizer) -> nn.Module:
    """A tiny model of `arch` (conf/arch + conf/size/tiny, 64 positions) with large random weights: its
    log-likelihoods differ from token to token, so scoring the wrong tokens or positions shows."""
    node, size = tiny_config(arch, len(tokenizer))
    torch.manual_seed(0)
    config = build_config(node, size, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.eos_token_id, initializer_range=0.3)
    return build_model(config).eval()


# -- the lab's scorer is lm-eval's, token for token ----------------------------------------------------------------


@needs_lm_eval
@pytest.mark.parametrize("arch, window, names", [
    ("llama_gqa", 64, ["ro_mc_edges", "ro_mc_sample"]),
    ("llama_gqa", 24, ["ro_mc_edges", "ro_mc_sample"]),
    ("mamba2", 24, ["ro_mc_edges"]),           # no positions: the window is the lab's choice (reference SSM: slow)
])
def test_lab_scorer_agrees_with_lm_eval_item_by_item(tokenizer, arch, window, names):
    model = random_model(arch, tokenizer)
    edges, sample = load_task(EDGES), load_task(SAMPLE)
    # the sample holds the cases where a naive scorer parts from lm-eval's
    assert sum(item.context != item.context.rstrip() for item in edges) >= 3
    assert sum(len(continuation_ids(tokenizer, i.context, " " + i.choices[0])[0]) > 64 for i in edges) >= 2

    result = run_lm_eval(model, tokenizer, names, lm_eval_options(task_dirs=[str(TASK_DIR)]), max_length=window,
                         batch_size=8, log_samples=True)
    for name, items in [(n, {"ro_mc_edges": edges, "ro_mc_sample": sample}[n]) for n in names]:
        samples = sorted(result["samples"][name], key=lambda s: s["doc_id"])
        assert [s["doc"]["id"] for s in samples] == [i.id for i in items]
        assert [[a[1] for a in s["arguments"]] for s in samples] == [[" " + c for c in i.choices] for i in items]
        theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        ours = item_logprobs(model, tokenizer, items, " ", max_length=window, batch_size=5)
        for item, mine, lm_evals in zip(items, ours, theirs):
            assert mine == pytest.approx(lm_evals, abs=1e-4), item.id
        scored = score_task(model, tokenizer, items, name, max_length=window)
        metrics = flat_metrics(result["results"])
        assert metrics[f"lm_eval/{name}/acc"] == pytest.approx(scored.acc, abs=1e-12)
        assert metrics[f"lm_eval/{name}/acc_norm"] == pytest.approx(scored.acc_norm, abs=1e-12)
        assert metrics[f"lm_eval/{name}/n"] == len(items)


class _CharTokenizer:
    """One token per character (its code point), so a test controls tokenisation exactly."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}


class _RecordingLM(nn.Module):
    """Uniform logits over 128 ids; keeps the inputs it was given."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.inputs: list[list[int]] = []

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        self.inputs += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 128))


def test_trailing_whitespace_of_the_context_moves_into_the_choice():
    tok = _CharTokenizer()
    assert continuation_ids(tok, "ab \n", " c") == ([97, 98], [32, 10, 32, 99])
    assert continuation_ids(tok, "ab", " c") == ([97, 98], [32, 99])
    with pytest.raises(LabError, match="no tokens once its trailing whitespace"):
        continuation_ids(tok, "  ", "c")


def test_long_inputs_keep_the_last_window_plus_one_tokens():
    model = _RecordingLM()
    context, continuation = list(range(10, 30)), [40, 41, 42]
    (score,) = choice_logprobs(model, [(context, continuation)], max_length=8)
    whole = context + continuation
    assert model.inputs == [whole[-9:-1]]     # 8 inputs: 5 of context, then all but the last of the choice
    assert score == pytest.approx(-3 * torch.log(torch.tensor(128.0)).item())
    # a short pair is read whole; a choice longer than the window cannot be scored
    model.inputs.clear()
    choice_logprobs(model, [([1, 2], [3])], max_length=8)
    assert model.inputs == [[1, 2]]
    with pytest.raises(LabError, match="continuation of 9 tokens"):
        choice_logprobs(model, [([1], list(range(9)))], max_length=8)
    with pytest.raises(LabError, match="choice 1 is 10 tokens long"):
        item_logprobs(model, _CharTokenizer(), [MCItem("abc", ("d", "efghijklm"), 0, "x")], max_length=8)


def test_blank_contexts_are_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": " \\n ", "choices": ["x", "y"], "label": 0}\n')
    with pytest.raises(LabError, match=r"t.jsonl:1: `context` must be a string with some non-whitespace"):
        load_task(path)


# -- lab.evaluate runs lm_eval_tasks ----------------------------------------------------------------------------------


@needs_lm_eval
def test_evaluate_logs_lm_eval_metrics_beside_its_own(tokenizer, tmp_path):
    from lab.evaluation.suite import evaluate

    model = random_model("llama_gqa", tokenizer)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    settings = settings_for(EvaluateSettings, model_path=str(tmp_path / "hf"), device="cpu",
                            quantized_dir=str(tmp_path / "none"), prepared_dir=None, texts=[], tasks=[str(EDGES)],
                            lm_eval_tasks=["ro_mc_edges"], lm_eval={"task_dirs": [str(TASK_DIR)]},
                            output_dir=str(tmp_path / "out"), efficiency={"enabled": False}, mlflow={"enabled": False})
    (report,) = evaluate(settings)
    metrics = report.metrics
    assert metrics["lm_eval/ro_mc_edges/acc"] == pytest.approx(metrics["task/ro_mc_edges/acc"], abs=1e-12)
    assert metrics["lm_eval/ro_mc_edges/acc_norm"] == pytest.approx(metrics["task/ro_mc_edges/acc_norm"], abs=1e-12)
    assert metrics["lm_eval/ro_mc_edges/acc_stderr"] == pytest.approx(metrics["task/ro_mc_edges/acc_stderr"])
    assert "quant/fp32/lm_eval/ro_mc_edges/acc" in report.prefixed()


def test_no_lm_eval_tasks_needs_no_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)       # as if it were not installed
    options = lm_eval_options()
    assert lm_eval_metrics(nn.Linear(1, 1), None, [], options, 64, 8) == {}
    assert check_lm_eval_tasks([], options) == []


def test_lm_eval_missing_is_one_line_with_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(LabError, match=r'needs lm-eval .*pip install "lm-eval\[hf\]'):
        import_lm_eval()
    with pytest.raises(LabError, match="needs lm-eval"):
        check_lm_eval_tasks(["ro_mc_edges"], lm_eval_options(task_dirs=[str(TASK_DIR)]))


@needs_lm_eval
def test_a_failure_inside_lm_eval_is_one_line(tokenizer, monkeypatch):
    from lm_eval import evaluator

    def fail(**kwargs):
        raise ConnectionError("could not reach the Hub\nsecond line")

    monkeypatch.setattr(evaluator, "simple_evaluate", fail)   # e.g. a built-in task's dataset while offline
    one_line = r"^lm-eval could not run ro_mc_edges \(ConnectionError: could not reach the Hub\)$"
    with pytest.raises(LabError, match=one_line):
        run_lm_eval(random_model("llama_gqa", tokenizer), tokenizer, ["ro_mc_edges"],
                    lm_eval_options(task_dirs=[str(TASK_DIR)]), max_length=64, batch_size=8)


# -- names and options ---------------------------------------------------------------------------------------------


@needs_lm_eval
def test_unknown_task_names_are_refused_with_suggestions(tmp_path):
    options = lm_eval_options(task_dirs=[str(TASK_DIR)])
    with pytest.raises(LabError, match=r"no task 'ro_mc_edgez' in the lab's task folders .*did you mean ro_mc_edges"):
        check_lm_eval_tasks(["ro_mc_edgez"], options)
    # lm-eval's own tasks are known by name (its index parses task files, running none)
    names = check_lm_eval_tasks(["belebele_ron_Latn", "ro_mc_sample"], options)
    assert names == ["belebele_ron_Latn", "ro_mc_sample"]


@pytest.mark.parametrize("name", ["/tmp/evil.yaml", "../tasks/x", "tasks/x.yaml", "", 3, None, "-rf"])
def test_task_names_are_names_not_paths(name):
    with pytest.raises(LabError, match="is not a task name"):
        task_names([name])


@pytest.mark.parametrize("options, message", [
    ({"limit": -1}, r"lm_eval.limit=-1 is not allowed: expected an integer >= 1"),
    ({"limit": "all"}, r"lm_eval.limit='all'"),
    ({"num_fewshot": 1.5}, r"lm_eval.num_fewshot=1.5"),
    ({"bootstrap_iters": True}, r"lm_eval.bootstrap_iters=True"),
    ({"task_dir": ["x"]}, r"Key 'task_dir' is not in struct"),
    ({"task_dirs": "data/sample/tasks/lm_eval"}, r"lm_eval.task_dirs='data/sample/tasks/lm_eval' is not allowed: "
                                                 r"expected a list"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(LabError, match=message):
        lm_eval_options(**options)


# -- task folders hold data, never code ------------------------------------------------------------------------------


GOOD_TASK = """\
task: mini
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Întrebare: {{ context }}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def task_folder(tmp_path: Path, text: str = GOOD_TASK, name: str = "mini.yaml") -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    shutil.copy(EDGES, folder / "items.jsonl")
    (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_a_plain_task_folder_is_read_with_absolute_data_files(tmp_path):
    folder = task_folder(tmp_path)
    (task,) = read_task_dirs([folder]).values()
    assert task.name == "mini" and task.path == folder / "mini.yaml"
    assert task.config["dataset_kwargs"] == {"data_files": {"test": [str((folder / "items.jsonl").resolve())]}}
    assert set(read_task_dirs([TASK_DIR])) == {"ro_mc_edges", "ro_mc_sample"}


def _marker_module(folder: Path, marker: Path) -> None:
    # imported, it would leave a marker: the tests check that it never is
    (folder / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef process(docs):\n    return docs\n")


@pytest.mark.parametrize("line, message", [
    ("process_docs: !function utils.process", r"mini.yaml:\d+: YAML tags such as `!function` run Python code"),
    ("doc_to_text: !function utils.process", r"YAML tags such as `!function`"),
    ("x: !!python/object/apply:os.system ['touch marker']", r"YAML tags such as"),
    ("include: other.yaml", r"key 'include' is not accepted in a lab task folder"),
    ("class: utils.Task", r"key 'class' is not accepted"),
    ("process_results: utils.process", r"key 'process_results' is not accepted"),
    ("filter_list: [{name: x, filter: [{function: take_first}]}]", r"key 'filter_list' is not accepted"),
    ("dataset_name: default", r"key 'dataset_name' is not accepted"),
])
def test_code_carrying_task_files_are_refused_and_run_nothing(tmp_path, line, message):
    folder = task_folder(tmp_path, GOOD_TASK + line + "\n")
    marker = tmp_path / "marker"
    _marker_module(folder, marker)
    with pytest.raises(LabError, match=message):
        read_task_dirs([folder])
    with pytest.raises(LabError, match=message):   # also when lab.evaluate checks its settings
        check_lm_eval_tasks(["mini"], lm_eval_options(task_dirs=[str(folder)]))
    assert not marker.exists()


@pytest.mark.parametrize("template", [
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ context|upper }}",
    "{{ context.__class__ }}",
    "{{ _private }}",
    "{% for c in choices %}{{c}}{% endfor %}",
    "{# note #}{{context}}",
    "{{ 'a' ~ 'b' }}",
])
def test_templates_may_only_insert_fields(tmp_path, template):
    text = GOOD_TASK.replace('"Întrebare: {{ context }}"', json.dumps(template))
    with pytest.raises(LabError, match=r"`doc_to_text` may only insert fields"):
        read_task_dirs([task_folder(tmp_path, text)])


@pytest.mark.parametrize("old, new, message", [
    ("dataset_path: json", "dataset_path: some_user/ro_dataset", r"`dataset_path` must be one of"),
    ("dataset_path: json", "dataset_path: [json]", r"`dataset_path` must be one of"),
    ("    test: items.jsonl", "    test: /etc/passwd", r"data file '/etc/passwd' must be a local path relative"),
    ("    test: items.jsonl", "    test: https://example.org/x.jsonl", r"must be a local path relative"),
    ("    test: items.jsonl", "    test: hf://datasets/x/y.jsonl", r"must be a local path relative"),
    ("    test: items.jsonl", "    test: missing.jsonl", r"data file 'missing.jsonl' not found"),
    ("    test: items.jsonl", "    test: 5", r"a data file must be a file name"),
    ("  data_files:", "  trust_remote_code: true\n  data_files:", r"`dataset_kwargs` must hold exactly `data_files`"),
    ("metric_list:\n  - metric: acc", "metric_list:\n  - metric: sacrebleu_from_hub",
     r"metric must be one of lm-eval's built-in"),
    ("metric_list:\n  - metric: acc", "metric_list:\n  - metric: acc\n    aggregation: !!str mean2",
     r"aggregation must be one of"),
    ("metric_list:\n  - metric: acc", "metric_list: []", r"`metric_list` must be a non-empty list"),
    ("output_type: multiple_choice", "output_type: generate_until", r"`output_type` must be one of"),
    ("doc_to_target: label", "doc_to_target: [1, 2]", r"`doc_to_target` must be text"),
    ("task: mini", "task: ../mini", r"`task` must be a task name"),
    ("task: mini", "task: [mini]", r"`task` must be a task name"),
    ("dataset_path: json\n", "", r"`dataset_path` is missing"),
])
def test_bad_task_settings_name_the_file_and_key(tmp_path, old, new, message):
    assert old in GOOD_TASK
    with pytest.raises(LabError, match=message):
        read_task_dirs([task_folder(tmp_path, GOOD_TASK.replace(old, new, 1))])


@pytest.mark.parametrize("text, message", [
    ("task: mini\n  bad indent: [\n", r"mini.yaml:\d+: not valid YAML"),
    ("task: [unclosed\n", r"mini.yaml:\d+: not valid YAML"),
    ("- task: mini\n", r"expected a mapping of task keys"),
    ("", r"expected a mapping of task keys"),
    ("a: &x [1, 1]\nb: [*x, *x]\n", r"mini.yaml:2: YAML aliases are not accepted"),
])
def test_broken_yaml_files_are_one_line(tmp_path, text, message):
    with pytest.raises(LabError, match=message):
        read_task_dirs([task_folder(tmp_path, text)])


def test_damaged_files_and_folders(tmp_path):
    folder = task_folder(tmp_path)
    (folder / "latin1.yaml").write_bytes("task: mîni\n".encode("latin-1"))
    with pytest.raises(LabError, match="latin1.yaml: not UTF-8 text"):
        read_task_dirs([folder])
    (folder / "latin1.yaml").unlink()
    (folder / "huge.yml").write_text("task: x\n" + "#" * 1_000_001)
    with pytest.raises(LabError, match="huge.yml: larger than"):
        read_task_dirs([folder])
    (folder / "huge.yml").write_text(GOOD_TASK)        # a second file with the same task name
    with pytest.raises(LabError, match="task 'mini' is defined twice"):
        read_task_dirs([folder])
    with pytest.raises(LabError, match="is not a folder"):
        read_task_dirs([tmp_path / "missing"])


@needs_lm_eval
def test_a_checked_task_folder_runs_in_lm_eval_from_any_working_directory(tokenizer, tmp_path, monkeypatch):
    folder = task_folder(tmp_path)
    monkeypatch.chdir(tmp_path.parent)           # data files are relative to the task file, not the cwd
    model = random_model("falcon_mqa", tokenizer)
    metrics = lm_eval_metrics(model, tokenizer, ["mini"], lm_eval_options(task_dirs=[str(folder)], limit=4),
                              max_length=64, batch_size=8)
    items = load_task(folder / "items.jsonl")[:4]
    assert metrics["lm_eval/mini/n"] == 4
    ours = [[s] for s in item_logprobs(model, tokenizer,
                                       [MCItem("Întrebare: " + i.context, i.choices, i.label, i.id) for i in items],
                                       max_length=64)]
    assert metrics["lm_eval/mini/acc"] == pytest.approx(
        sum(max(range(len(s[0])), key=s[0].__getitem__) == i.label for s, i in zip(ours, items)) / 4)
