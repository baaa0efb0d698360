"""Corpora and tokenizers for ``lmopt compare``.

Default corpus: the Python standard library's own ``.py`` sources, present on every machine with no download.
They are found under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` / ``dist-packages`` and
``__pycache__`` excluded), listed in sorted order of their POSIX path relative to that folder, and read as
bytes. The corpus therefore depends on the Python version; ``corpus.describe()`` records the version, the file
counts and a SHA-256 of the token streams in the results so a run says exactly what it trained on.

Train / validation split (deterministic, documented):

* by file, when the corpus has at least :data:`MIN_FILES_FOR_FILE_SPLIT` files: a file goes to validation
  when ``zlib.crc32(relative_path) % 20 == 0`` (about 5% of the files). The rule depends only on a file's own
  path, so adding or removing other files never moves a file from one side to the other.
* otherwise (a single text file, or a few), by position: the last 10% of the concatenated token stream is the
  validation set.

Documents are concatenated in that order, each followed by the end-of-text token.

Tokenizers: :class:`ByteTokenizer` (the default: the 256 byte values plus ``<eos>`` = 256 and ``<pad>`` = 257,
vocabulary 258, nothing to download or train), or any tokenizer saved locally that transformers'
``AutoTokenizer.from_pretrained(path, local_files_only=True)`` loads (``--tokenizer PATH``).

Batches: :func:`train_batch_offsets` draws the start of every training window from one seeded generator
before training, so every optimizer sees exactly the same data in the same order; validation uses the first
windows spread evenly over the validation stream, the same for every optimizer.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "HFTokenizer",
    "MIN_FILES_FOR_FILE_SPLIT",
    "TEXT_SUFFIXES",
    "Tokenizer",
    "load_corpus",
    "load_tokenizer",
    "stdlib_files",
    "text_files",
    "train_batch_offsets",
    "validation_windows",
]

#: a file-level split needs at least this many files (else the last 10% of the stream is validation)
MIN_FILES_FOR_FILE_SPLIT = 20
#: the file-level rule: validation when crc32(relative path) % VALIDATION_MODULUS == 0
VALIDATION_MODULUS = 20
#: the positional rule's validation fraction
VALIDATION_FRACTION = 0.1
#: files ``--data FOLDER`` reads (any other suffix is ignored)
TEXT_SUFFIXES = (
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".json",
    ".jsonl",
    ".csv",
    ".tsv",
    ".html",
    ".xml",
    ".tex",
    ".c",
    ".h",
    ".cpp",
    ".js",
    ".ts",
    ".java",
    ".go",
    ".rs",
    ".sh",
    ".yaml",
    ".yml",
    ".toml",
)


class Tokenizer(Protocol):
    """What the corpus needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, data: bytes) -> np.ndarray: ...


