"""`lmopt tune` and the metrics that decide: the stopping rule, the search end to end through the CLI, resumed
trials equal to uninterrupted runs, `compare --tuned`, seeds (bit-exact), steps to target, the WSD schedule."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from lmopt.bench.compare import CompareConfig, lr_schedule, run_compare  # noqa: E402
from lmopt.bench.metrics import aggregate_seeds, first_step_below, steps_to_target, trailing_mean  # noqa: E402
from lmopt.bench.run import TrainingRun, build_template  # noqa: E402
from lmopt.bench.run import _Silent as _SilentRun  # noqa: E402
from lmopt.bench.tune import (  # noqa: E402
    TuneConfig,
    grid,
    promoted,
    replay_halving,
    rung_budgets,
    tune,
    tuned_learning_rates,
)
from lmopt.bench.tune_report import TUNE_FILES  # noqa: E402
from lmopt.cli import main  # noqa: E402

WORKLOAD = ["--model", "tiny", "--steps", "12", "--batch-size", "2", "--seq-len", "32", "--eval-windows", "2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _corpus(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        body = "".join(f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(30))
        (folder / f"module_{i:02d}.py").write_text(body, encoding="utf-8")
    return str(folder)


def _tiny(tmp_path: Path, optimizers: list[str], steps: int = 12, **kw) -> CompareConfig:
    return CompareConfig(
        optimizers=optimizers,
        model="tiny",
        steps=steps,
        batch_size=2,
        seq_len=32,
        eval_windows=2,
        data=_corpus(tmp_path / "corpus"),
        **kw,
    )


# ---------------------------------------------------------------------------------------------------- the rule
def test_rung_budgets():
    assert rung_budgets(120, 3, 3) == [13, 40, 120]
    assert rung_budgets(12, 3, 3) == [1, 4, 12]
    assert rung_budgets(4, 3, 3) == [1, 4]  # 4 / 9 and 4 / 3 both round to 1: one rung fewer
    assert rung_budgets(10, 2, 1) == [10]


def test_successive_halving_stopping_rule():
    inf, nan = float("inf"), float("nan")
    assert promoted({1e-3: 2.1, 3e-3: 1.9, 1e-2: 2.0, 3e-2: inf}, 3) == [3e-3, 1e-2]  # ceil(4 / 3) = 2
    assert promoted({1e-3: 2.1, 3e-3: 1.9, 1e-2: 2.0, 3e-2: inf}, 2) == [3e-3, 1e-2]
    assert promoted({1e-3: 2.0, 3e-3: 2.0, 1e-2: 2.5}, 3) == [1e-3]  # a tie goes to the smaller LR
    assert promoted({1e-3: inf, 3e-3: nan}, 3) == []  # a diverged trial is never promoted
    assert promoted({1e-3: 5.0, 3e-3: nan, 1e-2: inf, 3e-2: inf, 1e-1: inf}, 3) == [1e-3]
    assert promoted({1e-3: 5.0}, 3) == [1e-3]  # at least one goes on
    with pytest.raises(ValueError, match="eta"):
        promoted({1e-3: 1.0}, 1)


def test_grid_is_log_spaced_around_the_centre():
    assert grid(1e-3, 5, 3.0) == [0.0001111, 0.0003333, 0.001, 0.003, 0.009]
    assert grid(1e-3, 1, 3.0) == [0.001]
    assert grid(1e-3, 4, 2.0) == [0.0005, 0.001, 0.002, 0.004]


def test_tune_config_refuses_bad_input(tmp_path):
    base = _tiny(tmp_path, ["adamw"])
    for kw, match in [
        ({"eta": 1}, "eta"),
        ({"grid_factor": 1.0}, "grid_factor"),
        ({"grid_points": 0}, "grid_points"),
        ({"widths": [64, 32]}, "widths"),
        ({"widths": [33]}, "multiple"),
        ({"parametrizations": ["xp"]}, "parametrizations"),
        ({"centers": {"adamw": -1.0}}, "centers"),
        ({"compare": replace(base, seeds=2)}, "one seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            TuneConfig(**{"compare": base, **kw}).validate()


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One CLI search: adamw and lion, 3 learning rates each, 12 steps (rungs 1, 4, 12)."""
    root = tmp_path_factory.mktemp("tune")
    data = _corpus(root / "corpus")
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(
            [
                "tune",
                "--optimizers",
                "adamw,lion",
                *WORKLOAD,
                "--data",
                data,
                "--grid-points",
                "3",
                "--refine-points",
                "1",
                "--max-extensions",
                "1",
                "--rungs",
                "3",
                "--out",
                str(root / "out"),
            ]
        )
    return root, data, code, buffer.getvalue(), json.loads((root / "out" / TUNE_FILES["tune_json"]).read_text())


