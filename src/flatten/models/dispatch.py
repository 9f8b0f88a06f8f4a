"""Models dispatched by accelerate (``from_pretrained(..., device_map=...)``).

accelerate gives each module a hook that moves its inputs to the module's execution device and, for a module
offloaded to CPU memory or disk, holds its weights on the ``meta`` device and loads them from the hook's
``weights_map`` for each forward (dropping them after). The compressors run such blocks through their hooks;
this module serves them where they need more: where a module computes, a block's weights as tensors, a block
that is changed in place made resident, a new block placed like the one it replaces, and ``hf_device_map``
kept in step with the blocks. Nothing here imports accelerate unless a model was dispatched by it.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def _hooks(module: nn.Module) -> list:
    """The device hooks attached to ``module`` itself (inside a ``SequentialHook`` too)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return [h for h in getattr(hook, "hooks", [hook]) if hasattr(h, "execution_device")]


def is_dispatched(module: nn.Module) -> bool:
    return any(_hooks(m) for m in module.modules())


def _tensors(module: nn.Module, recurse: bool = False) -> list[tuple[str, Tensor]]:
    return [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]


def _holder(module: nn.Module, key: str):
    """``(hook, name relative to the hooked module)`` of the offloading hook nearest above tensor ``key``."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = module.get_submodule(".".join(parts[:cut]))
        for hook in _hooks(owner):
            if hook.offload and hook.weights_map is not None:
                return hook, ".".join(parts[cut:])
    raise ValueError(f"{key} is on the 'meta' device and no accelerate hook holds its value: load the model with "
                     "a device_map (accelerate then keeps offloaded weights behind hooks), or with "
                     "load_model(folder, dtype='auto') to keep its weights on disk, memory-mapped")


def check_offloaded(module: nn.Module) -> None:
    """Raise unless every weight of ``module`` on the meta device is one an accelerate hook can load."""
    for key, tensor in _tensors(module, recurse=True):
        if tensor.is_meta:
            _holder(module, key)


def device_of(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the execution device of the hook of its first weight, else that weight's device."""
    for name, sub in module.named_modules():
        tensors = _tensors(sub)
        if not tensors:
            continue
        parts = name.split(".") if name else []
        for cut in range(len(parts), -1, -1):
            for hook in _hooks(module.get_submodule(".".join(parts[:cut]))):
                if hook.execution_device is not None:
                    return torch.device(hook.execution_device)
        if not tensors[0][1].is_meta:
            return tensors[0][1].device
    raise ValueError(f"cannot tell where {type(module).__name__} computes: it holds no weights on a device")


def load_offloaded(module: nn.Module, key: str) -> Tensor:
    """The value of ``module``'s offloaded tensor ``key`` (a state-dict name), loaded through its hook."""
    hook, name = _holder(module, key)
    return hook.weights_map[name]


def weights_of(module: nn.Module, device: torch.device | None = None) -> dict[str, Tensor]:
    """``module.state_dict()`` with every offloaded tensor loaded through its hook (the module is not changed),
    all on ``device`` (default: where the module computes, as its hooks would load them for a forward)."""
    state = module.state_dict()
    if device is None and state:
        device = device_of(module)
    return {key: (load_offloaded(module, key) if t.is_meta else t.detach()).to(device) for key, t in state.items()}


def make_resident(module: nn.Module) -> nn.Module:
    """Load ``module``'s offloaded weights onto their execution devices for good (its hooks then only move
    inputs), so that it can be changed in place; a no-op for a module that holds its weights."""
    from accelerate.utils import set_module_tensor_to_device

    for sub in module.modules():
        for hook in _hooks(sub):
            if not (hook.offload and hook.weights_map is not None):
                continue
            for name, tensor in _tensors(sub, recurse=hook.place_submodules):
                if tensor.is_meta:
                    set_module_tensor_to_device(sub, name, hook.execution_device, value=hook.weights_map[name])
            hook.offload = False
    return module


def resident_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that holds all its weights (offloaded ones loaded), on the device where ``module``
    computes, and has no hooks."""
    weights = weights_of(module)
    duplicate = copy.deepcopy(module)
    if is_dispatched(duplicate):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(duplicate, recurse=True)
    duplicate.load_state_dict({k: v.clone() for k, v in weights.items()}, assign=True)
    return duplicate


@contextmanager
def computing_on(module: nn.Module, device: torch.device):
    """For the duration, a dispatched ``module`` computes on ``device``: its hooks' execution device is set
    there (offloaded weights load there) and the weights it holds move there, and back afterwards."""
    hooks = [(hook, hook.execution_device) for sub in module.modules() for hook in _hooks(sub)]
    homes = [(t, t.data) for _, t in _tensors(module, recurse=True) if not t.is_meta and t.device != device]
    for hook, _ in hooks:
        hook.execution_device = device
    for tensor, data in homes:
        tensor.data = data.to(device)
    try:
        yield module
    finally:
        for hook, home in hooks:
            hook.execution_device = home
        for tensor, data in homes:
            tensor.data = data


def place_like(block: nn.Module, replaced: nn.Module) -> nn.Module:
    """Put a new ``block`` where the dispatched block ``replaced`` computed, with a hook that brings its
    inputs there (as accelerate's own dispatch does); blocks of an undispatched model are left alone."""
    if not is_dispatched(replaced) or is_dispatched(block):
        return block
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    device = device_of(replaced)
    add_hook_to_module(block.to(device), AlignDevicesHook(execution_device=device))
    return block


def _placement(block: nn.Module) -> str | int:
    """The block's ``hf_device_map`` entry: ``"disk"`` or ``"cpu"`` for offloaded weights, else its device."""
    for key, tensor in _tensors(block, recurse=True):
        if tensor.is_meta:
            hook, name = _holder(block, key)
            loader = getattr(hook.weights_map, "dataset", hook.weights_map)  # accelerate's OffloadedWeightsLoader
            stored = getattr(hook.weights_map, "prefix", "") + name
            on_disk = stored in getattr(loader, "index", {}) and stored not in getattr(loader, "state_dict", {})
            return "disk" if on_disk else "cpu"
    device = device_of(block)
    return device.index if device.type == "cuda" else device.type


def refresh_device_map(model: nn.Module, layers_path: str, layers: nn.ModuleList) -> None:
    """Rewrite the entries of ``model.hf_device_map`` for ``layers_path`` and under it: one per block as the
    blocks are now, after blocks were removed or replaced; other entries stay."""
    old = getattr(model, "hf_device_map", None)
    if not old:
        return
    prefix = f"{layers_path}."
    entries = {key: value for key, value in old.items() if key != layers_path and not key.startswith(prefix)}
    entries.update({f"{prefix}{i}": _placement(block) for i, block in enumerate(layers)})
    model.hf_device_map = entries
