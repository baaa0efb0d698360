"""Generated bad inputs over every spec of the test database (tests/fuzz.py has the generators).

* every hyperparameter of every entry, with every value of ``BAD_VALUES``: a ValueError / TypeError that names
  the argument, or accepted and training stays finite;
* every layout of ``LAYOUTS`` (the entry's ``layouts``), with every implementation the entry has: equal to the
  same values in contiguous tensors, or a clear error for an explicit implementation that does not apply;
* every mutation of ``MUTATIONS`` (the entry's ``mutations``) of a real state dict: ``load_state_dict`` raises
  ValueError and leaves the optimizer bit-identical; run in subprocesses (tests/fuzz_state_worker.py) so that a
  crash names its case instead of killing the session;
* non-finite gradients at generated positions, in every layout: state and parameters bit-identical under
  ``nonfinite="raise"`` and ``"skip"``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmopt
from lmopt.optim.base import NonFiniteGradientError

from .fuzz import (
    LAYOUTS,
    MUTATIONS,
    LayoutModel,
    all_finite,
    hyperparameter_cases,
    names_argument,
    run_layout,
    same,
    snapshot,
)
from .optim_db import OPTIM_DB, OptimSpec, make_batch, make_model
from .test_distributed import clean_environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only add overhead (and contention on 2-core CI machines)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _signature_hyperparameters(spec: OptimSpec) -> dict:
    registry_spec, implied = lmopt.registry.resolve_name(spec.name)
    return registry_spec.hyperparameters(**{**implied, **spec.variants[0]})


# ------------------------------------------------------------------------------------------------ hyperparameters
BAD_LABELS = sorted({label for _k, label, _v in hyperparameter_cases({"x": 0.5})})


@pytest.mark.parametrize("spec", OPTIM_DB, ids=[s.name for s in OPTIM_DB])
def test_generated_hyperparameters_error_clearly_or_train_finitely(spec: OptimSpec):
    problems, cases = [], 0
    for key, label, value in hyperparameter_cases(_signature_hyperparameters(spec), spec.fuzz_skip):
        cases += 1
        model = make_model()
        try:
            opt = spec.make(model, {**spec.variants[0], key: value})
        except (ValueError, TypeError) as err:
            if not names_argument(str(err), key):
                problems.append(f"{key}={label}: {type(err).__name__} does not name {key!r}: {err}")
            continue
        except Exception as err:  # noqa: BLE001
            problems.append(f"{key}={label}: {type(err).__name__} at construction: {err}")
            continue
        try:
            for k in range(2):
                spec.step(model, opt, *make_batch(seed=k))
        except Exception as err:  # noqa: BLE001
            problems.append(f"{key}={label}: accepted, then the step raised {type(err).__name__}: {err}"[:300])
            continue
        if not all_finite(model, opt):
            problems.append(f"{key}={label}: accepted, and training became non-finite")
    assert cases >= 3 * len(BAD_LABELS), cases  # the generator reached the entry's hyperparameters
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------------- layouts
def _implementations(spec: OptimSpec) -> list[tuple[str, dict]]:
    runs = [(f"variant{i}", dict(v)) for i, v in enumerate(spec.variants)]
    runs += [(impl, {**spec.variants[0], "implementation": impl}) for impl in spec.implementations]
    return runs


LAYOUT_CASES = [(spec, layout) for spec in OPTIM_DB for layout in spec.layouts]


@pytest.mark.parametrize(
    ("spec", "layout"), LAYOUT_CASES, ids=[f"{spec.name}-{layout}" for spec, layout in LAYOUT_CASES]
)
def test_layouts_equal_the_contiguous_run(spec: OptimSpec, layout: str):
    """Layouts change only where values live; the update must not change. Tolerance: fp32 reductions (norms, row
    means, Newton-Schulz matmuls) may run in another order over the strided memory: relative 1e-5 after 5 steps.
    Quantized state: a value that moves by an ulp can round to the neighbouring code, moving that element by at
    most one code step, so at most 2% of elements may differ by up to 2 * lr * steps."""
    case = LAYOUTS[layout]
    for label, kw in _implementations(spec):
        make = lambda model, kw=kw: spec.make(model, dict(kw))  # noqa: E731
        try:
            got, opt = run_layout(make, case, plain=False)
        except ValueError as err:  # an explicit implementation that does not apply says so
            assert "implementation" in kw and "does not apply" in str(err), f"{label}: {err}"
            continue
        want, _ = run_layout(make, case, plain=True)
        assert got.shape == want.shape
        assert torch.isfinite(got).all(), f"{label}: non-finite parameter"
        if got.numel() == 0:
            continue
        close = torch.isclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))
        quantized = any(name.endswith("_codes") for st in opt.state.values() for name in st)
        if not quantized or close.float().mean() < 0.98:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, label=label: f"{label}: {m}")
        else:
            lr = float(opt.param_groups[0]["lr"] or 1.0)
            assert (got - want).abs().max() <= 2 * lr * 5, label


# ----------------------------------------------------------------------------------------------------- mutations
def _worker(names: list[str]) -> subprocess.Popen:
    env = {**clean_environment(), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fuzz_state_worker", *names],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_mutated_state_dicts_are_refused_without_a_change_or_a_crash():
    names = [spec.name for spec in OPTIM_DB]
    workers = [_worker(names[i::2]) for i in range(2)]  # the CI machines have 2 cores
    rows, problems = [], []
    for proc in workers:
        out, err = proc.communicate(timeout=900)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        ends = [r for r in lines if r["phase"] == "end"]
        rows += ends
        if proc.returncode != 0:
            last = lines[-1] if lines else {}
            problems.append(f"worker died (exit {proc.returncode}) in case {last}: {err[-2000:]}")
    expected = {spec.name: set(spec.mutations) for spec in OPTIM_DB}
    applicable: dict[str, int] = {}
    for row in rows:
        if row["mutation"] not in expected[row["entry"]] or row["outcome"] == "n/a":
            continue
        applicable[row["entry"]] = applicable.get(row["entry"], 0) + 1
        where = f"{row['entry']}[{row['variant']}] {row['mutation']}"
        if row["outcome"] != "clean_error":
            problems.append(f"{where}: {row['outcome']} {row.get('message', '')}")
        if row.get("after"):
            problems.append(f"{where}: {row['after']}")
    assert not problems, "\n".join(problems[:60])
    # every entry met most mutations (a state dict without tensors would make this test vacuous)
    thin = {name: n for name, n in applicable.items() if n < 15}
    assert set(applicable) == set(expected) and not thin, thin
    assert len(MUTATIONS) >= 30


# ------------------------------------------------------------------------------------------- non-finite gradients
NONFINITE_CASES = [
    (spec, layout, policy)
    for spec in OPTIM_DB
    if spec.lmopt_engine
    for layout in spec.layouts
    if layout != "zero_size"
    for policy in ("raise", "skip")
]


@pytest.mark.parametrize(
    ("spec", "layout", "policy"),
    NONFINITE_CASES,
    ids=[f"{s.name}-{layout}-{policy}" for s, layout, policy in NONFINITE_CASES],
)
def test_nonfinite_gradients_leave_everything_bit_identical(spec: OptimSpec, layout: str, policy: str):
    case = LAYOUTS[layout]
    model = LayoutModel(case.param(False))
    shape = tuple(model.w.shape)
    opt = spec.make(model, {**spec.variants[0], "nonfinite": policy})
    gen = torch.Generator().manual_seed(hash((spec.name, layout)) % 2**31)
    for k in range(3):
        model.w.grad = case.grad(model.w, k, False, shape)
        model.matrix.grad = torch.randn(6, 5, generator=gen)
        model.bias.grad = torch.randn(5, generator=gen)
        bad = k == 2
        if bad:  # a generated position in a generated tensor, inf or NaN
            target = [model.w, model.matrix, model.bias][int(torch.randint(3, (1,), generator=gen))]
            grad = target.grad.clone()  # writable (an expanded gradient is not)
            flat = grad.view(-1) if grad.is_contiguous() else grad.reshape(-1)
            value = [float("nan"), float("inf"), float("-inf")][int(torch.randint(3, (1,), generator=gen))]
            flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = value
            target.grad = flat.view(grad.shape) if grad.is_contiguous() else flat.reshape(grad.shape)
            before = snapshot(opt, model)
            skipped = opt.skipped_steps
            if policy == "raise":
                with pytest.raises(NonFiniteGradientError):
                    opt.step()
            else:
                opt.step()
                assert opt.skipped_steps == skipped + 1
            assert same(before, snapshot(opt, model))
        else:
            opt.step()
    assert all_finite(model, opt)


def test_fuzz_tables_cover_every_entry():
    """New entries inherit every layout and mutation; an entry that opts out names what it leaves out."""
    for spec in OPTIM_DB:
        assert set(spec.layouts) <= set(LAYOUTS) and set(spec.mutations) <= set(MUTATIONS), spec.name
        assert set(spec.layouts) == set(LAYOUTS), f"{spec.name} leaves out layouts {set(LAYOUTS) - set(spec.layouts)}"
        assert set(spec.mutations) == set(MUTATIONS), spec.name
