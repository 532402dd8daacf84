"""lm-eval tasks on the model lab.evaluate already loaded: `lab.evaluate "lm_eval_tasks=[ro_mc_sample,arc_ro]"`.

lm-eval (`pip install "lm-eval[hf]"`, which brings accelerate) runs through its Python API on the same
model object and tokenizer as the lab's own metrics, float or quantized: an `HFLM` wraps them with the
lab's scoring window as `max_length`, no BOS token added (the lab's tasks add none) and the softmax in
float32 (as lab/evaluation/tasks.py), and `simple_evaluate` returns the metrics, logged as
`quant/<variant>/lm_eval/<task>/<metric>` (filters other than lm-eval's `none` appended: `exact_match_flexible`).

A name in `lm_eval_tasks` is a task name, never a path, looked up:

1. in the lab's own task folders (`lm_eval.task_dirs`, default data/sample/tasks/lm_eval): each YAML there
   is read by the lab and must be plain data, because lm-eval task files can run code: `!function` imports
   a Python file, `include` pulls in other files, `class`/`process_docs`/`process_results` name Python,
   a Jinja template can reach Python objects, a metric lm-eval does not know is fetched (code) from the Hub.
   So the lab accepts only: YAML without tags or aliases; the keys of ALLOWED_KEYS; templates that only
   insert a field (`{{context}}`); local json/csv/parquet/text data files relative to the YAML's folder;
   lm-eval's built-in log-likelihood metrics. The checked config (data paths made absolute) is what lm-eval
   gets; it never reads these files itself. A task that needs Python belongs in an installed package.
2. else among the tasks that come with lm-eval itself (belebele_ron_Latn, arc_ro, hellaswag_ro, m_mmlu_ro,
   xquad_ro...): code of the installed package, trusted as the package is; their datasets come from the
   Hugging Face Hub, so they need the network (or its cache). lm-eval's tasks that run generated code stay
   refused (`confirm_run_unsafe_code=False`).

Anything else (a path, an unknown name, a file of a task folder that breaks these rules, lm-eval not
installed) is one LabError line before lm-eval runs.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from lab import LabError
from lab.evaluation.settings import LmEval


log = logging.getLogger(__name__)

INSTALL = '.venv/bin/pip install "lm-eval[hf]==0.4.13" -c constraints.txt'
TASK_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*")
MAX_TASK_FILE_BYTES = 1_000_000

# The keys a task of a lab task folder may use; everything else (include, class, process_docs, filter_list,
# custom_dataset, dataset_name, fewshot_config, ...) is refused by name.
ALLOWED_KEYS = {"task", "tag", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "training_split",
                "fewshot_split", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "description",
                "target_delimiter", "fewshot_delimiter", "num_fewshot", "metric_list", "metadata"}
LOCAL_BUILDERS = {"json", "csv", "parquet", "text"}          # datasets' packaged readers of local files
OUTPUT_TYPES = {"multiple_choice", "loglikelihood", "loglikelihood_rolling"}
METRICS = {"acc", "acc_norm", "acc_bytes", "acc_mutual_info", "perplexity", "word_perplexity", "byte_perplexity",
           "bits_per_byte"}
AGGREGATIONS = {"mean", "median", "perplexity", "weighted_perplexity", "bits_per_byte"}
# `{{ field }}`: the only Jinja a lab task may use (no filters, attributes, calls or statements)
FIELD = re.compile(r"\{\{\s*[A-Za-z][A-Za-z0-9_]*\s*\}\}")


@dataclass(frozen=True)
class LocalTask:
    name: str
    path: Path
    config: dict[str, Any]        # checked; data files absolute


# -- the lab's task folders -----------------------------------------------------------------------------------------


def read_task_dirs(dirs: Sequence[str | Path]) -> dict[str, LocalTask]:
    """{task name: task} of every YAML file under the folders (a LabError names the first bad file)."""
    tasks: dict[str, LocalTask] = {}
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise LabError(f"lm_eval.task_dirs: {folder} is not a folder")
        for path in sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()):
            task = LocalTask(*_checked_task(path))
            if task.name in tasks:
                raise LabError(f"lm-eval task {task.name!r} is defined twice: {tasks[task.name].path} and {path}")
            tasks[task.name] = task
    return tasks


def _checked_task(path: Path) -> tuple[str, Path, dict[str, Any]]:
    config = _read_plain_yaml(path)
    refused = sorted(set(config) - ALLOWED_KEYS)
    if refused:
        raise LabError(f"{path}: key {refused[0]!r} is not accepted in a lab task folder (only plain data: "
                       f"{', '.join(sorted(ALLOWED_KEYS))}); a task that needs Python belongs in an installed package")
    name = config.get("task")
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise LabError(f"{path}: `task` must be a task name (letters, digits, _ . -), got {name!r}")
    for key, check in _CHECKS.items():
        if key in config:
            problem = check(config[key])
            if problem:
                raise LabError(f"{path}: `{key}` {problem}")
    if "dataset_path" not in config:
        raise LabError(f"{path}: `dataset_path` is missing (one of {sorted(LOCAL_BUILDERS)})")
    config = dict(config, dataset_kwargs={"data_files": _data_files(path, config.get("dataset_kwargs"))})
    return name, path, config


def _read_plain_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        if path.stat().st_size > MAX_TASK_FILE_BYTES:
            raise LabError(f"{path}: larger than {MAX_TASK_FILE_BYTES} bytes; not a task file")
        text = path.read_text(encoding="utf-8")
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):   # aliases can blow a few lines up into gigabytes
                raise LabError(f"{path}:{event.start_mark.line + 1}: YAML aliases are not accepted in a task file")
        config = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise LabError(f"{path}: not UTF-8 text") from None
    except yaml.constructor.ConstructorError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else "?"
        raise LabError(f"{path}:{line}: YAML tags such as `!function` run Python code and are not accepted in a lab "
                       "task folder (only plain data)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LabError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(config, dict):
        raise LabError(f"{path}: expected a mapping of task keys (task, dataset_path, doc_to_text, ...)")
    return config


def _template(value: Any) -> str | None:
    if isinstance(value, str):
        rest = FIELD.sub("", value)
        if any(mark in rest for mark in ("{{", "{%", "{#")):
            return (f"may only insert fields as {{{{field}}}} (no filters, attributes or statements), got {value!r}")
        return None
    return f"must be text, got {type(value).__name__}"


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else f"must be text, got {type(value).__name__}"


def _target(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    return _template(value)


def _choices(value: Any) -> str | None:
    if isinstance(value, list):
        return next((p for p in map(_template, value) if p), None) if value else "must not be empty"
    return _template(value)


def _names(value: Any) -> str | None:
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, str) and TASK_NAME.fullmatch(v) for v in values):
        return None
    return f"must be a name or a list of names, got {value!r}"


def _one_of(allowed: set[str]) -> Any:
    return lambda value: (None if isinstance(value, str) and value in allowed
                          else f"must be one of {sorted(allowed)}, got {value!r}")


def _count(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else f"must be a whole number >= 0, got {value!r}"


def _metric_list(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of {metric, aggregation, higher_is_better}"
    for entry in value:
        if not isinstance(entry, dict) or set(entry) - {"metric", "aggregation", "higher_is_better"}:
            return f"entries may only hold metric, aggregation, higher_is_better; got {entry!r}"
        if not isinstance(entry.get("metric"), str) or entry["metric"] not in METRICS:
            return f"metric must be one of lm-eval's built-in {sorted(METRICS)}, got {entry.get('metric')!r}"
        if "aggregation" in entry and (not isinstance(entry["aggregation"], str)
                                       or entry["aggregation"] not in AGGREGATIONS):
            return f"aggregation must be one of {sorted(AGGREGATIONS)}, got {entry['aggregation']!r}"
        if "higher_is_better" in entry and not isinstance(entry["higher_is_better"], bool):
            return f"higher_is_better must be true or false, got {entry['higher_is_better']!r}"
    return None


def _metadata(value: Any) -> str | None:
    plain = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                                            for k, v in value.items())
    return None if plain else "must be a mapping of names to plain values"


_CHECKS = {"tag": _names, "dataset_path": _one_of(LOCAL_BUILDERS), "output_type": _one_of(OUTPUT_TYPES),
           "test_split": _text, "validation_split": _text, "training_split": _text, "fewshot_split": _text,
           "doc_to_text": _template, "doc_to_target": _target, "doc_to_choice": _choices, "description": _template,
           "target_delimiter": _text, "fewshot_delimiter": _text, "num_fewshot": _count,
           "metric_list": _metric_list, "metadata": _metadata}


def _data_files(path: Path, kwargs: Any) -> dict[str, list[str]]:
    """{split: [absolute file]}: local files named relative to the task file's folder, which must exist."""
    if not isinstance(kwargs, dict) or set(kwargs) != {"data_files"}:
        raise LabError(f"{path}: `dataset_kwargs` must hold exactly `data_files` (local files relative to this "
                       f"folder), got {kwargs!r}")
    files = kwargs["data_files"]
    by_split = files if isinstance(files, dict) else {"train": files}
    resolved: dict[str, list[str]] = {}
    for split, names in by_split.items():
        names = names if isinstance(names, list) else [names]
        if not isinstance(split, str) or not names:
            raise LabError(f"{path}: `data_files` must map split names to files, got {files!r}")
        resolved[split] = [str(_local_file(path, name)) for name in names]
    return resolved


