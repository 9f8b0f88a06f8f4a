"""Text for evaluation and calibration."""

from __future__ import annotations

import os
from pathlib import Path

import torch

WIKITEXT2_TEST = Path("shared/data/wikitext-2-raw/wiki.test.raw")
LINE_JOIN = "\n\n"


def wikitext2_test_path() -> Path | None:
    """The WikiText-2 test split at its conventional place beside the project, or ``$FLATTEN_WIKITEXT2``."""
    candidates = [os.environ.get("FLATTEN_WIKITEXT2")]
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidates += [base / ".." / WIKITEXT2_TEST, base / WIKITEXT2_TEST]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


def read_lines(path: str | Path) -> str:
    """A text file's non-empty lines (any line ending), joined by ``LINE_JOIN``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    text = LINE_JOIN.join(line for line in lines if line)
    if not text:
        raise ValueError(f"{path} holds no text")
    return text


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D long tensor (no special tokens added)."""
    if max_tokens is not None:
        # about 4 characters a token for English prose; over-cut, then trim
        text = text[: max_tokens * 8]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids[:max_tokens] if max_tokens is not None else ids