def test_tune_cli_end_to_end(tuned):
    root, _data, code, text, result = tuned
    assert code == 0
    assert "best lr" in text and "adamw" in text and "lion" in text
    for key in ("tune_json", "loss_vs_lr", "tune_md"):
        assert (root / "out" / TUNE_FILES[key]).exists(), key
    png = (root / "out" / TUNE_FILES["loss_vs_lr"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (root / "out" / TUNE_FILES["lr_vs_width"]).exists()
    assert set(result["best_lr"]) == {"adamw", "lion"}
    for study in result["studies"]:
        lrs = [t["lr"] for t in study["trials"]]
        assert lrs == sorted(lrs) and len(set(lrs)) == len(lrs)
        assert 3 <= len(lrs) <= 3 + 1 + 1  # grid, at most one extension, one refinement point
        assert study["rung_budgets"] == [1, 4, 12]
        finished = {t["lr"]: t["validation_loss"] for t in study["trials"] if t["status"] == "ok"}
        assert study["best_lr"] == min(finished, key=finished.get)
        assert study["best_validation_loss"] == finished[study["best_lr"]]
        # the cost counts the cooldown branches beside the trials' own steps
        assert study["rung_score"] == "cooldown" and study["cooldown_steps"] > 0
        assert study["steps_trained"] == sum(t["steps"] for t in study["trials"]) + study["cooldown_steps"]
        for t in study["trials"]:
            assert t["status"] in ("ok", "stopped", "diverged")
            if t["status"] == "stopped":  # stopped exactly at a rung
                assert t["steps"] in (1, 4) and t["validation_loss"] is None
            if t["status"] == "ok":
                assert t["steps"] == 12 and len(t["rung_scores"]) == 3
        # the coarse grid's first rung: ceil(3 / 3) = 1 promoted, so exactly 2 of the 3 stop at step 1
        coarse = [t for t in study["trials"] if t["lr"] in grid(study["center_lr"], 3, 3.0)]
        assert sum(t["steps"] == 1 for t in coarse) == 2


def test_a_resumed_trial_equals_an_uninterrupted_run(tuned, tmp_path):
    """Successive halving pauses the survivor at every rung; its run must be the run compare makes."""
    _root, data, _code, _text, result = tuned
    study = next(s for s in result["studies"] if s["optimizer"] == "adamw")
    best = next(t for t in study["trials"] if t["lr"] == study["best_lr"])
    config = CompareConfig(
        optimizers=["adamw"],
        model="tiny",
        steps=12,
        batch_size=2,
        seq_len=32,
        eval_windows=2,
        data=data,
        hyperparameters={"adamw": {"lr": study["best_lr"]}},
    )
    run = run_compare(config)["runs"][0]
    assert run["history"]["loss"] == best["history"]["loss"]  # bit for bit
    assert run["validation_loss"] == best["validation_loss"]


def test_compare_tuned_uses_the_tuned_rates(tuned, tmp_path):
    root, data, _code, _text, result = tuned
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(
            [
                "compare",
                "--tuned",
                str(root / "out" / TUNE_FILES["tune_json"]),
                "--optimizers",
                "adamw,lion,sgd",
                *WORKLOAD,
                "--data",
                data,
                "--set",
                "lion.weight_decay=0.2",
                "--out",
                str(tmp_path / "cmp"),
            ]
        )
    assert code == 0
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    by_name = {r["name"]: r for r in results["runs"]}
    for name in ("adamw", "lion"):
        assert by_name[name]["hyperparameters"]["lr"] == result["best_lr"][name]
        assert by_name[name]["lr_source"] == "tuned (tune.json)"
    assert by_name["lion"]["hyperparameters"]["weight_decay"] == 0.2  # other overrides kept
    assert by_name["sgd"]["lr_source"] == "recipe (not in tune.json)"
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "lr from" in text and "tuned (tune.json)" in text
    # an explicit --set lr wins over the file, and says so
    with redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "compare",
                    "--tuned",
                    str(root / "out" / TUNE_FILES["tune_json"]),
                    "--optimizers",
                    "adamw",
                    *WORKLOAD,
                    "--steps",
                    "6",
                    "--data",
                    data,
                    "--set",
                    "adamw.lr=0.002",
                    "--out",
                    str(tmp_path / "cmp2"),
                ]
            )
            == 0
        )
    run = json.loads((tmp_path / "cmp2" / "results.json").read_text())["runs"][0]
    assert run["hyperparameters"]["lr"] == 0.002 and run["lr_source"] == "--set"


