import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

from flatten.models.checkpoint import save_checkpoint  # noqa: E402
from tiny import TinySpec, tiny_model  # noqa: E402  (tests/ is on the path from here on)

WORDS = [f"w{i}" for i in range(60)]  # with [UNK], the tiny models' vocabulary of 61


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A saved 5-block tiny LLaMA with a word-level tokenizer, and a text file in its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tmp_path_factory.mktemp("tiny")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]")
    spec = TinySpec("llama", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=4, intermediate_size=24,
                    num_layers=5, dtype=torch.float32)
    save_checkpoint(tiny_model(spec), base / "model", tokenizer)
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(60, (40,), generator=generator)) for _ in range(60)]
    (base / "text.txt").write_text("\n".join(lines))
    return base / "model", base / "text.txt"
