"""Check a successive-halving stopping rule against the full grid, from one ``lmopt tune`` run with probes.

Run the full grid once with probes (every trial records both rung scores at those steps, nothing is stopped)::

    lmopt tune --rungs 1 --probes 20,40,60 --threads 1 --out runs/probes

then replay, for each rung step, ``eta`` and score (``cooldown``: validation loss after a linear LR cooldown
branch; ``train``: the recent training loss), one rung of successive halving over each optimizer's trials
(:func:`lmopt.bench.tune.replay_halving`): does the search still pick the full grid's best learning rate, how
much validation loss does a wrong pick cost (regret), and what fraction of the full grid's steps does it spend?

Usage:
    python benchmarks/tune_stopping_rule.py runs/probes/tune.json [--eta 2,3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmopt.bench.tune import replay_halving


def replay(result: dict, etas: list[int]) -> list[dict]:
    """One row per (score, rung step, eta): picks that match the full grid, regret and cost over the studies."""
    studies = [s for s in result["studies"] if s.get("best_lr") is not None]
    steps = sorted({p["step"] for s in studies for t in s["trials"] for p in t.get("probes", [])})
    if not steps:
        raise SystemExit("this tune.json has no probes: run lmopt tune --rungs 1 --probes 20,40,60 first")
    rows = []
    for score in ("cooldown", "train"):
        for step in steps:
            for eta in etas:
                outcomes = {s["label"]: replay_halving(s, step, eta, score) for s in studies}
                regrets = [o["regret"] for o in outcomes.values()]
                rows.append(
                    {
                        "score": score,
                        "at_step": step,
                        "eta": eta,
                        "matches": sum(o["pick"] == o["best"] for o in outcomes.values()),
                        "studies": len(outcomes),
                        "mean_regret": statistics.fmean(regrets),
                        "max_regret": max(regrets),
                        "worst": max(outcomes, key=lambda k: outcomes[k]["regret"]),
                        "mean_cost": statistics.fmean(o["cost"] for o in outcomes.values()),
                        "picks": {k: (o["pick"], o["best"]) for k, o in outcomes.items()},
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tune_json", type=Path)
    parser.add_argument("--eta", default="2,3", help="comma-separated eta values (default 2,3)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    result = json.loads(args.tune_json.read_text())
    rows = replay(result, [int(e) for e in args.eta.split(",")])
    env = result.get("environment", {})
    table = Table(title=f"successive halving replayed on {args.tune_json} ({env.get('processor', 'machine unknown')})")
    for column in ("score", "rung at", "eta", "same pick", "mean regret", "max regret (who)", "cost"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["score"],
            str(r["at_step"]),
            str(r["eta"]),
            f"{r['matches']}/{r['studies']}",
            f"{r['mean_regret']:.4f}",
            f"{r['max_regret']:.4f} ({r['worst']})",
            f"{r['mean_cost']:.2f}",
        )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
