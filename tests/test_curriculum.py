"""Curricula (conf/curriculum): stage order, mixtures, equal-token budgets, token metrics, resume, lab.compare."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from lab import CONF_DIR, PROJECT_ROOT, LabError
from lab.compare import compare
from lab.data.mixture import allocate, largest_remainder, source_shares
from lab.data.datamodule import (CurriculumDataModule, CurriculumLoader, Stage, StageOrder, parse_curriculum,
                                 stage_budget)
from tests.conftest import compose_config, tiny_train_overrides
from tests.test_compare import make_run, store  # noqa: F401 - the MLflow store fixture
from tests.test_train import read_steps, run_train

CURRICULA = sorted(p.stem for p in (CONF_DIR / "curriculum").glob("*.yaml"))
# The order the code before conf/curriculum gave the demo (web 1 epoch, books 2, batch 16, seed 1234):
# sha256 of json.dumps([web order, books order]). The default curriculum must keep it, so demo losses stay.
DEMO_ORDER_SHA256 = "b9104530ff17560b69c2f9696aa68d605b9b46b06856f81999ea4a141a4d9570"


def curriculum_module(prepared: Path, *overrides: str, batch_size: int = 4, seed: int = 1) -> CurriculumDataModule:
    cfg = compose_config("train", tiny_train_overrides(prepared, *overrides))
    return CurriculumDataModule(prepared, cfg.curriculum, 64, batch_size, shuffle_seed=seed)


def full_order(order: StageOrder) -> list[int]:
    return [order.index(p) for p in range(order.num_samples)]


# -- the default keeps today's behaviour ------------------------------------------------------------------------


def test_default_curriculum_keeps_the_demo_block_order(prepared_sample):
    cfg = compose_config("train", ["experiment=demo", f"data.prepared_dir={prepared_sample}"])
    assert cfg.curriculum.name == "web_then_books" and cfg.curriculum.total_tokens is None
    dm = CurriculumDataModule(prepared_sample, cfg.curriculum, 64, cfg.train.batch_size,
                              shuffle_seed=cfg.data.shuffle_seed)
    assert dm.stage_steps() == [41, 53]
    orders = [full_order(dm.stage_order(i)) for i in range(2)]
    assert hashlib.sha256(json.dumps(orders).encode()).hexdigest() == DEMO_ORDER_SHA256


def test_every_curriculum_reads_the_same_prepared_folder(prepared_sample):
    """curriculum= changes how training walks the data, never what is prepared or where it lives."""
    from lab.data.datamodule import prepare_command

    configs, commands = {}, set()
    for name in CURRICULA:
        configs[name] = compose_config("train", ["experiment=curriculum_study_tiny", f"curriculum={name}"])
        commands.add(prepare_command(configs[name]))  # reads this composition's Hydra choices and overrides
    assert len({c.data.prepared_dir for c in configs.values()}) == 1 and len(commands) == 1
    assert "curriculum" not in next(iter(commands))
    assert "curriculum" not in compose_config("prepare", [])  # lab.prepare never sees it
    # and each plans on the one prepared folder, at the same total of optimizer steps (equal tokens)
    totals = {name: sum(CurriculumDataModule(prepared_sample, cfg.curriculum, 64, 8, shuffle_seed=cfg.seed)
                        .stage_steps())
              for name, cfg in configs.items()}
    assert set(totals.values()) == {24576 // (8 * 64)}, totals


def test_block_order_is_the_same_for_every_arch(prepared_sample):
    def orders(arch: str) -> list[list[int]]:
        dm = curriculum_module(prepared_sample, f"arch={arch}", "curriculum=web_then_books_replay")
        return [full_order(dm.stage_order(i)) for i in range(len(dm.stages))]

    assert orders("llama_gqa") == orders("mamba2")


# -- mixtures ----------------------------------------------------------------------------------------------------


def test_mixture_hits_its_weights_exactly_and_evenly():
    stage = Stage("books", ("books", "web"), epochs=1, weights=(0.9, 0.1))
    order = StageOrder([426, 666], stage, 1, seed=5, num_samples=1000)
    assert order.source_counts(1000).tolist() == [900, 100]
    sources = np.array([0 if order.index(p) < 426 else 1 for p in range(1000)])
    for start in range(0, 1000 - 50, 7):  # every window, not just the whole stage
        assert abs((sources[start:start + 50] == 1).sum() - 5) <= 2
    for upto in (0, 1, 333, 999, 1000):  # the running counts are what tokens/<stage>/<source> reports
        assert order.source_counts(upto).tolist() == [(sources[:upto] == 0).sum(), (sources[:upto] == 1).sum()]


def test_mixture_order_is_a_pure_function_of_seed_stage_and_position():
    stage = Stage("mix", ("a", "b"), epochs=3, weights=(1.0, 3.0))
    order = StageOrder([10, 7], stage, 2, seed=9, num_samples=68)
    sequential = full_order(order)
    fresh = StageOrder([10, 7], stage, 2, seed=9, num_samples=68)
    positions = np.random.default_rng(0).permutation(68)
    assert [fresh.index(int(p)) for p in positions] == [sequential[p] for p in positions]  # any order, any start
    assert full_order(StageOrder([10, 7], stage, 2, seed=10, num_samples=68)) != sequential
    assert full_order(StageOrder([10, 7], stage, 3, seed=9, num_samples=68)) != sequential
    # within a source, each pass is a permutation: no block twice before all were seen
    b_blocks = [i - 10 for i in sequential if i >= 10]
    assert len(b_blocks) == 51 and all(sorted(b_blocks[k:k + 7]) == list(range(7)) for k in range(0, 49, 7))


def test_temperature_shares_follow_size_to_the_power_one_over_t():
    assert source_shares([300, 100], temperature=1.0).tolist() == pytest.approx([0.75, 0.25])
    shares = source_shares([300, 100], temperature=1.3)
    assert shares[1] / shares[0] == pytest.approx((100 / 300) ** (1 / 1.3))
    assert source_shares([300, 100], temperature=1e9).tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    assert source_shares([300, 100], weights=[2, 6]).tolist() == [0.25, 0.75]


def test_epoch_caps_move_the_surplus_to_the_other_sources():
    shares = np.array([0.5, 0.3, 0.2])
    counts = allocate(1000, shares, caps=[math.inf, 150, 100])
    assert counts.tolist() == [750, 150, 100]  # both small sources capped, the big one takes the rest
    counts = allocate(1000, shares, caps=[math.inf, math.inf, 100])
    assert counts.tolist() == [563, 337, 100]  # 900 shared 5:3 by largest remainder
    assert largest_remainder(7, np.array([1 / 3] * 3)).tolist() == [3, 2, 2]
    with pytest.raises(ValueError):
        allocate(1000, shares, caps=[500, 150, 100])


def test_mixture_epochs_count_passes_over_the_main_source():
    stage = Stage("books", ("books", "web"), epochs=2, weights=(0.9, 0.1))
    assert stage_budget(stage, [426, 666], 64, 4) == (round(2 * 426 / 0.9) // 4) * 4  # books twice, + 10% web


# -- equal tokens and token metrics ------------------------------------------------------------------------------


def test_total_tokens_splits_whole_steps_by_share_and_counts_tokens_per_source(prepared_sample):
    dm = curriculum_module(prepared_sample, "curriculum=web_then_books_replay", "curriculum.total_tokens=5376")
    assert dm.stage_steps() == [11, 10]  # 21 steps of 4 x 64 tokens, split 0.5/0.5 (largest remainder)
    tokens = dm.source_tokens(21)
    assert tokens["tokens/web/web"] == 11 * 4 * 64
    assert tokens["tokens/books/books"] + tokens["tokens/books/web"] == 10 * 4 * 64
    assert tokens["tokens/books/web"] == 4 * 64  # 10% of the 40 blocks
    assert tokens["tokens/web"] == tokens["tokens/web/web"] + tokens["tokens/books/web"]
    assert dm.source_tokens(5) == {"tokens/web/web": 5 * 256, "tokens/books/books": 0.0, "tokens/books/web": 0.0,
                                   "tokens/web": 5 * 256, "tokens/books": 0.0}
    assert dm.main_sources(1) == ["books"]  # web forgetting is measured from the end of the web stage


# -- bad input: one clear line each, before anything starts ----------------------------------------------------

STAGE = {"name": "s", "sources": ["web"], "epochs": 1}


@pytest.mark.parametrize("curriculum, message", [
    ({"name": "c", "stages": []}, "at least one stage"),
    ({"name": "c", "stages": [{**STAGE, "sources": {"web": -1, "books": 2}}]}, "below 0"),
    ({"name": "c", "stages": [{**STAGE, "sources": {"web": 0, "books": 0}}]}, "do not sum to a positive number"),
    ({"name": "c", "stages": [{**STAGE, "sources": {"web": "lots"}}]}, "not a finite number"),
    ({"name": "c", "stages": [{**STAGE, "sources": {"web": float("nan")}}]}, "not a finite number"),
    ({"name": "c", "stages": [{**STAGE, "sources": {"web": True}}]}, "not a finite number"),
    ({"name": "c", "stages": [{**STAGE, "sources": {"web": 1.0}, "temperature": 2}]}, "not both"),
    ({"name": "c", "stages": [{**STAGE, "temperature": 0}]}, "temperature=0 is not a positive number"),
    ({"name": "c", "stages": [{**STAGE, "epochs": -1}]}, "epochs=-1 is not a positive number"),
    ({"name": "c", "stages": [{**STAGE, "tokens": 10}]}, "exactly one of `epochs` or `tokens`"),
    ({"name": "c", "stages": [{**STAGE, "weight": {"web": 1}}]}, r"unknown key\(s\) \['weight'\]"),
    ({"name": "c", "stages": [STAGE, STAGE]}, "names a stage twice"),
    ({"name": "c", "stages": [{**STAGE, "name": "a/b"}]}, "without '/'"),
    ({"name": "c", "stages": [{**STAGE, "sources": "web"}]}, "expected a list of source names"),
    ({"name": "c", "stages": [{**STAGE, "sources": ["web", "web"]}]}, "names a source twice"),
    ({"name": "c", "stages": ["web"]}, "not a mapping"),
    ({"name": "c", "total_tokens": 1.5, "stages": [STAGE]}, "not a positive whole number"),
    ({"name": "c", "total_tokens": 4096, "stages": [STAGE]}, "has no `share`"),
    ({"name": "c", "stages": [STAGE], "stage": []}, r"unknown key\(s\) \['stage'\]"),
    ("web_then_books", "not a mapping"),
])
def test_bad_curricula_are_one_clear_line(curriculum, message):
    with pytest.raises(LabError, match=message) as err:
        parse_curriculum(curriculum)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["curriculum.stages=[{name:x,sources:[web,wiki],epochs:1}]"], r"source\(s\) \['wiki'\] not in the prepared data"),
    (["curriculum.stages=[{name:x,sources:{web:1,books:1},epochs:3,max_epochs:1}]"], "max_epochs=1"),
    (["curriculum.stages=[{name:x,sources:[web],epochs:2,max_epochs:1.5}]"], "max_epochs=1.5"),
    (["curriculum=web_then_books_replay", "curriculum.total_tokens=256"], "gets none"),  # 1 step, 2 stages
])
def test_bad_curricula_stop_before_any_mlflow_run(prepared_sample, tmp_path, overrides, message):
    with pytest.raises(LabError, match=message):
        run_train(prepared_sample, tmp_path, *overrides)
    assert not (tmp_path / "mlflow.db").exists()  # the test's MLflow store (conftest) was never even opened


# -- resume ---------------------------------------------------------------------------------------------------------

REPLAY = ["curriculum=web_then_books_replay", "curriculum.total_tokens=2560", "trainer.max_steps=-1",
          "train.export_hf=false", "train.eval_every_steps=5", "train.val_max_blocks=2",
          "callbacks.checkpoint.every_n_steps=3", "callbacks.checkpoint.keep_last=-1"]


def test_exact_resume_mid_mixture_and_no_resume_under_another_curriculum(prepared_sample, tmp_path):
    """5 web steps, then 5 steps of books with 10% web; resumed from step 6, inside the mixture."""
    straight = run_train(prepared_sample, tmp_path / "straight", *REPLAY)
    assert straight["module"].global_step == 10
    run = MlflowClient().get_run(straight["run_id"])
    assert run.data.tags["curriculum"] == "web_then_books_replay"
    assert run.data.params["curriculum.name"] == "web_then_books_replay"
    metrics = run.data.metrics
    assert metrics["tokens/books/web"] == 2 * 64 and metrics["tokens/books/books"] == 18 * 64
    assert metrics["tokens/web"] == 22 * 64 and "val/web/forgetting" in metrics

    checkpoint = tmp_path / "straight" / "checkpoints" / "step0000006.ckpt"
    resumed = run_train(prepared_sample, tmp_path / "resumed", *REPLAY, f"ckpt_path={checkpoint}")
    expected, after = read_steps(tmp_path / "straight"), read_steps(tmp_path / "resumed")
    assert sorted(after) == list(range(7, 11))
    assert after == {s: v for s, v in expected.items() if s > 6}  # exact float equality, step by step
    assert resumed["run_id"] == straight["run_id"]

    runs_before = len(MlflowClient().search_runs([run.info.experiment_id]))
    with pytest.raises(LabError, match=r"curriculum\.name: web_then_books_replay -> books_then_web"):
        run_train(prepared_sample, tmp_path / "other", *REPLAY, "curriculum=books_then_web",
                  f"ckpt_path={checkpoint}")
    assert len(MlflowClient().search_runs([run.info.experiment_id])) == runs_before
    # without the MLflow record (another store), the checkpoint's own record refuses it
    saved = torch.load(checkpoint, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    loader = CurriculumLoader([], stage="books", samples_per_step=4, curriculum="books_then_web:0123456789ab")
    with pytest.raises(LabError, match="trained under curriculum web_then_books_replay:.*curriculum=web_then_books_"):
        loader.load_state_dict(saved)


# -- lab.compare --by curriculum ----------------------------------------------------------------------------------


def test_compare_rows_by_curriculum_with_forgetting_and_tokens(store, tmp_path, capsys):  # noqa: F811
    from lab.compare import main

    uri, client, exp_id = store
    for curriculum, loss, forgetting in [("web_then_books", 3.0, 0.4), ("web_then_books_replay", 3.1, 0.1),
                                         ("mixed", 3.3, None)]:
        for seed in (1, 2):
            run_id = make_run(client, exp_id, "llama_gqa", seed, loss + seed / 100,
                              tags={"curriculum": curriculum})
            extra = [Metric("tokens/web", 6000, 0, 20), Metric("tokens/books", 4240, 0, 20),
                     Metric("tokens/books/books", 4240, 0, 20)]
            if forgetting is not None:
                extra.append(Metric("val/web/forgetting", forgetting + seed / 100, 0, 20))
            client.log_batch(run_id, metrics=extra, params=[Param("curriculum.name", curriculum)])
    result = compare("bakeoff_t", by="curriculum", uri=uri, out_dir=tmp_path / "c", log_to_mlflow=False)
    assert [r.label for r in result.rows] == ["web_then_books", "web_then_books_replay", "mixed"]
    assert all(len(r.runs) == 2 and not r.mixed for r in result.rows)
    assert result.rows[1].mean["val/web/forgetting"] == pytest.approx(0.115)
    assert result.rows[2].mean["val/web/forgetting"] is None  # one stage: nothing to forget after
    lines = result.markdown.splitlines()
    assert lines[0].startswith("| curriculum | arch | runs |") and "web forgetting" in lines[0]
    assert "web tokens" in lines[0] and "books bpb" in lines[0] and "tokens/books/books" not in lines[0]
    assert "| web_then_books_replay | llama_gqa | 2 |" in result.markdown
    assert "0.1150 ± 0.0071" in result.markdown  # mean ± sample std over the two seeds
    assert "tokens/books/books" in (tmp_path / "c" / "table.csv").read_text().splitlines()[0]
    assert (tmp_path / "c" / "val_loss_vs_tokens.png").stat().st_size > 0
    # a row with another token budget is called out: curricula are compared at equal tokens
    make_run(client, exp_id, "llama_gqa", 1, 2.0, steps=40, tags={"curriculum": "books_then_web"})
    assert main(["--experiment", "bakeoff_t", "--by", "curriculum", "--tracking-uri", uri, "--no-log",
                 "--out", str(tmp_path / "d")]) == 0
    assert "caution: the curricula trained on different token budgets" in capsys.readouterr().out


# -- the study end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow  # 10 tiny trainings (~5 min on 2 cores)
def test_tiny_curriculum_study_gives_one_row_per_curriculum(prepared_sample, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run([sys.executable, "-m", "lab.train", "-m", "experiment=curriculum_study_tiny",
                           f"data.prepared_dir={prepared_sample}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    result = compare("curriculum_study_tiny", by="curriculum", out_dir=tmp_path / "table", log_to_mlflow=False)
    assert sorted(r.label for r in result.rows) == CURRICULA
    assert all(len(r.runs) == 2 for r in result.rows)
    assert len({r.mean["tokens_seen"] for r in result.rows}) == 1  # equal tokens
    header = result.markdown.splitlines()[0]
    assert "web bpb" in header and "books bpb" in header and "web forgetting" in header
