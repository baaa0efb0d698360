"""`lmopt compare`: end to end on a tiny model, outputs, config round trip, divergence, measurement."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from lmopt.bench import compare as compare_mod  # noqa: E402
from lmopt.bench.compare import (  # noqa: E402
    COMPARE_RECIPES,
    CompareConfig,
    MemoryMeter,
    optimizer_state_bytes,
    train_step,
    warmup_cosine,
)
from lmopt.bench.corpus import (  # noqa: E402
    ByteTokenizer,
    gather_windows,
    load_corpus,
    train_batch_offsets,
    validation_windows,
)
from lmopt.bench.report import FILES, TABLE_COLUMNS  # noqa: E402
from lmopt.bench.workload import build_model  # noqa: E402
from lmopt.cli import main  # noqa: E402

TINY = ["--model", "tiny", "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--eval-windows", "4"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest, and far faster when the machine's cores are busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _write_corpus(folder: Path, files: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        body = "".join(f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(30))
        (folder / f"module_{i:02d}.py").write_text(body, encoding="utf-8")
    return folder


def _tiny_config(tmp_path: Path, optimizers: list[str], *, steps: int) -> CompareConfig:
    """A comparison of ``optimizers`` on the tiny model and a three-file corpus: seconds per optimizer."""
    return CompareConfig(
        optimizers=optimizers,
        model="tiny",
        steps=steps,
        batch_size=2,
        seq_len=32,
        eval_windows=2,
        data=str(_write_corpus(tmp_path / "corpus", files=3)),
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One CLI run on the default corpus: adamw, an optimizer whose weights blow up to inf (lmopt refuses the
    learning rates that would do it, lr > 1e6), then sgd."""
    out = tmp_path_factory.mktemp("compare") / "run"
    import io
    from contextlib import redirect_stdout

    from lmopt import registry

    class Exploding(torch.optim.SGD):
        """SGD whose weights turn NaN at its second step (what a diverging run does)."""

        @torch.no_grad()
        def step(self, closure=None):
            super().step(closure)
            self.steps = getattr(self, "steps", 0) + 1
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(float("nan") if self.steps >= 2 else 1.0)

    registry._load()
    spec = registry.OptimizerSpec("exploding", Exploding, "", "", lambda shape, dtype, hyper: [])
    buffer = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(buffer):
        mp.setitem(registry._REGISTRY, spec.name, spec)
        code = main(
            [
                "compare",
                "--optimizers",
                "adamw,exploding",
                "sgd",
                *TINY,
                "--set",
                "exploding.lr=1e-3",
                "--set",
                "sgd.lr=0.05",
                "--eval-every",
                "3",
                "--out",
                str(out),
            ]
        )
    return out, code, buffer.getvalue()


def test_cli_exit_code_and_table(run_dir):
    out, code, text = run_dir
    assert code == 0
    for column in TABLE_COLUMNS:
        assert column in text
    for name in ("adamw", "exploding", "sgd"):
        assert re.search(rf"\b{name}\b", text)
    assert "diverged" in text
    assert str(out / FILES["results_json"]) in text.replace("\n", "")


def test_png_plots_are_valid_images(run_dir):
    from matplotlib.image import imread

    out = run_dir[0]
    for key in ("loss_vs_step", "loss_vs_time"):
        path = out / FILES[key]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 500
        assert float(image[..., :3].std()) > 0.01  # something was drawn


