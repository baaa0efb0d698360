"""The ``lmopt`` command turns every expected failure into one line on stderr and a non-zero exit: bad numbers
(each numeric option's range, nan / inf), unreadable inputs, unwritable plot paths, checkpoint errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmopt import cli
from lmopt.cli._args import integer, number
from lmopt.train import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def _fails(argv: list[str], capsys, *needles: str) -> str:
    with pytest.raises(SystemExit) as exit_info:  # argparse exits; run() errors return a status
        raise SystemExit(cli.main(argv))
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lmopt {argv[0]}: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


BAD_NUMBERS = [
    (["schedule", "cosine", "--total", "100", "--peak", "inf"], "--peak", "finite"),
    (["schedule", "cosine", "--total", "100", "--peak", "nan"], "--peak", "finite"),
    (["schedule", "cosine", "--total", "100", "--peak", "0"], "--peak", "> 0"),
    (["schedule", "cosine", "--total", "100", "--peak=-1e-3"], "--peak", "> 0"),
    (["schedule", "cosine", "--total", "0"], "--total", ">= 1"),
    (["schedule", "cosine", "--total", "1e3"], "--total", "integer"),
    (["schedule", "cosine", "--total", "100", "--warmup", "-1"], "--warmup", ">= 0"),
    (["schedule", "cosine", "--total", "100", "--min-lr-ratio", "1.5"], "--min-lr-ratio", "<= 1"),
    (["schedule", "cosine", "--total", "100", "--min-lr-ratio=-inf"], "--min-lr-ratio", "finite"),
    (["schedule", "wsd", "--total", "100", "--decay-steps", "-3"], "--decay-steps", ">= 0"),
    (["schedule", "sgdr", "--t0", "0"], "--t0", ">= 1"),
    (["schedule", "sgdr", "--t-mult", "0"], "--t-mult", ">= 1"),
    (["schedule", "inverse-sqrt", "--timescale", "-5"], "--timescale", ">= 1"),
    (["schedule", "constant", "--steps", "3", "-2"], "--steps", ">= 0"),
    (["recommend", "7B", "--top", "-1"], "--top", ">= 1"),
    (["recommend", "7B", "--top", "0"], "--top", ">= 1"),
    (["recommend", "7B", "--devices", "0"], "--devices", ">= 1"),
    (["recommend", "7B", "--micro-batch", "0"], "--micro-batch", ">= 1"),
    (["recommend", "7B", "--seq-len", "-8"], "--seq-len", ">= 1"),
    (["recommend", "7B", "--lora-rank", "0"], "--lora-rank", ">= 1"),
    (["plan", "7B", "--devices", "-2"], "--devices", ">= 1"),
    (["plan", "7B", "--micro-batch", "0"], "--micro-batch", ">= 1"),
    (["plan", "7B", "--grad-accumulation", "0"], "--grad-accumulation", ">= 1"),
    (["plan", "7B", "--seq-len", "zero"], "--seq-len", "integer"),
    (["plan", "7B", "--lora-rank", "-1"], "--lora-rank", ">= 1"),
    (["compare", "--steps", "0"], "--steps", ">= 1"),
    (["compare", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["compare", "--seq-len", "1"], "--seq-len", ">= 2"),
    (["compare", "--seed", "-1"], "--seed", ">= 0"),
    (["compare", "--warmup-steps", "-1"], "--warmup-steps", ">= 0"),
    (["compare", "--eval-windows", "0"], "--eval-windows", ">= 1"),
    (["compare", "--eval-every", "0"], "--eval-every", ">= 1"),
    (["compare", "--threads", "0"], "--threads", ">= 1"),
    (["compare", "--max-grad-norm", "nan"], "--max-grad-norm", "finite"),
    (["compare", "--max-grad-norm", "-1"], "--max-grad-norm", ">= 0"),
    (["recipe", "7B", "--total-steps", "0"], "--total-steps", ">= 1"),
    (["recipe", "7B", "--warmup-steps", "-1"], "--warmup-steps", ">= 0"),
    (["recipe", "7B", "--batch-tokens", "0"], "--batch-tokens", ">= 1"),
]


@pytest.mark.parametrize(("argv", "option", "why"), BAD_NUMBERS, ids=[" ".join(a) for a, _, _ in BAD_NUMBERS])
def test_a_bad_number_is_one_line_naming_the_option(argv, option, why, capsys):
    _fails(argv, capsys, f"argument {option}", why)


def test_an_unknown_choice_or_missing_argument_is_one_line(capsys):
    _fails(["schedule", "triangle"], capsys, "invalid choice")
    _fails(["schedule", "cosine"], capsys, "--total is required")


def test_unwritable_plot_paths_are_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    missing = str(tmp_path / "nonexistent" / "x.png")
    _fails(["plan", "7B", "--plot", missing], capsys, "No such file or directory", missing)
    _fails(["schedule", "cosine", "--total", "100", "--plot", missing], capsys, "No such file or directory")
    a_file = tmp_path / "file"
    a_file.write_text("")
    _fails(["schedule", "cosine", "--total", "100", "--plot", str(a_file / "p.png")], capsys, "Not a directory")


def test_unreadable_inputs_are_one_line(tmp_path, capsys):
    pytest.importorskip("transformers")
    junk = tmp_path / "config.json"
    junk.write_text("root:x:0:0:root:/root:/bin/bash\n")
    _fails(["plan", str(junk)], capsys)
    if Path("/etc/passwd").is_file():
        _fails(["plan", "/etc/passwd"], capsys)
    _fails(["recommend", str(junk)], capsys)
    _fails(["compare", "--config", str(tmp_path / "missing.json")], capsys, "missing.json")
    _fails(["compare", "--config", str(junk)], capsys)


@pytest.mark.parametrize(
    "error",
    [
        CheckpointError("checkpoint c.pt is corrupted:\nits SHA-256 differs"),
        PermissionError(13, "Permission denied", "/root/x"),
        KeyError("no optimizer named 'adamx'"),
        RuntimeError("something unexpected"),
    ],
    ids=["checkpoint", "permission", "key", "unexpected"],
)
def test_errors_raised_by_a_subcommand_are_one_line(error, capsys, monkeypatch):
    def failing(args: argparse.Namespace) -> int:
        raise error

    from lmopt.cli import list_cmd

    monkeypatch.setattr(list_cmd, "run", failing)
    monkeypatch.delenv("LMOPT_TRACEBACK", raising=False)
    line = _fails(["list"], capsys)
    if isinstance(error, RuntimeError):
        assert "internal error: RuntimeError: something unexpected" in line
    elif isinstance(error, PermissionError):
        assert line.endswith("error: Permission denied: /root/x")
    elif isinstance(error, CheckpointError):
        assert line.endswith("error: checkpoint c.pt is corrupted: its SHA-256 differs")
    else:
        assert line.endswith("error: no optimizer named 'adamx'")


def test_argument_types_accept_their_range():
    assert integer(1)("7") == 7 and integer(0, 3)("0") == 0
    assert number(above=0)("1e-3") == 1e-3 and number(0, 1)("1") == 1.0
    for parse, text in ((integer(1), "0"), (integer(0, 3), "4"), (number(above=0), "0"), (number(0, 1), "inf")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_the_installed_command_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LMOPT_TRACEBACK", None)
    for argv in (
        ["schedule", "cosine", "--total", "100", "--peak", "inf"],
        ["recommend", "7B", "--top", "-1"],
        ["plan", "7B", "--plot", str(tmp_path / "nonexistent" / "x.png")],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "lmopt.cli", *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
