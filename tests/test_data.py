"""Calibration and evaluation text: the named corpora, the default mix, and that they never overlap."""

import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from flatten.data import (CORPORA, EVALUATION_CORPORA, MIXES, calibration_description, calibration_domains,
                          calibration_tokens, evaluation_text, evaluation_tokens, tokenize, wikitext2_test_path)


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
        assert len(text) > 100_000, name  # at least 32 windows of 512 tokens
        assert corpus.domain and corpus.source
    assert CORPORA.get("alice").read().startswith("CHAPTER I")  # the front matter is skipped
    assert "/* Copyright" not in CORPORA.get("c-decoder").read()  # the licence comment of every file


def test_no_evaluation_text_appears_in_any_calibration_mix():
    """Chunks of 100 letters and digits taken along each evaluation corpus occur in no corpus of any mix
    (C boilerplate such as include guards is shorter than that); and fiction is in no mix at all."""
    calibration = {name: _normalised(CORPORA.get(name).read()) for mix in MIXES.values() for name in mix}
    for name in EVALUATION_CORPORA + ("as-you-like-it", "c-decoder"):
        if name == "wikitext2" and wikitext2_test_path() is None:
            continue
        text = _normalised(CORPORA.get(name).read())
        chunks = [text[i : i + 100] for i in range(0, len(text) - 100, len(text) // 400)]
        for other, body in calibration.items():
            assert not any(chunk in body for chunk in chunks), (name, other)
    assert all("fiction" not in calibration_domains(mix) for mix in MIXES)


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