def test_results_json_schema(run_dir):
    out = run_dir[0]
    results = json.loads((out / FILES["results_json"]).read_text())
    for key, kind in [
        ("schema_version", int),
        ("config", dict),
        ("environment", dict),
        ("data", dict),
        ("model", dict),
        ("schedule", dict),
        ("memory_method", str),
        ("skipped_optimizers", list),
        ("runs", list),
        ("files", dict),
        ("total_time_s", float),
        ("created_utc", str),
    ]:
        assert isinstance(results[key], kind), key
    assert results["config"]["optimizers"] == ["adamw", "exploding", "sgd"]
    assert results["config"]["hyperparameters"] == {"exploding": {"lr": 1e-3}, "sgd": {"lr": 0.05}}
    assert results["model"]["parameters"] > 0 and results["data"]["tokens_train"] > 1_000_000
    assert results["data"]["files_validation"] > 0 and len(results["data"]["sha256"]) == 64
    assert results["files"] == FILES
    by_name = {r["name"]: r for r in results["runs"]}
    assert list(by_name) == ["adamw", "exploding", "sgd"]
    for run in results["runs"]:
        for key in (
            "optimizer",
            "class",
            "hyperparameters",
            "schedule",
            "status",
            "steps_completed",
            "final_train_loss",
            "validation_loss",
            "tokens_per_second",
            "train_time_s",
            "optimizer_state_bytes",
            "peak_memory_bytes",
            "skipped_steps",
            "history",
            "validation_history",
        ):
            assert key in run, key
        history = run["history"]
        assert {len(v) for v in history.values()} == {run["steps_completed"]}
        assert history["step"] == list(range(1, run["steps_completed"] + 1))
        assert all(b >= a for a, b in zip(history["time_s"], history["time_s"][1:], strict=False))
    adamw, sgd = by_name["adamw"], by_name["sgd"]
    for ok in (adamw, sgd):
        assert ok["status"] == "ok" and ok["steps_completed"] == 6 and ok["skipped_steps"] == 0
        assert math.isfinite(ok["validation_loss"]) and ok["tokens_per_second"] > 0
        assert ok["peak_memory_bytes"] > 0
        assert ok["final_train_loss"] == pytest.approx(sum(ok["history"]["loss"]) / 6)
        assert ok["validation_history"]["step"] == [3, 6]
        assert ok["validation_history"]["loss"][-1] == ok["validation_loss"]
    # exact state: AdamW keeps two fp32 moments per parameter and an fp32 step per tensor; plain SGD nothing
    n_params, n_tensors = (
        results["model"]["parameters"],
        len(list(build_model("tiny", vocab_size=258, seq_len=32, seed=0).parameters())),
    )
    assert adamw["optimizer_state_bytes"] == 8 * n_params + 4 * n_tensors
    assert sgd["optimizer_state_bytes"] == 0
    assert adamw["hyperparameters"]["nonfinite"] == "skip"
    lrs, warmup = adamw["history"]["lr"], results["schedule"]["warmup_steps"]
    peak = COMPARE_RECIPES["adamw"]["lr"]
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[-1] == pytest.approx(0.1 * peak)  # warmup + cosine


def test_divergence_is_reported_and_others_continue(run_dir):
    out = run_dir[0]
    results = json.loads((out / FILES["results_json"]).read_text())
    adam = next(r for r in results["runs"] if r["name"] == "exploding")
    assert adam["status"] == "diverged" and "nan" in adam["message"].lower() + "inf"
    assert adam["steps_completed"] < 6 and adam["validation_loss"] is None
    sgd = next(r for r in results["runs"] if r["name"] == "sgd")
    assert sgd["status"] == "ok" and sgd["steps_completed"] == 6  # ran after the divergence
    assert "diverged" in (out / FILES["report_md"]).read_text()


def test_report_links_resolve(run_dir):
    out = run_dir[0]
    md = (out / FILES["report_md"]).read_text()
    targets = re.findall(r"\]\(([^)]+)\)", md)
    assert FILES["loss_vs_step"] in targets and FILES["loss_vs_time"] in targets
    assert FILES["results_json"] in targets
    page = (out / FILES["report_html"]).read_text()
    html_targets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert {FILES["loss_vs_step"], FILES["loss_vs_time"], FILES["results_json"]} <= set(html_targets)
    for target in [*targets, *html_targets]:
        assert (out / target).is_file(), target
    for name in ("adamw", "exploding", "sgd"):
        assert re.search(rf"^\| {name} \|", md, flags=re.MULTILINE)
        assert f"<td>{name}</td>" in page


