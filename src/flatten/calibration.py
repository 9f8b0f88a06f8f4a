"""Sequential calibration (docs/method.md section 5): block inputs on the calibration set, block by block.

The model's own forward computes what its decoder layers receive besides the hidden states (attention mask,
RoPE, positions); ``capture`` records that once per layer by standing in for every layer, so that a block
can then be run on its own, on any device, without the rest of the model.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flatten.criteria.statistics import AttentionStats, MlpStats
from flatten.models.architectures import Architecture, BlockShape
from flatten.models.dispatch import computing_on, device_of, is_dispatched


def check_calibration(model: nn.Module, calibration: Tensor) -> None:
    """Raise unless ``calibration`` is a non-empty 2-D tensor of token ids in the model's vocabulary."""
    if not isinstance(calibration, Tensor) or calibration.dim() != 2 or calibration.dtype not in (torch.long, torch.int):
        raise TypeError("calibration must be a 2-D integer tensor of token ids (samples x sequence length)")
    if calibration.shape[0] < 1 or calibration.shape[1] < 2:
        raise ValueError(f"calibration of shape {tuple(calibration.shape)} is empty or too short")
    vocab = model.get_input_embeddings().num_embeddings
    if int(calibration.min()) < 0 or int(calibration.max()) >= vocab:
        raise ValueError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary); got ids "
                         f"from {int(calibration.min())} to {int(calibration.max())}: another tokenizer?")


class _Stop(Exception):
    """Raised inside a hook once everything needed from a forward pass is recorded."""


class _Catcher(nn.Module):
    def __init__(self, records: list, keep_hidden: bool):
        super().__init__()
        self.records, self.keep_hidden = records, keep_hidden

    def forward(self, hidden_states, *args, **kwargs):
        self.records.append((hidden_states.detach() if self.keep_hidden else None, args, kwargs))
        return hidden_states


@dataclass
class LayerInputs:
    """What the model passes to each decoder layer, per calibration batch."""

    hidden: list[Tensor]  # inputs of the first block, one tensor per batch
    calls: list[list[tuple[tuple, dict]]]  # [layer][batch]: the other positional and keyword arguments

    def to(self, device: torch.device) -> "LayerInputs":
        moved: dict[int, Tensor] = {}  # layers share their masks and RoPE tensors: move each once
        return LayerInputs(_to(self.hidden, device, moved), _to(self.calls, device, moved))


def _to(obj, device, moved: dict):
    if isinstance(obj, Tensor):
        if id(obj) not in moved:
            moved[id(obj)] = obj.to(device)
        return moved[id(obj)]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device, moved) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, moved) for k, v in obj.items()}
    return obj