def test_tuned_learning_rates_checks_the_file(tmp_path):
    with pytest.raises(ValueError, match="not a tune.json"):
        tuned_learning_rates({"runs": []}, CompareConfig())
    study = {"optimizer": "adamw", "width": 128, "parametrization": "sp", "best_lr": 0.01}
    other = {"optimizer": "lion", "width": 64, "parametrization": "sp", "best_lr": 0.5}
    assert tuned_learning_rates({"tool": "lmopt tune", "studies": [study, other]}, CompareConfig()) == {"adamw": 0.01}


def test_divergence_is_a_result_not_a_crash(tmp_path):
    """Every learning rate of this grid blows the tiny model up (lmopt refuses the LRs that would make the
    weights inf, so Lion's sign updates at lr 1e5 do): diverged trials, no best, no exception."""
    config = TuneConfig(
        _tiny(tmp_path, ["sgd"], steps=8, max_grad_norm=0.0),
        grid_points=2,
        centers={"sgd": 1e5},
        refine_points=0,
        max_extensions=0,
    )
    result = tune(config)
    study = result["studies"][0]
    statuses = {t["status"] for t in study["trials"]}
    assert statuses <= {"diverged", "stopped", "ok"}
    assert "diverged" in statuses
    if study["best_lr"] is None:
        assert result["best_lr"] == {"sgd": None}
    json.dumps(result, allow_nan=False)


