"""``lmopt checkpoint``: convert a checkpoint between the single-file and the sharded (DCP) layout, or show one."""

from __future__ import annotations

import argparse
import json

NAME = "checkpoint"
HELP = "convert a checkpoint between one file and the sharded (torch.distributed.checkpoint) layout, or show it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    convert = sub.add_parser(
        "convert",
        help="single file (step-N.pt) -> sharded directory, or sharded directory -> single file",
        description="Convert SRC to the other layout at DST (the layout follows SRC: a file becomes a sharded "
        "directory, a sharded directory one file). Verified on read and written atomically.",
    )
    convert.add_argument("src", metavar="SRC", help="a checkpoint file or a sharded checkpoint directory")
    convert.add_argument("dst", metavar="DST", help="where the converted checkpoint goes (must not exist)")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    info = sub.add_parser("info", help="print a checkpoint's manifest (either layout)")
    info.add_argument("path", metavar="PATH", help="a checkpoint file or a sharded checkpoint directory")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..train import convert_checkpoint
    from ..train.checkpoint import read_manifest
    from ..train.dcp import read_sharded_manifest

    if args.action == "convert":
        out = convert_checkpoint(args.src, args.dst, overwrite=args.overwrite)
        layout = "sharded directory" if out.is_dir() else "single file"
        print(f"wrote {out} ({layout})")
        return 0
    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    manifest = read_sharded_manifest(path) if path.is_dir() else read_manifest(path)
    if "files" in manifest:
        manifest = {**manifest, "files": {k: v["size"] for k, v in manifest["files"].items()}}
    print(json.dumps(manifest, indent=1))
    return 0
