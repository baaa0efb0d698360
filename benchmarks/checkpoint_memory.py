"""Peak memory and time of a checkpoint save and load: lmopt.train vs plain torch.save / torch.load (the peer).

Each operation runs in a fresh subprocess (peak RSS is per process). The model is an fp32 MLP of ``--mb``
megabytes with an AdamW state (3x the model in the checkpoint). Reported: the peak RSS above the process's RSS
once the model and optimizer exist (i.e. what the save / load itself costs), median of ``--repeats`` runs.

    python benchmarks/checkpoint_memory.py --mb 200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import resource, sys, time, json, torch
import lmopt
from lmopt.train import load_checkpoint, save_checkpoint
mb, op, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.manual_seed(0)
width = 1024
layers = max(1, mb * 2**20 // (width * width * 4))
model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
opt = lmopt.create_optimizer("adamw", model, lr=1e-3, implementation="foreach")
for p in model.parameters():
    p.grad = torch.ones_like(p)
opt.step()
for p in model.parameters():
    p.grad = None
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if op == "lmopt_save":
    save_checkpoint(path, step=1, model=model, optimizer=opt)
elif op == "lmopt_load":
    load_checkpoint(path, model=model, optimizer=opt)
elif op == "torch_save":
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
elif op == "torch_load":
    sd = torch.load(path, weights_only=True)
    model.load_state_dict(sd["model"]); opt.load_state_dict(sd["optimizer"])
elapsed = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mib": (peak - base) / 1024, "seconds": elapsed}))
"""


def _run(mb: int, op: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(mb), op, str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{op} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="model size in MB (fp32); the checkpoint is ~3x")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for op, path in [
            ("torch_save", "t.pt"),
            ("torch_load", "t.pt"),
            ("lmopt_save", "l.pt"),
            ("lmopt_load", "l.pt"),
        ]:
            runs = [_run(args.mb, op, Path(tmp) / path) for _ in range(args.repeats)]
            rows[op] = {k: statistics.median(r[k] for r in runs) for k in ("extra_mib", "seconds")}
            if op.endswith("save"):
                rows[op]["file_mib"] = (Path(tmp) / path).stat().st_size / 2**20
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{'operation':<12} {'file MiB':>9} {'extra peak RSS MiB':>19} {'seconds':>8}")
    for op, r in rows.items():
        file_mib = f"{r['file_mib']:.0f}" if "file_mib" in r else ""
        print(f"{op:<12} {file_mib:>9} {r['extra_mib']:>19.0f} {r['seconds']:>8.2f}")
    for kind in ("save", "load"):
        ours, theirs = rows[f"lmopt_{kind}"], rows[f"torch_{kind}"]
        print(
            f"{kind}: lmopt / torch extra memory {ours['extra_mib'] / max(theirs['extra_mib'], 1):.2f}x, "
            f"time {ours['seconds'] / theirs['seconds']:.2f}x"
        )


if __name__ == "__main__":
    main()