def test_tune_cli_bad_input(tmp_path, capsys):
    assert main(["tune", "--widths", "64,x", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--widths" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["tune", "--seeds", "2", *WORKLOAD, "--out", str(tmp_path)]) == 2
    assert "one seed" in capsys.readouterr().err
    assert main(["tune", "--center", "adamw", *WORKLOAD, "--out", str(tmp_path)]) == 2
    assert "NAME=LR" in capsys.readouterr().err
    assert main(["tune", "--probes", "4,x", *WORKLOAD, "--out", str(tmp_path)]) == 2
    assert "--probes" in capsys.readouterr().err
    assert main(["tune", "--probes", "40", *WORKLOAD, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "probes must be" in err and len(err.strip().splitlines()) == 1
    assert main(["compare", "--tuned", str(tmp_path / "missing.json"), *WORKLOAD, "--out", str(tmp_path)]) == 2
    assert "--tuned" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ seeds and target
def test_seeds_reproduce_bit_exactly(tmp_path):
    config = _tiny(tmp_path, ["adamw", "lion"], steps=5, seeds=2, seed=3)
    a, b = run_compare(config), run_compare(config)
    assert a["seeds"] == [3, 4]
    for ra, rb in zip(a["runs"], b["runs"], strict=True):
        assert [s["seed"] for s in ra["seed_runs"]] == [3, 4]
        for sa, sb in zip(ra["seed_runs"], rb["seed_runs"], strict=True):
            assert sa["history"]["loss"] == sb["history"]["loss"]
            assert sa["validation_loss"] == sb["validation_loss"]
        # the seeds differ from each other (weights and data order)
        assert ra["seed_runs"][0]["history"]["loss"] != ra["seed_runs"][1]["history"]["loss"]
        values = [s["validation_loss"] for s in ra["seed_runs"]]
        assert ra["validation_loss"] == pytest.approx(sum(values) / 2)
        assert ra["validation_loss_std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    # seed 4 of the two-seed run is the one-seed run at seed 4
    single = run_compare(replace(config, seeds=1, seed=4))
    for ra, rs in zip(a["runs"], single["runs"], strict=True):
        assert ra["seed_runs"][1]["history"]["loss"] == rs["history"]["loss"]


def _run(name: str, curves: list[list[float]]) -> dict:
    runs = [
        {
            "name": name,
            "seed": i,
            "status": "ok",
            "message": None,
            "steps_completed": len(c),
            "final_train_loss": sum(c[-2:]) / 2,
            "validation_loss": c[-1],
            "tokens_per_second": 100.0,
            "train_time_s": float(len(c)),
            "history": {
                "step": list(range(1, len(c) + 1)),
                "loss": c,
                "time_s": [float(s) for s in range(1, len(c) + 1)],
            },
        }
        for i, c in enumerate(curves)
    ]
    return aggregate_seeds(runs)


def test_steps_to_target():
    assert trailing_mean([4.0, 2.0, 0.0], 2) == [4.0, 3.0, 1.0]
    assert first_step_below([1, 2, 3], [4.0, 2.0, 0.0], 1.5, 2) == 3
    assert first_step_below([1, 2, 3], [4.0, 2.0, 0.0], 0.5, 2) is None
    base = _run("adamw", [[5, 4, 3, 2, 1, 1], [5, 4, 3, 2, 1, 1]])  # final (window 2) 1.0
    fast = _run("fast", [[5, 3, 1, 1, 1, 1], [5, 2, 1, 1, 0.5, 0.5]])
    slow = _run("slow", [[5, 5, 5, 5, 5, 5], [5, 5, 5, 5, 5, 5]])
    runs = [base, fast, slow]
    target = steps_to_target(runs, "adamw", window=2, tokens_per_step=10)
    assert target["loss"] == 1.0
    assert base["steps_to_target"] == 6 and base["speedup"] == 1.0
    assert fast["steps_to_target"] == 4  # both seeds: trailing means 5, 4 (3.5), 2 (1.5), 1
    assert fast["steps_to_target_reached"] == 2 and fast["tokens_to_target"] == fast["steps_to_target"] * 10
    assert fast["speedup"] == pytest.approx(6 / fast["steps_to_target"])
    assert slow["steps_to_target"] is None and slow["speedup"] is None and slow["steps_to_target_reached"] == 0
    assert steps_to_target([slow], "adamw", window=2, tokens_per_step=10) is None


def test_aggregate_marks_a_failed_seed():
    ok = _run("x", [[3, 2, 1]])["seed_runs"][0]
    bad = dict(ok, status="diverged", message="training loss became nan at step 2", seed=1)
    entry = aggregate_seeds([dict(ok, name="x", seed=0, history=ok["history"]), dict(bad, name="x")])
    assert entry["status"] == "diverged" and "seed 1" in entry["message"] and "1 of 2 seeds" in entry["message"]
    assert entry["seeds_ok"] == 1 and entry["validation_loss"] == ok["validation_loss"]


def test_wsd_schedule():
    f = lr_schedule(20, 2, 0.1, shape="wsd", decay_steps=4)
    values = [f(s) for s in range(20)]
    assert values[:2] == [0.5, 1.0] and set(values[2:16]) == {1.0}
    assert values[16] == 1.0 and values[-1] == pytest.approx(0.1)
    assert values[17] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(1 / 3)))
    with pytest.raises(ValueError, match="do not fit"):
        CompareConfig(steps=10, warmup_steps=5, schedule="wsd", decay_fraction=0.9).validate()
    with pytest.raises(ValueError, match="schedule"):
        CompareConfig(schedule="linear").validate()


def test_widths_under_sp_and_mup(tmp_path):
    """--widths: one study per width and parametrization, muP through lmopt.mup, the transfer entry, the plot."""
    from lmopt.bench.tune_report import write_tune_outputs

    config = TuneConfig(
        _tiny(tmp_path, ["adamw"], steps=6),
        grid_points=2,
        refine_points=0,
        max_extensions=0,
        widths=[16, 32],
        parametrizations=["sp", "mup"],
    )
    result = tune(config)
    keys = [(s["parametrization"], s["width"]) for s in result["studies"]]
    assert keys == [("sp", 16), ("sp", 32), ("mup", 16), ("mup", 32)]
    assert result["best_lr"] == {}  # no plain study: compare --tuned reads per width
    sp32 = next(s for s in result["studies"] if s["parametrization"] == "sp" and s["width"] == 32)
    mup32 = next(s for s in result["studies"] if s["parametrization"] == "mup" and s["width"] == 32)
    # the same LR trains differently under muP at width 32 (base width 16: hidden LR and init scaled)
    assert sp32["trials"][0]["history"]["loss"] != mup32["trials"][0]["history"]["loss"]
    transfer = {t["parametrization"]: t for t in result["transfer"]}
    assert set(transfer) == {"sp", "mup"}
    for t in transfer.values():
        assert t["widest_width"] == 32 and t["best_lr_spread"] >= 1.0
        assert math.isfinite(t["transferred_validation_loss"])
    paths = write_tune_outputs(result, tmp_path / "out")
    assert paths["lr_vs_width"].read_bytes()[:4] == b"\x89PNG"
    assert "Width transfer" in paths["tune_md"].read_text()
    compare = replace(config.compare, width=32, parametrization="mup", base_width=16)
    assert tuned_learning_rates(result, compare) == {"adamw": mup32["best_lr"]}


# ------------------------------------------------------------------------------------------ cooldown rung scores
def _training_run(config: CompareConfig, name: str) -> TrainingRun:
    from lmopt.bench.corpus import load_corpus, train_batch_offsets, validation_windows

    corpus = load_corpus(config.data, None)
    offsets = train_batch_offsets(
        corpus.train, steps=config.steps, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed
    )
    val = validation_windows(corpus.validation, seq_len=config.seq_len, max_windows=config.eval_windows)
    template, extras, _ = build_template(config, corpus.vocab_size)
    return TrainingRun(
        name, template, config, torch.device("cpu"), offsets, corpus, val, None, _SilentRun(), extras=extras
    )


@pytest.mark.parametrize("name", ["adamw", "sophia", "adamw8bit", "schedule_free_adamw"])
def test_a_cooldown_branch_leaves_the_run_untouched(tmp_path, name):
    """The branch trains a copy (and restores the RNG: Sophia samples its Hessian estimate), so the run that
    branched is bit-identical to one that never did; the branch's score is the annealed point's loss."""
    config = _tiny(tmp_path, [name], steps=10)
    plain, branched = _training_run(config, name), _training_run(config, name)
    plain.advance(10)
    branched.advance(5)
    before = branched.cooldown_loss(0)  # no decay steps: just the evaluation
    score = branched.cooldown_loss(3)
    assert math.isfinite(score) and math.isfinite(before)
    if name == "schedule_free_adamw":  # its averaged point x already is the annealed iterate: no branch
        assert score == before
    else:
        assert score != before
    branched.advance(10)
    a, b = plain.finish(), branched.finish()
    assert a["status"] == b["status"] == "ok"
    assert a["history"]["loss"] == b["history"]["loss"]
    assert a["validation_loss"] == b["validation_loss"]


def test_a_cooldown_decays_the_learning_rate_to_zero(tmp_path, monkeypatch):
    import lmopt.bench.run as run_module

    config = _tiny(tmp_path, ["adamw"], steps=10)
    run = _training_run(config, "adamw")
    run.advance(4)
    peak = run.optimizer.param_groups[0]["lr"]
    seen, real = [], run_module.train_step

    def spy(model, optimizer, batch, **kw):
        seen.append((optimizer is run.optimizer, optimizer.param_groups[0]["lr"]))
        return real(model, optimizer, batch, **kw)

    monkeypatch.setattr(run_module, "train_step", spy)
    run.cooldown_loss(4)
    assert [own for own, _ in seen] == [False] * 4  # a copy trains, never the run's own optimizer
    assert [lr for _, lr in seen] == pytest.approx([peak, 0.75 * peak, 0.5 * peak, 0.25 * peak])
    assert run.optimizer.param_groups[0]["lr"] == peak
    assert run.cooldown_loss(100) < math.inf  # clipped to the batches left (6), not past the schedule's end


def test_probes_record_both_scores_without_changing_the_search(tmp_path):
    compare = _tiny(tmp_path, ["adamw"], steps=12)
    base = TuneConfig(compare, grid_points=3, refine_points=0, max_extensions=0, rungs=1)
    plain = tune(base)
    probed = tune(replace(base, probes=[4, 8]))
    for sa, sb in zip(plain["studies"], probed["studies"], strict=True):
        assert sa["best_lr"] == sb["best_lr"]
        for ta, tb in zip(sa["trials"], sb["trials"], strict=True):
            assert ta["history"]["loss"] == tb["history"]["loss"]
            assert ta["validation_loss"] == tb["validation_loss"]
            assert ta["probes"] == []
            assert [p["step"] for p in tb["probes"]] == [4, 8]
            assert all(math.isfinite(p["train"]) and math.isfinite(p["cooldown"]) for p in tb["probes"])
        assert sb["cooldown_steps"] == 3 * (1 + 2)  # round(0.25 x 4) + round(0.25 x 8) per trial
    study = probed["studies"][0]
    full = replay_halving(study, 8, 3)
    assert full["best"] == study["best_lr"] and len(full["promoted"]) == 1
    assert full["regret"] >= 0 and 0 < full["cost"] < 1
    scores = {t["lr"]: next(p["cooldown"] for p in t["probes"] if p["step"] == 8) for t in study["trials"]}
    assert full["promoted"] == [min(scores, key=scores.get)]
    assert replay_halving(study, 8, 2, "train")["cost"] < 1
    with pytest.raises(ValueError, match="no probe at step 5"):
        replay_halving(study, 5, 3)
    with pytest.raises(ValueError, match="score must be"):
        replay_halving(study, 8, 3, "loss")
    with pytest.raises(ValueError, match="probes must be"):
        TuneConfig(compare, probes=[12]).validate()
    with pytest.raises(ValueError, match="rung_score must be"):
        TuneConfig(compare, rung_score="val").validate()
    with pytest.raises(ValueError, match="cooldown_fraction"):
        TuneConfig(compare, cooldown_fraction=0.0).validate()