def test_config_round_trip(tmp_path):
    data = _write_corpus(tmp_path / "corpus")
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert (
        main(
            [
                "compare",
                "--optimizers",
                "adamw,sgd",
                *TINY,
                "--data",
                str(data),
                "--seed",
                "3",
                "--set",
                "adamw.betas=[0.8,0.9]",
                "--out",
                str(first),
            ]
        )
        == 0
    )
    a = json.loads((first / FILES["results_json"]).read_text())
    assert main(["compare", "--config", str(first / FILES["results_json"]), "--out", str(second)]) == 0
    b = json.loads((second / FILES["results_json"]).read_text())
    assert a["config"] == b["config"]
    assert CompareConfig.from_dict(a).to_dict() == a["config"]
    assert a["data"]["sha256"] == b["data"]["sha256"]
    for run_a, run_b in zip(a["runs"], b["runs"], strict=True):
        assert run_a["hyperparameters"] == run_b["hyperparameters"]
        assert run_a["history"]["loss"] == pytest.approx(run_b["history"]["loss"], rel=1e-5)
        assert run_a["validation_loss"] == pytest.approx(run_b["validation_loss"], rel=1e-5)
    assert a["runs"][0]["hyperparameters"]["betas"] == [0.8, 0.9]
    # options given beside --config override the file
    assert (
        main(
            [
                "compare",
                "--config",
                str(first / FILES["results_json"]),
                "--steps",
                "3",
                "--optimizers",
                "sgd",
                "--out",
                str(third),
            ]
        )
        == 0
    )
    c = json.loads((third / FILES["results_json"]).read_text())
    assert c["config"]["steps"] == 3 and c["config"]["optimizers"] == ["sgd"]
    assert c["config"]["seed"] == 3 and c["runs"][0]["steps_completed"] == 3


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["compare", "--optimizers", "adamx", *TINY, "--out", str(tmp_path / "x")]) == 2
    assert "adamw" in capsys.readouterr().err  # close match offered
    assert main(["compare", "--optimizers", "sgd", "--set", "sgd.bogus=1", *TINY, "--out", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["compare", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert main(["compare", "--set", "lr=1", "--out", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="unknown compare config keys"):
        CompareConfig.from_dict({"stepz": 3})


def test_default_set_skips_unregistered_names(monkeypatch):
    monkeypatch.setattr(compare_mod, "DEFAULT_OPTIMIZERS", ("adamw", "not_an_optimizer", "sgd"))
    names, skipped = compare_mod.default_optimizer_names()
    assert names == ["adamw", "sgd"]
    assert skipped == [{"name": "not_an_optimizer", "reason": "not registered in this lmopt build"}]
    all_names, _ = compare_mod.resolve_optimizer_names(["all"])
    assert "adamw" in all_names and "sgd" in all_names


def test_warmup_cosine():
    f = lambda s: warmup_cosine(s, total_steps=100, warmup_steps=10, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 99))
    assert warmup_cosine(0, total_steps=5, warmup_steps=0, min_ratio=0.0) == pytest.approx(1.0)


def test_train_step_skips_and_counts_non_finite_gradients():
    model = build_model("tiny", vocab_size=258, seq_len=16, seed=0)
    batch = torch.randint(0, 256, (2, 16))
    first = next(model.parameters())
    handle = first.register_hook(lambda g: g * float("nan"))
    import lmopt

    opt = lmopt.create_optimizer("adamw", model, lr=1e-3, nonfinite="skip")
    before = [p.detach().clone() for p in model.parameters()]
    outcome = train_step(model, opt, batch, max_grad_norm=1.0)
    assert outcome.skipped and math.isfinite(outcome.loss) and not math.isfinite(outcome.grad_norm)
    assert opt.skipped_steps == 1 and len(opt.state) == 0
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert train_step(model, sgd, batch, max_grad_norm=1.0).skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    handle.remove()
    outcome = train_step(model, opt, batch, max_grad_norm=1.0)
    assert not outcome.skipped and opt.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_optimizer_state_bytes_counts_shared_storage_once():
    params = [torch.nn.Parameter(torch.randn(10, 10)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.Adam(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * 4 * 105 + 2 * 4  # exp_avg, exp_avg_sq, fp32 step each
    opt.state[params[1]]["alias"] = opt.state[params[0]]["exp_avg"][0]  # a view: same storage
    assert optimizer_state_bytes(opt) == 2 * 4 * 105 + 2 * 4


def test_optimizer_state_bytes_includes_lookahead_inner_state(tmp_path):
    from lmopt.memory.measure import optimizer_state_bytes as library_state_bytes
    from lmopt.optim.lookahead import Lookahead

    params = [torch.nn.Parameter(torch.randn(10, 10)), torch.nn.Parameter(torch.randn(5))]
    opt = Lookahead(torch.optim.AdamW(params), k=2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    # slow weights + exp_avg + exp_avg_sq per parameter, and the inner optimizer's fp32 step per tensor
    assert optimizer_state_bytes(opt) == 3 * 4 * 105 + 2 * 4 == library_state_bytes(opt)
    # in the results: Lookahead-AdamW holds AdamW's state and one fp32 slow copy of the weights on top
    results = compare_mod.run_compare(_tiny_config(tmp_path, ["lookahead_adamw", "adamw"], steps=2))
    lookahead, adamw = results["runs"]
    assert lookahead["status"] == adamw["status"] == "ok"
    n_params = results["model"]["parameters"]
    assert lookahead["optimizer_state_bytes"] == adamw["optimizer_state_bytes"] + 4 * n_params


def test_memory_meter_sees_a_large_allocation():
    meter = MemoryMeter(torch.device("cpu"))
    meter.start()
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    growth, absolute = meter.peak()
    del block
    if meter.kind == "rss":
        assert growth >= 48 * 1024 * 1024 and absolute >= growth
    else:
        assert absolute > 0


def test_corpus_split_rules_and_batches(tmp_path):
    folder = _write_corpus(tmp_path / "many", files=60)
    corpus = load_corpus(folder)
    assert corpus.split.startswith("by file") and corpus.files_validation > 0
    assert corpus.files_train + corpus.files_validation == 60
    assert corpus.vocab_size == ByteTokenizer.vocab_size
    eos = ByteTokenizer.eos_id
    assert int((corpus.train == eos).sum()) == corpus.files_train
    assert int((corpus.validation == eos).sum()) == corpus.files_validation
    assert load_corpus(folder).describe() == corpus.describe()  # deterministic
    single = load_corpus(folder / "module_00.py")
    assert single.split.startswith("by position")
    total = single.train.numel() + single.validation.numel()
    assert single.validation.numel() == total - round(total * 0.9)
    offsets = train_batch_offsets(corpus.train, steps=3, batch_size=4, seq_len=16, seed=7)
    assert torch.equal(offsets, train_batch_offsets(corpus.train, steps=3, batch_size=4, seq_len=16, seed=7))
    windows = gather_windows(corpus.train, offsets[0], 16)
    assert windows.shape == (4, 16) and windows.dtype == torch.int64
    assert torch.equal(windows[0], corpus.train[offsets[0, 0] : offsets[0, 0] + 16].long())
    val = validation_windows(corpus.validation, seq_len=16, max_windows=3)
    n = corpus.validation.numel()
    assert val.shape == (3, 16) and torch.equal(val[0], corpus.validation[:16].long())
    assert torch.equal(val[-1], corpus.validation[n - 16 :].long())  # spread over the whole stream
    assert torch.equal(val[1], corpus.validation[round((n - 16) / 2) :][:16].long())
    with pytest.raises(ValueError, match="seq_len"):
        validation_windows(corpus.validation, seq_len=10**9, max_windows=1)
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "missing")


def test_local_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    folder = _write_corpus(tmp_path / "corpus", files=2)
    model = tokenizers.models.WordLevel(unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "<eos>"])
    tok.train([str(p) for p in sorted(folder.iterdir())], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    corpus = load_corpus(folder, tokenizer=tmp_path / "tok")
    assert corpus.vocab_size == tok.get_vocab_size()
    assert corpus.tokenizer == str(tmp_path / "tok")
    eos = tok.token_to_id("<eos>")
    stream = torch.cat([corpus.train, corpus.validation])
    assert int((stream == eos).sum()) == 2 and int(stream.max()) < corpus.vocab_size
    assert stream.numel() < 2 * 30 * 12  # words, not bytes
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(folder, tokenizer=tmp_path / "nowhere")


def test_schedule_free_gets_no_schedule_and_a_failing_optimizer_is_reported(monkeypatch, tmp_path):
    schedulefree = pytest.importorskip("schedulefree")
    from lmopt import registry
    from lmopt.bench.compare import run_compare

    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("boom")

    registry._load()
    no_state = lambda shape, dtype, hyper: []  # noqa: E731
    for spec in (
        registry.OptimizerSpec("sf_test", schedulefree.AdamWScheduleFree, "", "", no_state),
        registry.OptimizerSpec("broken_test", Broken, "", "", no_state, defaults={"lr": 0.1}),
    ):
        monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    config = _tiny_config(tmp_path, ["sf_test", "broken_test", "sgd"], steps=4)
    sf, broken, sgd = run_compare(config)["runs"]
    assert sf["status"] == "ok" and sf["schedule"].startswith("none (Schedule-Free")
    assert sf["hyperparameters"]["warmup_steps"] == config.resolved_warmup_steps
    assert len(set(sf["history"]["lr"])) == 1  # no LR scheduler on top of Schedule-Free
    assert math.isfinite(sf["validation_loss"]) and sf["optimizer_state_bytes"] > 0
    assert broken["status"] == "error" and "boom" in broken["message"] and broken["steps_completed"] == 0
    assert sgd["status"] == "ok" and sgd["steps_completed"] == 4
