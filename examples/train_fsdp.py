"""Train the compare model (a small Llama, lmopt.bench) with FSDP2 under torchrun, with sharded checkpoints.

Run (CPU, 2 processes, gloo; on GPUs the same command uses nccl):

    torchrun --nproc-per-node 2 examples/train_fsdp.py --steps 200 --checkpoint-dir ckpt

Stop it at any point (Ctrl-C, SIGTERM: it saves a checkpoint first; SIGKILL: the last complete checkpoint
stays) and start it again with any number of processes: it resumes from the newest checkpoint in
``--checkpoint-dir`` (:class:`lmopt.train.CheckpointManager` writes the sharded layout through
``torch.distributed.checkpoint`` when more than one process runs, and reads either layout back at any world
size). Without torchrun it runs as one process on an unsharded model.

Data parallelism: every step takes one global batch of ``--batch`` windows of the corpus (the same on every rank,
chosen by the step number, so the data position is the step); rank ``r`` of ``W`` trains on rows ``r::W``, and
FSDP2 averages the gradients, so the update does not depend on the world size. The logged loss is the mean over
ranks. The learning rate follows warmup + cosine (lmopt.schedules); clipping uses the global norm over all shards.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import lmopt
from lmopt import schedules
from lmopt.bench.corpus import load_corpus
from lmopt.bench.workload import build_model
from lmopt.train import CheckpointManager, PreemptionHandler


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps (counting those before a resume)")
    p.add_argument("--optimizer", default="adamw", help="any `lmopt list` name (default adamw)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--model", default="tiny", help="tiny | small | base | medium | large (lmopt.bench sizes)")
    p.add_argument("--batch", type=int, default=8, help="global batch (windows per step; divisible by the ranks)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--data", default=None, help="a text file or folder (default: lmopt's own sources)")
    p.add_argument("--checkpoint-dir", default="ckpt")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument(
        "--run-steps", type=int, default=None, help="stop after this many steps in this run (a time-limited job)"
    )
    p.add_argument("--loss-log", default=None, help="append one JSON line per step here (rank 0)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def setup() -> torch.device:
    if "RANK" not in os.environ:
        return torch.device("cpu")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main() -> None:
    args = parse()
    device = setup()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the {world} processes")
    corpus = load_corpus(args.data or Path(lmopt.__file__).parent)
    tokens = corpus.train
    model = build_model(args.model, vocab_size=corpus.vocab_size, seq_len=args.seq_len, seed=args.seed, device=device)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # each decoder layer its own FSDP unit, then the rest
            fully_shard(layer)
        fully_shard(model)
    optimizer = lmopt.create_optimizer(args.optimizer, model, lr=args.lr)
    scheduler = schedules.scheduler(optimizer, schedules.warmup_cosine(args.warmup, args.steps))
    manager = CheckpointManager(args.checkpoint_dir, keep_last=args.keep_last)
    state = manager.load_latest(model=model, optimizer=optimizer, scheduler=scheduler)
    step = state.step if state is not None else 0
    if rank == 0:
        where = f"resumed from {state.path} (step {step})" if state is not None else "from scratch"
        print(f"{world} process(es), {args.optimizer}, {sum(p.numel() for p in model.parameters()):,} params, {where}")

    def save() -> None:
        path = manager.save(step, model=model, optimizer=optimizer, scheduler=scheduler, data_position=step)
        if rank == 0:
            print(f"saved {path}", flush=True)

    last = args.steps if args.run_steps is None else min(args.steps, step + args.run_steps)
    log = open(args.loss_log, "a") if args.loss_log and rank == 0 else None  # noqa: SIM115 (closed at the end)
    with PreemptionHandler() as preempt:
        while step < last:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # the batch of this step
            starts = torch.randint(0, tokens.numel() - args.seq_len - 1, (args.batch,), generator=g)[rank::world]
            windows = torch.stack([tokens[s : s + args.seq_len + 1] for s in starts.tolist()]).long().to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=windows[:, :-1], labels=windows[:, :-1].clone()).loss
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the global norm over all shards
            optimizer.step()
            scheduler.step()
            step += 1
            mean = loss.detach().clone()
            if world > 1:
                dist.all_reduce(mean)
                mean /= world
            if rank == 0:
                full_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                line = {"step": step, "loss": mean.item(), "grad_norm": float(full_norm), "time": time.time()}
                print(f"step {step} loss {line['loss']:.4f}", flush=True)
                if log is not None:
                    log.write(json.dumps(line) + "\n")
                    log.flush()
            stop = preempt.requested is not None
            if dist.is_initialized():  # every rank stops together when any one was signalled
                flag = torch.tensor([float(stop)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if step % args.checkpoint_every == 0 or step == last or stop:
                save()
            if stop:
                break
    if log is not None:
        log.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
