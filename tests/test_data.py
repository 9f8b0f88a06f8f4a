"""Calibration and evaluation text: the named corpora, the default mix, and that they never overlap."""

import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from flatten.data import (CORPORA, EVALUATION_CORPORA, MIXES, TEST_TEXTS, VALIDATION_TEXTS, calibration_description,
                          calibration_domains, calibration_tokens, evaluation_text, evaluation_tokens, tokenize,
                          wikitext2_test_path)


@pytest.fixture(scope="module")
def bytes_tokenizer():
    """One token per byte: every text tokenises, and a window decodes back to its text."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def test_every_corpus_reads_as_text_of_its_domain():
    for name in CORPORA:
        if name == "wikitext2" and wikitext2_test_path() is None:
            continue
        corpus = CORPORA.get(name)
        text = corpus.read()
        # at least 32 windows of 512 tokens (SmolLM2's tokenizer); the Python code, 54 kB, holds 31
        assert len(text) > (50_000 if name == "python-code" else 100_000), name
        assert corpus.domain and corpus.source
    assert CORPORA.get("alice").read().startswith("CHAPTER I")  # the front matter is skipped
    assert "/* Copyright" not in CORPORA.get("c-decoder").read()  # the licence comment of every file
    assert "Distributed under MIT license" not in CORPORA.get("python-code").read()  # nor of the Python files


def test_no_evaluation_text_appears_in_any_calibration_mix():
    """Chunks of 100 letters and digits taken along each evaluation corpus occur in no corpus of any mix
    (C boilerplate such as include guards is shorter than that); and fiction is in no mix at all."""
    calibration = {name: _normalised(CORPORA.get(name).read()) for mix in MIXES.values() for name in mix}
    for name in dict.fromkeys(EVALUATION_CORPORA + TEST_TEXTS):
        if name == "wikitext2" and wikitext2_test_path() is None:
            continue
        text = _normalised(CORPORA.get(name).read())
        chunks = [text[i : i + 100] for i in range(0, len(text) - 100, len(text) // 400)]
        for other, body in calibration.items():
            assert not any(chunk in body for chunk in chunks), (name, other)
    assert all("fiction" not in calibration_domains(mix) for mix in MIXES)


def _chunks(text: str, count: int = 400) -> list[str]:
    return [text[i : i + 100] for i in range(0, len(text) - 100, max(1, len(text) // count))]


def test_validation_texts_share_no_text_with_calibration_or_test_texts():
    """The texts that choose defaults: chunks of 100 letters and digits taken along each occur in no corpus of
    any mix, in no test text and in the held-out leads (evaluation's fallback); the two sets are disjoint, in
    several domains, one of them outside every calibration mix."""
    assert len(VALIDATION_TEXTS) >= 4 and not set(VALIDATION_TEXTS) & set(TEST_TEXTS)
    assert TEST_TEXTS == ("wikitext2", "alice", "as-you-like-it", "c-decoder")
    calibrated = {name for mix in MIXES.values() for name in mix}
    assert not calibrated & (set(VALIDATION_TEXTS) | set(TEST_TEXTS))
    domains = {CORPORA.get(name).domain for name in VALIDATION_TEXTS}
    assert len(domains) >= 3
    assert any(all(domain not in calibration_domains(mix) for mix in MIXES) for domain in domains)
    others = [*calibrated, *TEST_TEXTS, "wikipedia-leads-heldout"]
    bodies = {name: _normalised(CORPORA.get(name).read()) for name in others
              if name != "wikitext2" or wikitext2_test_path() is not None}
    for name in VALIDATION_TEXTS:
        chunks = _chunks(_normalised(CORPORA.get(name).read()))
        for other, body in bodies.items():
            assert not any(chunk in body for chunk in chunks), (name, other)


def test_the_wikipedia_splits_share_no_article_and_the_fallback_keeps_its_beginning():
    """The held-out tenth of the articles is split in two in title order: the evaluation fallback (``heldout``)
    is the first half, so its first tokens are those it had before ``validation`` was taken from the rest."""
    import json

    import flatten.data
    from flatten.models.loading import package_dir

    join = flatten.data.LINE_JOIN
    texts = {split: flatten.data.wikipedia_leads(split) for split in ("calibration", "heldout", "validation")}
    package, relative, install = flatten.data.WIKIPEDIA_LEADS
    articles = json.loads((package_dir(package, install) / relative).read_text(encoding="utf-8"))
    every_tenth = [t for i, t in enumerate(sorted(articles)) if i % 10 == 9]
    assert texts["heldout"] + join + texts["validation"] == join.join(articles[t]["extract"].strip()
                                                                     for t in every_tenth)
    paragraphs = {split: set(text.split(join)) for split, text in texts.items()}
    assert not paragraphs["heldout"] & paragraphs["validation"]
    assert not (paragraphs["heldout"] | paragraphs["validation"]) & paragraphs["calibration"]
    with pytest.raises(ValueError, match="split must be"):
        flatten.data.wikipedia_leads("test")


def test_the_default_mix_draws_its_windows_in_turn_from_each_corpus(bytes_tokenizer):
    rows = calibration_tokens(bytes_tokenizer, samples=7, seq_len=64)
    assert rows.shape == (7, 64) and torch.equal(rows, calibration_tokens(bytes_tokenizer, "default", 7, 64))
    names = MIXES["default"]
    bodies = [CORPORA.get(name).read() for name in names]
    for i, row in enumerate(rows):
        text = bytes_tokenizer.decode(row)
        assert text in bodies[i % len(names)], (i, names[i % len(names)])
    assert calibration_domains(None) == ["encyclopedic", "proceedings", "code"]
    assert "encyclopedic" in calibration_description(None) and "brotli 1.2.1" in calibration_description(None)
    assert not torch.equal(rows, calibration_tokens(bytes_tokenizer, samples=7, seq_len=64, seed=1))
    only = calibration_tokens(bytes_tokenizer, "alice", samples=3, seq_len=64)
    assert all(bytes_tokenizer.decode(row) in CORPORA.get("alice").read() for row in only)


def test_evaluation_reads_the_first_tokens_of_a_corpus(bytes_tokenizer):
    ids = evaluation_tokens(bytes_tokenizer, "alice", 300)
    assert torch.equal(ids, tokenize(bytes_tokenizer, CORPORA.get("alice").read())[:300])
    text, about = evaluation_text("alice")
    assert text == CORPORA.get("alice").read() and "fiction" in about
    with pytest.raises(ValueError, match="unknown corpus 'nope'; known: .*alice"):
        evaluation_tokens(bytes_tokenizer, "nope", 10)


def test_without_wikitext2_beside_the_project_the_default_text_is_the_held_out_leads(monkeypatch):
    """What the examples read on a user's machine, where ../shared does not exist."""
    import flatten.data

    monkeypatch.setattr(flatten.data, "wikitext2_test_path", lambda: None)
    text, about = evaluation_text()
    assert about == "the Wikipedia lead sections held out from calibration"
    assert text == flatten.data.wikipedia_leads("heldout") and len(text) > 100_000
