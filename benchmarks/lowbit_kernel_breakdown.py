"""Where the CPU low-bit kernel's time goes, beside torch's fused fp32 AdamW (one process, this machine).

Calls the kernel directly (no Python optimizer around it) on ~50M elements split into 10 tensors, and on a
cache-resident problem (10 tensors of 65536 elements stepped repeatedly until as many element-updates are done),
in two builds of the same source: the real one, and one compiled with ``-DLMOPT_BENCH_SKIP_QUANTIZE`` that stops
after the first pass (moments decoded and updated, parameter written, no new codes). The cache-resident rows
measure arithmetic alone; when they are as slow as the 50M rows the step is compute-bound, not memory-bound.

Usage:
    python benchmarks/lowbit_kernel_breakdown.py [--threads 2]   # writes results/lowbit_kernel_breakdown.md
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

N = 50_000_000
TENSORS = 10


def _jobs(lib_module, n: int, bits: int):
    import torch

    from lmopt.kernels.lowbit import qmap_struct as _qmap_struct

    block = 256 if bits == 8 else 128
    qm, qv = ("de8s", "de8u") if bits == 8 else ("de4s", "lin4u")
    nb = (n + block - 1) // block
    cb = n if bits == 8 else (n + 1) // 2
    g = torch.Generator().manual_seed(0)
    keep = []
    jobs = (lib_module.JobStruct * TENSORS)()
    for j in range(TENSORS):
        t = dict(
            p=torch.randn(n, generator=g),
            g=torch.randn(n, generator=g) * 1e-3,
            mc=torch.zeros(cb, dtype=torch.uint8),
            vc=torch.zeros(cb, dtype=torch.uint8),
            ms=torch.zeros(nb),
            vs=torch.zeros(nb),
        )
        keep.append(t)
        job = jobs[j]
        job.p, job.g, job.n = t["p"].data_ptr(), t["g"].data_ptr(), n
        job.m_codes, job.m_scales = t["mc"].data_ptr(), t["ms"].data_ptr()
        job.v_codes, job.v_scales = t["vc"].data_ptr(), t["vs"].data_ptr()
        job.step_size, job.inv_bc2, job.key = 1e-3, 1.0, 1
    cfg = lib_module.ConfigStruct(
        algo=0,
        p_bf16=0,
        g_bf16=0,
        block=block,
        decoupled=1,
        maximize=0,
        rounding=0,
        has_wd=1,
        beta1=0.9,
        beta2=0.95,
        omb1=0.1,
        omb2=0.05,
        eps=1e-8,
        wd=0.1,
        lrwd=1e-4,
        lr=1e-3,
        qm=_qmap_struct(qm),
        qv=_qmap_struct(qv),
    )
    return cfg, jobs, keep


def worker(bits: int, resident: bool, threads: int) -> dict:
    import lmopt.kernels.lowbit as K

    lib = K.load()
    n = 65536 if resident else N // TENSORS  # resident: 10 x 65536 fp32 p + g = 5 MiB, within L2 + L3
    repeats = N // (n * TENSORS)
    cfg, jobs, keep = _jobs(K, n, bits)
    times = []
    for _ in range(13):
        t = time.perf_counter()
        for _ in range(repeats):
            lib.lmopt_lowbit_step(ctypes.byref(cfg), jobs, TENSORS, threads)
        times.append(time.perf_counter() - t)
    return {"ms": 1e3 * statistics.median(times[3:])}


def torch_fused(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    params = [torch.nn.Parameter(torch.randn(N // TENSORS)) for _ in range(TENSORS)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)
    times = []
    for _ in range(13):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[3:])


def _spawn(args: list[str], flags: str) -> dict:
    env = {**os.environ, "LMOPT_KERNEL_CFLAGS": flags}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("{")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lowbit_kernel_breakdown.md")
    parser.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--torch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    if args.torch:
        print(json.dumps({"ms": torch_fused(args.threads)}))
        return 0
    import torch
    from harness import machine_description

    base = _spawn(["--torch", "--threads", str(args.threads)], "")["ms"]
    rows = [f"| torch.optim.AdamW fused, fp32 state | - | {base:.1f} | 1.00 |"]
    for bits in (8, 4):
        for resident in (False, True):
            for label, flags in (
                ("whole step", ""),
                ("first pass only (no quantization)", "-DLMOPT_BENCH_SKIP_QUANTIZE"),
            ):
                ms = _spawn(["--worker", str(bits), str(int(resident)), str(args.threads)], flags)["ms"]
                where = "cache-resident (10 x 65536, repeated)" if resident else "50M in memory"
                rows.append(f"| lmopt AdamW{bits}bit kernel: {label} | {where} | {ms:.1f} | {ms / base:.2f} |")
                print(rows[-1], flush=True)
    lines = [
        "# CPU low-bit kernel: where the time goes",
        "",
        f"- machine: {machine_description()}",
        f"- {args.threads} threads; 50M element-updates per row (10 tensors); median of 10 after 3 warm-ups",
        f"- torch {torch.__version__}; command: "
        f"`python benchmarks/lowbit_kernel_breakdown.py --threads {args.threads}`",
        "",
        "| what | data | ms | ratio to torch fused |",
        "|---|---|---|---|",
        *rows,
        "",
        "Cache-resident rows do the same arithmetic on data that stays in the L2/L3 caches: little memory traffic "
        "to wait for.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