class ByteTokenizer:
    """Byte-level tokenizer: token = byte value (0-255), plus ``<eos>`` = 256 and ``<pad>`` = 257."""

    name = "bytes"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: Any) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer saved locally (``save_pretrained`` folder), loaded with transformers, never downloaded."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"tokenizer path {str(path)!r} does not exist (a folder written by save_pretrained)")
        try:
            from transformers import AutoTokenizer
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ValueError("--tokenizer needs transformers: pip install 'lmopt[compare]'") from err
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"could not load a tokenizer from {str(path)!r}: {err}") from err
        self.name = str(path)
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:  # no end-of-text token: documents are separated by a token of their own
            eos = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.vocab_size
            self.vocab_size = max(self.vocab_size, eos + 1)
        self.eos_id = int(eos)

    def encode(self, data: bytes) -> np.ndarray:
        text = data.decode("utf-8", errors="replace")
        return np.asarray(self._tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def load_tokenizer(path: str | os.PathLike[str] | None) -> Tokenizer:
    """:class:`ByteTokenizer` for ``None``, else the local tokenizer at ``path``."""
    return ByteTokenizer() if path is None else HFTokenizer(path)


# ------------------------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    """The folder holding the standard library's ``.py`` files."""
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[tuple[str, Path]]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [
            d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__") and not d.startswith(".")
        ]
        for name in files:
            if name.endswith(suffixes) and not name.startswith("."):
                full = Path(folder) / name
                found.append((full.relative_to(root).as_posix(), full))
    return sorted(found)


def stdlib_files() -> list[tuple[str, Path]]:
    """``(relative path, path)`` of every standard-library ``.py`` file, sorted by relative path."""
    return _walk(stdlib_root(), (".py",))


def text_files(path: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of a text file, or of the text files of a folder (by suffix), sorted."""
    path = Path(path)
    if path.is_file():
        return [(path.name, path)]
    if path.is_dir():
        files = _walk(path, TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"--data folder {str(path)!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return files
    raise ValueError(f"--data path {str(path)!r} does not exist")


@dataclass
class Corpus:
    """Train and validation token streams (1-D int32 tensors; windows come out as int64) and their origin."""

    train: torch.Tensor
    validation: torch.Tensor
    vocab_size: int
    source: str
    tokenizer: str
    split: str
    files_train: int
    files_validation: int
    bytes_total: int
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Everything needed to say what was trained on (goes into the results JSON)."""
        digest = hashlib.sha256()
        digest.update(self.train.numpy().tobytes())
        digest.update(b"|")
        digest.update(self.validation.numpy().tobytes())
        return {
            "source": self.source,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "split": self.split,
            "files_train": self.files_train,
            "files_validation": self.files_validation,
            "bytes": self.bytes_total,
            "tokens_train": int(self.train.numel()),
            "tokens_validation": int(self.validation.numel()),
            "sha256": digest.hexdigest(),
            **self.extra,
        }


def _concatenate(chunks: list[np.ndarray]) -> torch.Tensor:
    if not chunks:
        return torch.zeros(0, dtype=torch.int32)
    return torch.from_numpy(np.concatenate(chunks, dtype=np.int32, casting="same_kind"))


def load_corpus(data: str | os.PathLike[str] | None = None, tokenizer: str | os.PathLike[str] | None = None) -> Corpus:
    """Read, tokenize and split a corpus (see the module docstring for the rules).

    Args:
        data: ``None`` for the standard library's sources, else a text file or a folder of text files.
        tokenizer: ``None`` for bytes, else a local tokenizer folder.

    Example:
        >>> corpus = load_corpus()
        >>> corpus.describe()["tokens_train"]   # ~30M bytes of Python on CPython 3.11
    """
    tok = load_tokenizer(tokenizer)
    if data is None:
        files = stdlib_files()
        source = f"python-stdlib:{stdlib_root()} (Python {sys.version.split()[0]})"
    else:
        files = text_files(data)
        source = str(Path(data).resolve())
    if not files:
        raise ValueError(f"no source files found for the corpus ({source})")
    eos = np.asarray([tok.eos_id], dtype=np.int32)
    by_file = len(files) >= MIN_FILES_FOR_FILE_SPLIT
    train_chunks: list[np.ndarray] = []
    val_chunks: list[np.ndarray] = []
    total_bytes = 0
    files_train = files_val = 0
    for rel, path in files:
        raw = path.read_bytes()
        total_bytes += len(raw)
        ids = tok.encode(raw)
        if by_file and zlib.crc32(rel.encode("utf-8")) % VALIDATION_MODULUS == 0:
            val_chunks += [ids, eos]
            files_val += 1
        else:
            train_chunks += [ids, eos]
            files_train += 1
    if by_file and files_val and files_train:
        split = (
            f"by file: validation = files whose crc32(relative path) % {VALIDATION_MODULUS} == 0 "
            f"({files_val} of {len(files)} files)"
        )
        train, val = _concatenate(train_chunks), _concatenate(val_chunks)
    else:
        stream = _concatenate(train_chunks + val_chunks)
        cut = int(round(stream.numel() * (1 - VALIDATION_FRACTION)))
        train, val = stream[:cut], stream[cut:]
        split = f"by position: the last {VALIDATION_FRACTION:.0%} of the concatenated token stream"
        files_train, files_val = len(files), 0
    return Corpus(
        train=train,
        validation=val,
        vocab_size=int(tok.vocab_size),
        source=source,
        tokenizer=tok.name,
        split=split,
        files_train=files_train,
        files_validation=files_val,
        bytes_total=total_bytes,
    )


# ------------------------------------------------------------------------------------------------------------
def _check_stream(tokens: torch.Tensor, seq_len: int, what: str) -> None:
    if tokens.numel() < seq_len + 1:
        raise ValueError(
            f"the {what} stream has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            f"use a larger corpus or a smaller --seq-len"
        )


def train_batch_offsets(tokens: torch.Tensor, *, steps: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """``(steps, batch_size)`` start offsets of the training windows, drawn once from ``seed``.

    Window ``i`` of step ``s`` is ``tokens[o : o + seq_len]`` with ``o = offsets[s, i]`` (the model shifts the
    labels itself). Every optimizer reads the same offsets, hence the same data order.
    """
    _check_stream(tokens, seq_len, "training")
    generator = torch.Generator().manual_seed(seed)
    high = tokens.numel() - seq_len + 1
    return torch.randint(0, high, (steps, batch_size), generator=generator)


def gather_windows(tokens: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``(len(offsets), seq_len)`` windows of ``tokens`` starting at ``offsets``."""
    index = offsets.reshape(-1, 1) + torch.arange(seq_len).reshape(1, -1)
    return tokens[index].long()


def validation_windows(tokens: torch.Tensor, *, seq_len: int, max_windows: int) -> torch.Tensor:
    """``(n, seq_len)`` validation windows spread evenly over the validation stream (so they sample every part
    of it, not just its first files): ``n = min(max_windows, len // seq_len)`` windows starting at
    ``round(i * (len - seq_len) / (n - 1))``, which do not overlap."""
    _check_stream(tokens, seq_len, "validation")
    n = min(max_windows, tokens.numel() // seq_len)
    if n == 1:
        starts = torch.zeros(1, dtype=torch.int64)
    else:
        starts = torch.round(torch.arange(n, dtype=torch.float64) * ((tokens.numel() - seq_len) / (n - 1))).long()
    return gather_windows(tokens, starts, seq_len)