def _local_file(path: Path, name: Any) -> Path:
    if not isinstance(name, str) or not name:
        raise LabError(f"{path}: a data file must be a file name, got {name!r}")
    if "://" in name or name.startswith(("/", "~")) or Path(name).is_absolute():
        raise LabError(f"{path}: data file {name!r} must be a local path relative to the task file's folder")
    file = (path.parent / name).resolve()
    if not file.is_file():
        raise LabError(f"{path}: data file {name!r} not found (looked for {file})")
    return file


# -- lm-eval ----------------------------------------------------------------------------------------------------------


def import_lm_eval() -> tuple[Any, type]:
    """lm-eval's evaluator module and its HF model class, or one LabError line saying how to install them."""
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM  # needs the [hf] extra (accelerate)
    except ImportError as err:
        raise LabError(f"lm_eval_tasks needs lm-eval ({err.msg}): run `{INSTALL}`, or leave lm_eval_tasks empty") \
            from None
    return evaluator, HFLM


@functools.lru_cache(maxsize=1)
def builtin_tasks() -> Any:
    """lm-eval's own task index (a few seconds: it parses every task file of the package, running none)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=True)


def task_names(value: Any) -> list[str]:
    names = list(value or [])
    for name in names:
        if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
            raise LabError(f"lm_eval_tasks: {name!r} is not a task name; a task file goes into one of "
                           "lm_eval.task_dirs and is named by its `task:`")
    return names


def task_specs(names: Sequence[str], local: Mapping[str, LocalTask]) -> tuple[list[Any], Any]:
    """What simple_evaluate gets for each name (the lab's checked config, or lm-eval's own name), and
    the task manager (lm-eval's index only when a name is not the lab's)."""
    from lm_eval.tasks import TaskManager

    if all(name in local for name in names):
        return [dict(local[name].config) for name in names], TaskManager(include_defaults=False)
    manager = builtin_tasks()
    for name in names:
        if name not in local and name not in manager.all_tasks:
            close = difflib.get_close_matches(name, [*local, *manager.all_tasks], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise LabError(f"lm_eval_tasks: no task {name!r} in the lab's task folders ({', '.join(local) or 'none'}) "
                           f"or among lm-eval's {len(manager.all_tasks)} tasks{hint}")
    return [dict(local[name].config) if name in local else name for name in names], manager


def check_lm_eval_tasks(tasks: Sequence[str], options: "LmEval") -> list[str]:
    """Everything about lab.evaluate's `lm_eval_tasks` that can be wrong before a model is loaded: names, task
    folders, lm-eval installed, every name known (the `lm_eval` options are typed settings already). Cheap when
    there are none."""
    names = task_names(tasks)
    if names:
        local = read_task_dirs(options.task_dirs)
        import_lm_eval()
        task_specs(names, local)
    return names


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    # lm-eval warns for every truncated input and about receiving a model object; the lab reports its own way
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_lm_eval(model: nn.Module, tokenizer: Any, names: Sequence[str], options: "LmEval", max_length: int,
                batch_size: int, log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` result for `names` on this model (its "results", and "samples" if asked)."""
    local = read_task_dirs(options.task_dirs)
    evaluator, HFLM = import_lm_eval()
    specs, manager = task_specs(names, local)
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", max_length=max_length,
                  batch_size=batch_size, add_bos_token=False, softmax_dtype=torch.float32)
        try:
            result = evaluator.simple_evaluate(
                model=lm, tasks=specs, task_manager=manager, num_fewshot=options.num_fewshot, limit=options.limit,
                bootstrap_iters=options.bootstrap_iters, log_samples=log_samples, confirm_run_unsafe_code=False,
                # the lab's own random streams stay as they are (lm-eval would reseed python, numpy and torch)
                random_seed=None, numpy_random_seed=None, torch_random_seed=None)
        except LabError:
            raise
        except Exception as err:  # noqa: BLE001 - lm-eval and datasets raise many types; one line, traceback in the log
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise LabError(f"lm-eval could not run {', '.join(names)} ({type(err).__name__}: {first})") from err
    if not result:
        raise LabError(f"lm-eval returned no results for {', '.join(names)}")
    return result


def flat_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """{"lm_eval/<task>/<metric>": value} from lm-eval's "results" ("acc,none" -> acc, "acc,flex" -> acc_flex;
    sample_len -> n); values lm-eval could not compute ("N/A") are left out."""
    flat: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            if key == "sample_len":
                metric = "n"
            elif "," in key:
                metric, filter_name = key.split(",", 1)
                metric += "" if filter_name == "none" else f"_{filter_name}"
            else:
                continue                                  # alias, name: labels, not numbers
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                flat[f"lm_eval/{_safe(task)}/{_safe(metric)}"] = float(value)
    return flat


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]", "_", name)


def lm_eval_metrics(model: nn.Module, tokenizer: Any, tasks: Sequence[str], options: "LmEval", max_length: int,
                    batch_size: int) -> dict[str, float]:
    """lab.evaluate's hook: the metrics of its `lm_eval_tasks` on this model ({} when there are none)."""
    names = task_names(tasks)
    if not names:
        return {}
    result = run_lm_eval(model, tokenizer, names, options, max_length, batch_size)
    return flat_metrics(result["results"])
