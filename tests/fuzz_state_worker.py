"""Loads mutated state dicts (tests/fuzz.py's MUTATIONS) into the test database's optimizers, one JSON line per case.

Run by tests/test_fuzz.py in a subprocess, so that a crash (a corrupted state reaching a kernel) fails the test
with the case that caused it instead of killing the test session: a ``"start"`` line is printed, flushed, before
each case and an ``"end"`` line with the outcome after it.

    python -m tests.fuzz_state_worker adamw lion8bit ...     (no names: every entry)
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

from .fuzz import MUTATIONS, all_finite, same, snapshot
from .optim_db import OPTIM_DB, make_batch, make_model


def _emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def run_case(spec, variant: int, mutation: str) -> dict[str, object]:
    kw = spec.variants[variant]
    source_model = make_model(seed=0)
    source = spec.make(source_model, dict(kw))
    for k in range(3):
        spec.step(source_model, source, *make_batch(seed=10 + k))
    mutated = MUTATIONS[mutation](source.state_dict())
    if mutated is None:
        return {"outcome": "n/a"}
    model = make_model(seed=0)
    target = spec.make(model, dict(kw))
    for k in range(2):
        spec.step(model, target, *make_batch(seed=20 + k))
    before = snapshot(target, model)
    result: dict[str, object] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target.load_state_dict(mutated)
    except ValueError as err:
        result["outcome"] = "clean_error"
        result["message"] = str(err)[:300]
    except Exception as err:  # noqa: BLE001 - any other exception is what the test reports
        result["outcome"] = "wrong_exception"
        result["message"] = f"{type(err).__name__}: {err}"[:300]
    else:
        result["outcome"] = "accepted"
    if result["outcome"] != "accepted" and not same(before, snapshot(target, model)):
        result["outcome"] = "changed_on_error"
    try:
        spec.step(model, target, *make_batch(seed=30))
        if not all_finite(model, target):
            result["after"] = "non-finite after the next step"
    except Exception as err:  # noqa: BLE001
        result["after"] = f"next step failed: {type(err).__name__}: {err}"[:300]
    return result


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    specs = [s for s in OPTIM_DB if not names or s.name in names]
    for spec in specs:
        for variant in range(len(spec.variants)):
            for mutation in MUTATIONS:
                case = {"entry": spec.name, "variant": variant, "mutation": mutation}
                _emit(phase="start", **case)
                _emit(phase="end", **case, **run_case(spec, variant, mutation))


if __name__ == "__main__":
    main(sys.argv[1:])