@contextmanager
def on_device(module: nn.Module, device: torch.device):
    """Keep ``module`` on ``device`` for the duration, then move it back where it was (a module dispatched by
    accelerate computes there through its hooks)."""
    if is_dispatched(module):
        with computing_on(module, device):
            yield module
        return
    home = device_of(module)
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@torch.no_grad()
def capture(model: nn.Module, arch: Architecture, batches: list[Tensor]) -> LayerInputs:
    """The first block's inputs and every layer's other arguments, for each batch of token ids."""
    layers = arch.layers_of(model)
    base = model.get_submodule(arch.layers.rsplit(".", 1)[0]) if "." in arch.layers else model
    originals = list(layers)
    records = [[] for _ in originals]
    try:
        for i in range(len(originals)):
            layers[i] = _Catcher(records[i], keep_hidden=i == 0)
        device = device_of(base)
        for ids in batches:
            base(input_ids=ids.to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return LayerInputs([h for h, _, _ in records[0]], [[(a, k) for _, a, k in r] for r in records])


def _output(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, hidden: list[Tensor], calls: list[tuple[tuple, dict]], name: str = "block") -> list[Tensor]:
    """``block`` applied to every batch; raises if an output is not finite."""
    outputs = []
    for x, (args, kwargs) in zip(hidden, calls):
        y = _output(block(x, *args, **kwargs))
        if not torch.isfinite(y).all():
            raise FloatingPointError(f"{name} produced non-finite activations on the calibration data")
        outputs.append(y)
    return outputs


def block_influence(inputs: list[Tensor], outputs: list[Tensor]) -> float:
    """ShortGPT's Block Influence of a block from its inputs and outputs (one tensor per batch):
    ``1 - cos(input, output)`` per token, averaged over the tokens."""
    tokens = sum(x.shape[0] * x.shape[1] for x in inputs)
    return sum(float((1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).sum())
               for x, y in zip(inputs, outputs)) / tokens


def token_rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _at_least_float32(x: Tensor) -> Tensor:
    """Activations as statistics multiply them: float32 (from bf16, fp16 or float32), float64 kept as it is."""
    return x if x.dtype == torch.float64 else x.float()


@functools.cache
def _tensor_core_sums(device: torch.device) -> bool:
    """Whether ``torch.mm`` on ``device`` returns the float32 sums of bfloat16 products (``out_dtype``: CUDA,
    torch 2.8 and later)."""
    if device.type != "cuda":
        return False
    try:
        one = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        return torch.mm(one.T, one, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _on_tensor_cores(x: Tensor) -> bool:
    return x.dtype == torch.bfloat16 and _tensor_core_sums(x.device)


def product32(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right`` with products and sums in float32 at least. A bfloat16 ``left`` on CUDA is multiplied
    as it is, on the tensor cores with float32 sums (the product of two bfloat16 numbers is exact in float32),
    a float32 ``right`` split into two bfloat16 parts (``hi + lo`` holds 16 of its 24 bits); no float32 copy
    of ``left`` is made. Elsewhere both are upcast (float64 stays float64)."""
    if _on_tensor_cores(left) and right.dtype in (torch.bfloat16, torch.float32):
        if right.dtype == torch.bfloat16:
            return torch.mm(left, right, out_dtype=torch.float32)
        hi = right.bfloat16()
        lo = (right - hi.float()).bfloat16()
        return torch.mm(left, hi, out_dtype=torch.float32) + torch.mm(left, lo, out_dtype=torch.float32)
    return _at_least_float32(left) @ _at_least_float32(right)


def add_upper_gram(gram: Tensor, x: Tensor, rows: int = 512) -> None:
    """``gram += x^T x`` (``x``: tokens x d) on and above the diagonal only, in strips of ``rows`` rows:
    about half the work of the full product, with products and sums in float32 at least (``product32``).
    ``symmetric`` fills in the lower triangle afterwards."""
    if not _on_tensor_cores(x):
        x = _at_least_float32(x)
    d = x.shape[1]
    for a in range(0, d, rows):
        gram[a : a + rows, a:] += product32(x[:, a : a + rows].T, x[:, a:])


def symmetric(upper: Tensor, rows: int = 512) -> Tensor:
    """Make ``upper`` the symmetric matrix whose upper triangle it holds, in place (copying strips of
    ``rows`` rows, never the whole matrix), and return it."""
    n = upper.shape[0]
    for a in range(0, n, rows):
        b = min(a + rows, n)
        square = upper[a:b, a:b]
        square.copy_(square.triu() + square.triu(1).T)
        upper[b:, a:b] = upper[a:b, b:].T
    return upper


@torch.no_grad()
def attention_stats(wide: nn.Module, arch: Architecture, shape: BlockShape, hidden: list[Tensor],
                    calls: list, token_weights: list[Tensor] | None = None) -> AttentionStats:
    """Head outputs of ``wide`` (inputs of its ``o_proj``): their Gram matrix and each head's mean
    contribution norm ``|| o_h W_o,h^T ||``. Stops each forward at ``o_proj``. With ``token_weights`` (one
    tensor of per-token weights per batch), each token's row counts ``weight`` times in the Gram matrix and
    ``sqrt(weight)`` times in the contribution norms."""
    o_weight = wide.get_submodule(arch.o_proj).weight.detach()
    w = _at_least_float32(o_weight).view(o_weight.shape[0], shape.num_heads, shape.head_dim)
    head_gram = torch.einsum("dhi,dhj->hij", w, w)
    width = shape.num_heads * shape.head_dim
    gram = torch.zeros(width, width, dtype=torch.float64, device=o_weight.device)
    contribution = torch.zeros(shape.num_heads, dtype=torch.float64, device=o_weight.device)
    tokens, batch = 0, iter(range(len(hidden)))

    def hook(module, args):
        nonlocal contribution, tokens
        raw = token_rows(args[0])
        o = _at_least_float32(raw)
        if token_weights is not None:
            o = raw = o * token_weights[next(batch)].to(o.device).sqrt()[:, None]
        add_upper_gram(gram, raw)
        per_head = o.view(-1, shape.num_heads, shape.head_dim)
        contribution += torch.einsum("nhi,hij,nhj->nh", per_head, head_gram, per_head).clamp_min(0).sqrt().sum(0).double()
        tokens += o.shape[0]
        raise _Stop

    _run_until_stopped(wide, arch.o_proj, hook, hidden, calls)
    weights = {key: arch.projections.of(wide, path)[0].detach()  # a fused projection's slices (Phi-3)
               for key, path in (("q", arch.q_proj), ("k", arch.k_proj), ("v", arch.v_proj), ("o", arch.o_proj))}
    return AttentionStats(shape, weights, symmetric(gram), contribution / tokens, tokens)


@torch.no_grad()
def mlp_stats(half: nn.Module, arch: Architecture, shape: BlockShape, hidden: list[Tensor], calls: list,
              targets: list[Tensor] | None, token_weights: list[Tensor] | None = None) -> MlpStats:
    """Channel activations ``psi`` of ``half`` (attention already pruned, MLP still wide): their Gram
    matrix and, with ``targets``, ``psi^T (target - u' - b)`` where ``u'`` is the MLP sub-layer's input and
    ``b`` the bias of ``down_proj`` (if it has one).
    Stops each forward at ``down_proj``. ``token_weights`` as in ``attention_stats``.

    Where a norm follows ``down_proj`` and the family's refits run through it approximately
    (``Architecture.refit_approximation``: Gemma 3), the block adds ``g * z / rms(z)`` to ``u'``, ``z`` the
    output of ``down_proj`` and ``g`` the norm's factor, which is not linear in ``down_proj``. The cross term is
    then ``psi^T (z* - b)``, with ``z*`` per token the direction whose normalised output comes closest to
    ``target - u'`` (``post_norm_direction``), scaled to the RMS of ``half``'s own ``z`` there (the norm
    divides the scale out; this keeps the fit near the weights it starts from), and ``target_energy`` is the
    sum of ``||z* - b||^2``: a least-squares refit then fits ``z`` to ``z*``, not the block's output, whose
    error ``refit_error`` measures."""
    down_module = half.get_submodule(arch.down_proj)
    down, bias = down_module.weight.detach(), down_module.bias
    gram = torch.zeros(shape.intermediate_size, shape.intermediate_size, dtype=torch.float64, device=down.device)
    cross = torch.zeros(shape.intermediate_size, down.shape[0], dtype=torch.float64, device=down.device) if targets else None
    tokens, energy = 0, torch.zeros((), dtype=torch.float64, device=down.device)
    residual: list = [None, -1]  # the current batch's MLP-norm input, and the batch's index
    post = arch.mlp_post_norm if arch.refit_approximation else None
    gain = None if post is None else arch.norm_scale(half.get_submodule(post).weight.detach().double())

    def norm_hook(module, args):
        residual[0], residual[1] = args[0], residual[1] + 1

    def down_hook(module, args):
        nonlocal cross, tokens, energy
        raw = psi = token_rows(args[0])
        if token_weights is not None:
            psi = _at_least_float32(psi) * token_weights[residual[1]].to(psi.device).sqrt()[:, None]
        add_upper_gram(gram, psi)
        if cross is not None:
            target = _at_least_float32(token_rows(targets[residual[1]].to(psi.device)))
            change = target - _at_least_float32(token_rows(residual[0]))
            if gain is not None:
                change = _through_post_norm(change, raw, down, bias, gain)
            if bias is not None:  # the MLP adds down_proj's bias: the refit fits the rest
                change = change - bias.to(change)
            if token_weights is not None:
                change = change * token_weights[residual[1]].to(psi.device).sqrt()[:, None]
            cross += product32(psi.T, change)
            energy += change.double().square().sum()
        tokens += psi.shape[0]
        raise _Stop

    handle = half.get_submodule(arch.mlp_input).register_forward_pre_hook(norm_hook)
    try:
        _run_until_stopped(half, arch.down_proj, down_hook, hidden, calls)
    finally:
        handle.remove()
    weights = {key: arch.projections.of(half, path)[0].detach()  # a fused projection's slices (Phi-3)
               for key, path in (("gate", arch.gate_proj), ("up", arch.up_proj), ("down", arch.down_proj))}
    return MlpStats(shape, weights, symmetric(gram), cross, tokens, float(energy) if cross is not None else None)


def _through_post_norm(change: Tensor, psi: Tensor, down: Tensor, bias: Tensor | None, gain: Tensor) -> Tensor:
    """What ``down_proj`` should output where a norm follows it and ``change`` is wanted after that norm: the
    best direction (``post_norm_direction``) at the RMS of ``down_proj``'s own output on ``psi``."""
    z = product32(psi, down.T)
    if bias is not None:
        z = z + bias.to(z)
    return (post_norm_direction(change, gain.to(change.device))
            * z.double().square().mean(-1, keepdim=True).sqrt()).to(change.dtype)


def post_norm_direction(change: Tensor, gain: Tensor, iterations: int = 64) -> Tensor:
    """Per row ``c`` of ``change`` (tokens x d), the ``n`` of RMS 1 that makes ``gain * n`` closest to ``c``
    (float64): what a norm ``gain * z / rms(z)`` can best add to the residual stream where ``c`` is wanted.

    The least squares ``min ||gain * n - c||^2`` subject to ``||n||^2 = d`` is solved by
    ``n = gain c / (gain^2 + mu)``, with the ``mu >= -min(gain^2)`` at which ``||n||^2 = d`` (``||n||``
    falls as ``mu`` grows there), found per token by bisection. A row of zeros gives zeros."""
    c, g2 = change.double(), gain.double().square()
    d = c.shape[-1]
    a = g2 * c.square()  # ||n(mu)||^2 = sum a / (g2 + mu)^2
    low = torch.full(c.shape[:-1] + (1,), -float(g2.min()), dtype=torch.float64, device=c.device)
    high = (a.sum(-1, keepdim=True) / d).sqrt().clamp_min(0) + g2.max().clamp_min(torch.finfo(torch.float64).tiny)
    for _ in range(iterations):
        mu = (low + high) / 2
        large = (a / (g2 + mu).square().clamp_min(torch.finfo(torch.float64).tiny)).sum(-1, keepdim=True) > d
        low, high = torch.where(large, mu, low), torch.where(large, high, mu)
    n = gain.double() * c / (g2 + high).clamp_min(torch.finfo(torch.float64).tiny)
    size = n.square().mean(-1, keepdim=True).sqrt()
    return torch.where(size > 0, n / size.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(n))


@torch.no_grad()
def refit_error(refitted: nn.Module, kept: nn.Module, arch: Architecture, hidden: list[Tensor], calls: list,
                targets: list[Tensor]) -> dict:
    """How closely a block whose ``down_proj`` was refitted through a norm after it (``refit_approximation``)
    reaches ``targets`` on the calibration tokens, measured by running it: each figure is the share of the
    change the target makes to the input, ``sum ||y - target||^2 / sum ||target - x||^2`` over the tokens (0:
    exact; 1: no better than passing the input on), for ``refitted`` (``y`` its output), for ``kept`` (the
    block as it was, not refitted: what dropping the others leaves) and for the best any ``down_proj`` could
    do through the refitted block's norm, its attention as it is (each token's output direction chosen best,
    ``post_norm_direction``). Blocks compute where ``refitted`` lives; ``kept`` visits that device."""
    device = next(refitted.parameters()).device
    post = refitted.get_submodule(arch.mlp_post_norm)
    gain = arch.norm_scale(post.weight.detach().double())
    seen: list[Tensor] = []
    handle = refitted.get_submodule(arch.mlp_input).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        outputs = run_block(refitted, [x.to(device) for x in hidden], calls, "refitted block")
    finally:
        handle.remove()
    with on_device(kept, device):
        before = run_block(kept, [x.to(device) for x in hidden], calls, "block as it was")
    total = {"refitted": 0.0, "unrefitted": 0.0, "best direction": 0.0}
    change, tokens = 0.0, 0
    for x, y, y0, u, target in zip(hidden, outputs, before, seen, targets):
        x, y, y0, u, target = (token_rows(t.to(device)).double() for t in (x, y, y0, u, target))
        want = target - u
        best = gain.to(device) * post_norm_direction(want, gain.to(device))
        total["refitted"] += float((y - target).square().sum())
        total["unrefitted"] += float((y0 - target).square().sum())
        total["best direction"] += float((best - want).square().sum())
        change += float((target - x).square().sum())
        tokens += x.shape[0]
    change = max(change, torch.finfo(torch.float64).tiny)
    return {"approximation": arch.refit_approximation, "tokens": tokens,
            "unexplained": {key: value / change for key, value in total.items()}}


def _run_until_stopped(block: nn.Module, path: str, hook, hidden: list[Tensor], calls: list) -> None:
    handle = block.get_submodule(path).register_forward_pre_hook(hook)
    try:
        for x, (args, kwargs) in zip(hidden, calls):
            try:
                block(x, *args, **kwargs)
            except _Stop:
                continue
            raise RuntimeError(f"the forward pass of {type(block).__name__} never reached {path!r}")
    finally:
        handle.remove()


@torch.no_grad()
def input_similarity(layers: list[nn.Module], hidden: list[Tensor], calls_per_layer: list[list], measure,
                     device: torch.device | None = None, progress: bool = False) -> Tensor:
    """``S[i, j]``: the mean over tokens of ``measure(cos(X_i, X_j))`` for the inputs ``X`` of the layers,
    computed batch by batch (L x L per token, never tokens x tokens). With ``device``, each layer visits it
    only while it runs."""
    count = len(layers)
    total = torch.zeros(count, count, dtype=torch.float64)
    tokens = 0
    for b, x in enumerate(tqdm(hidden, desc="block-input similarity", unit="batch", disable=not progress)):
        units = []  # the unit-normalised inputs of the layers so far, for this batch
        for i, layer in enumerate(layers):
            unit = torch.nn.functional.normalize(token_rows(x).float(), dim=-1)
            units.append(unit)
            row = torch.stack([measure(torch.linalg.vecdot(other, unit)).sum() for other in units])
            total[i, : i + 1] += row.double().cpu()
            total[: i + 1, i] = total[i, : i + 1].clone()
            args, kwargs = calls_per_layer[i][b]
            with on_device(layer, device or x.device):
                x = _output(layer(x, *args, **kwargs))
        tokens += units[0].shape[0]
    return total / tokens
