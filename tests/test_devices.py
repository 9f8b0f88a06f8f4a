"""Work stays on one device per op, without a GPU: every registered strategy on a tiny model whose blocks sit on a
second device that the CPU can tell apart from itself.

The second device is a stand-in for a GPU: PyTorch's spare backend slot ``privateuseone`` (registered here as a
Python backend, with a no-op device guard). A tensor "on" it is an ``Elsewhere``: a wrapper around a CPU tensor
whose ``.device`` is ``privateuseone:0``. Every op on any tensor goes through ``_StandIn`` (a dispatch mode) that
checks the devices of its tensor arguments as CUDA does, and raises ``MixedDevices`` on an op that mixes the CPU
and the stand-in (as CUDA raises "Expected all tensors to be on the same device"): a CPU scalar (0-dim tensor) is
allowed beside the stand-in's tensors (not joined to them by ``cat``/``stack``), a CPU index tensor may index
the stand-in's tensor, and ``.to()`` / ``copy_`` move between the two. It also refuses what CUDA lacks that the
code could reach for: ``torch.linalg.lstsq`` with a driver other than ``gels``. It then computes the op on the
CPU values, so a run on the stand-in gives bit for bit the CPU run's numbers wherever the code takes the same
path on both.

The placements, as on a GPU machine: ``dispatched`` (accelerate's hooks: blocks 0, 2 and 4, the embeddings,
final norm and head on the stand-in; blocks 1 and 3 offloaded to CPU memory and 5 to disk, all computing on the
stand-in, so that any two adjacent blocks a strategy merges live on two devices: the case of an H200 run where
``torch.cat`` met a CPU and a CUDA tensor), ``resident`` (the whole model moved to the stand-in) and
``streamed`` (weights in CPU memory, ``device=`` the stand-in); every scorer and policy (in FlattenGPT) in the
``dispatched`` placement. Each run must also take the CPU run's decisions and end in its weights.

These rules were checked against a real H200 (torch 2.11): on 23 ops mixing or moving devices (products,
``cat``, ``stack``, ``equal``, indexing both ways, ``index_select``, ``index_put_``, ``masked_fill``, in-place
ops, ``copy_``, CPU scalars, ``lstsq`` drivers, ``eigh``) the stand-in refuses what CUDA refuses and runs what CUDA
runs; and the one failure this test finds in a strategy (see its message) is the one ``tests/test_cuda.py`` met
there.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from flatten import STRATEGIES, Flattener, get_strategy
from flatten.criteria import POLICIES, SCORERS
from flatten.models.dispatch import weights_of
from tiny import TinySpec, tiny_model

CPU, META = torch.device("cpu"), torch.device("meta")
ELSEWHERE = torch.device("privateuseone", 0)
aten = torch.ops.aten

_MOVES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}  # legitimate moves between devices
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
_JOINS = {aten.cat.default, aten.stack.default}

_SPEC = TinySpec("qwen2", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=8, intermediate_size=24,
                 num_layers=6, bias=True, dtype=torch.float32)
_CALIBRATION = torch.randint(0, 61, (8, 16), generator=torch.Generator().manual_seed(0))


class MixedDevices(RuntimeError):
    """An op was given tensors on the CPU and on the stand-in GPU (CUDA would refuse it)."""


def _register_backend() -> None:
    """Make ``privateuseone`` a Python backend (once per process; it reports itself unavailable, so nothing
    that looks for an accelerator finds it)."""
    from torch.utils.backend_registration import (_DummyBackendModule, _DummyPrivateUse1Hook,
                                                  _setup_privateuseone_for_python_backend)

    if hasattr(torch, "privateuseone"):
        return

    class Module(_DummyBackendModule):
        def is_available(self) -> bool:
            return False

        def get_amp_supported_dtype(self) -> list:
            return [torch.float16, torch.bfloat16]

    class Hook(_DummyPrivateUse1Hook):
        def is_available(self) -> bool:
            return False

    _setup_privateuseone_for_python_backend(backend_module=Module(), hook=Hook())


class Elsewhere(Tensor):
    """A tensor on the stand-in GPU; its values are ``elem``, on the CPU. Called as a class, it builds a parameter
    like ``nn.Parameter`` (accelerate rebuilds a parameter as ``type(param)(value, requires_grad=...)``)."""

    elem: Tensor

    def __new__(cls, data=None, requires_grad=False):
        return torch.nn.Parameter(data, requires_grad)

    @staticmethod
    def wrap(elem: Tensor) -> "Elsewhere":
        out = Tensor._make_wrapper_subclass(Elsewhere, elem.shape, strides=elem.stride(),
                                            storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                            layout=elem.layout, device=ELSEWHERE, requires_grad=False)
        out.elem = elem
        return out

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"Elsewhere({self.elem!r})"

    def __deepcopy__(self, memo):
        out = Elsewhere.wrap(self.elem.detach().clone())
        if getattr(self, "_is_param", False):
            out = torch.nn.Parameter(out, self.requires_grad)
        memo[id(self)] = out
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _where(t: Tensor) -> torch.device:
    if isinstance(t, Elsewhere):
        return ELSEWHERE
    if t.device.type == ELSEWHERE.type:
        raise AssertionError("a tensor on the stand-in GPU that is not an Elsewhere (moved there through "
                             "`.data = ...`, which this stand-in does not follow)")
    return t.device


def _device(device) -> torch.device:
    device = torch.device(device)
    return ELSEWHERE if device.type == ELSEWHERE.type else device


def _check(func, args, kwargs, tensors: list[Tensor]) -> set[torch.device]:
    """The devices of the op's tensors as CUDA checks them; raises ``MixedDevices`` where CUDA would refuse."""
    if func in _MOVES:
        return set()
    checked = tensors
    if func in _INDEXING:
        indices = [i for i in args[1] if i is not None]
        for index in indices:
            if _where(index) not in (CPU, _where(args[0])):
                raise MixedDevices(f"indices on {_where(index)} for a tensor on {_where(args[0])} ({func})")
        checked = [t for t in tensors if not any(t is i for i in indices)]
    scalars_allowed = func not in _JOINS  # CPU scalars beside the GPU's tensors, but not joined to them
    devices = {_where(t) for t in checked if not (scalars_allowed and t.dim() == 0 and _where(t) == CPU)}
    if len(devices) > 1:
        raise MixedDevices(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{' and '.join(sorted(map(str, devices)))}! ({func})")
    if func is aten.linalg_lstsq.default and devices == {ELSEWHERE}:
        driver = kwargs.get("driver", args[3] if len(args) > 3 else None)
        if driver not in (None, "gels"):
            raise RuntimeError(f"torch.linalg.lstsq: `driver` other than `gels` is not supported on CUDA "
                               f"(got {driver!r}; nor on the stand-in GPU)")
    return devices


def _run(func, args, kwargs):
    """``func`` checked, computed on the CPU values, its results put where CUDA would put them."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
    devices = _check(func, args, kwargs, tensors)
    if kwargs.get("device") is not None:
        target = _device(kwargs["device"])
        if target == ELSEWHERE:
            kwargs = {**kwargs, "device": CPU}
    elif func is aten.copy_.default or func in _INDEXING:
        target = _where(args[0])
    elif devices:
        target = devices.pop()
    else:
        target = ELSEWHERE if any(isinstance(t, Elsewhere) for t in tensors) else CPU
    wrappers = {id(t.elem): t for t in tensors if isinstance(t, Elsewhere)}
    args, kwargs = tree_map(lambda t: t.elem if isinstance(t, Elsewhere) else t, (args, kwargs))
    out = func(*args, **kwargs)
    if target != ELSEWHERE:
        return out

    def put(t):
        if not isinstance(t, Tensor):
            return t
        same = wrappers.get(id(t))  # an in-place op returns its input
        return Elsewhere.wrap(t) if same is None else same

    return tree_map(put, out)


class _StandIn(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _Host(TorchFunctionMode):
    """What does not reach the dispatcher: ``torch.tensor(data, device=)`` (built on the CPU, then moved) and
    ``tolist``/``numpy`` of a tensor on the stand-in (as CUDA: ``tolist`` copies to the CPU, ``numpy`` refuses)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and kwargs.get("device") is not None \
                and _device(kwargs["device"]) == ELSEWHERE:
            return func(*args, **{**kwargs, "device": CPU}).to(ELSEWHERE)
        if func is Tensor.tolist and isinstance(args[0], Elsewhere):
            return args[0].elem.tolist()
        if func in (Tensor.numpy, Tensor.__array__) and isinstance(args[0], Elsewhere):
            raise TypeError(f"can't convert {ELSEWHERE} device type tensor to numpy. Use Tensor.cpu() first.")
        return func(*args, **kwargs)


@contextmanager
def stand_in_gpu():
    """For the duration, ``ELSEWHERE`` works as a second device and every op is checked (no autograd: the
    stand-in's tensors do not record gradients; modules moved by ``.to()`` get new parameter objects)."""
    _register_backend()
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with _Host(), _StandIn(), torch.no_grad():
            yield ELSEWHERE
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


# ---- the harness itself ----

def test_the_stand_in_gpu_refuses_what_cuda_refuses_and_computes_what_the_cpu_computes():
    model = tiny_model(_SPEC).requires_grad_(False)
    ids = _CALIBRATION[:2]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with stand_in_gpu() as gpu:
        x, y = torch.randn(3, 4), torch.randn(4, 2).to(gpu)
        assert y.device == gpu and x.device == CPU
        with pytest.raises(MixedDevices, match="cpu and privateuseone:0"):
            x @ y
        with pytest.raises(MixedDevices):
            torch.cat([x.T, y], dim=1)
        with pytest.raises(MixedDevices):
            torch.stack([torch.tensor(1.0), torch.tensor(2.0).to(gpu)])  # no CPU scalar joined to the GPU's
        assert torch.equal((x.to(gpu) @ y).cpu(), x @ y.cpu())
        assert (y * torch.tensor(2.0)).device == gpu  # a CPU scalar, as CUDA allows
        assert y[torch.tensor([0, 2])].device == gpu  # CPU indices, as CUDA allows
        with pytest.raises(RuntimeError, match="gels"):
            torch.linalg.lstsq(y.T @ y, y.T, driver="gelsd")
        moved = copy.deepcopy(model).to(gpu)
        assert {p.device for p in moved.parameters()} == {gpu}
        with pytest.raises(MixedDevices):
            moved(input_ids=ids)
        got = moved(input_ids=ids.to(gpu)).logits
        assert got.device == gpu
        assert torch.equal(got.cpu(), expected)


# ---- every strategy in three placements; every scorer and policy dispatched ----

_ON_GPU, _IN_CPU_MEMORY, _ON_DISK = (0, 2, 4), (1, 3), (5,)  # any two adjacent blocks: on two devices
_REFERENCE: dict[tuple, tuple] = {}  # (what, name) -> (the CPU run's weights, its decisions)


def _decisions(record) -> list:
    if hasattr(record, "merges"):
        return [(m.span, m.keep_groups, m.keep_channels) for m in record.merges]
    return [record.removed, getattr(record, "zeroed", []), getattr(record, "mlp_width", None)]


def _build(what: str, name: str, model, **harness):
    """The strategy ``name``, or FlattenGPT with the scorer or policy ``name``, on ``model``."""
    factory = {"strategy": get_strategy, "scorer": SCORERS.get, "policy": POLICIES.get}[what](name)
    parameters = inspect.signature(factory).parameters
    required = [key for key, p in parameters.items() if p.default is p.empty and key not in ("model", "calibration")
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        pytest.skip(f"{what} {name} needs options this test cannot choose: {', '.join(required)}")
    if what != "strategy":
        return Flattener(model, _CALIBRATION, progress=False, **{what: name}, **harness)
    if "search_samples" in parameters:
        harness["search_samples"] = 4  # searches score on one batch: a few seconds a run here
    return factory(model, _CALIBRATION, progress=False, **harness)


def _reference(what: str, name: str) -> tuple:
    if (what, name) not in _REFERENCE:
        with torch.no_grad():
            model, record = _build(what, name, tiny_model(_SPEC).requires_grad_(False)).compress(remove=2)
        _REFERENCE[what, name] = (model.state_dict(), _decisions(record))
    return _REFERENCE[what, name]


def _dispatched(model, gpu, folder):
    """``model`` dispatched by accelerate as a GPU machine would: blocks ``_ON_GPU`` and the rest of the model
    on ``gpu``; the others offloaded to CPU memory or disk, computing on ``gpu``."""
    from accelerate import dispatch_model

    device_map = {name: gpu for name in ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head")}
    device_map.update({f"model.layers.{i}": gpu for i in _ON_GPU})
    device_map.update({f"model.layers.{i}": "cpu" for i in _IN_CPU_MEMORY})
    device_map.update({f"model.layers.{i}": "disk" for i in _ON_DISK})
    model = dispatch_model(model, device_map, main_device=gpu, offload_dir=str(folder))
    model.hf_device_map = {name: where if where in ("cpu", "disk") else gpu.type for name, where in device_map.items()}
    return model


def _check_one_device_per_op(what: str, name: str, placement: str, folder) -> None:
    """``name`` compresses the tiny model placed so on the stand-in GPU without an op that mixes devices, to the
    CPU run's decisions and weights, leaving the blocks where they belong."""
    expected, decisions = _reference(what, name)
    model = tiny_model(_SPEC).requires_grad_(False)
    with stand_in_gpu() as gpu:
        if placement == "dispatched":
            model, harness = _dispatched(model, gpu, folder), {}
        elif placement == "resident":
            model, harness = model.to(gpu), {}
        else:
            harness = {"device": gpu}
        got, record = _build(what, name, model, **harness).compress(remove=2)
        assert _decisions(record) == decisions
        for i, block in enumerate(got.model.layers):
            devices = frozenset(p.device for p in block.parameters())
            if placement == "dispatched":  # on the GPU or offloaded (kept where it was, or placed like the
                entry = got.hf_device_map[f"model.layers.{i}"]  # blocks it replaced); none came to the CPU for good
                offloaded = entry in ("cpu", "disk") and META in devices <= {META, gpu}  # gpu: made resident in part
                assert offloaded or (entry, devices) == (gpu.type, {gpu}), (i, entry, devices)
            else:  # resident: all on the GPU; streamed: the weights stay where the user keeps them
                assert devices == {gpu if placement == "resident" else CPU}, (i, devices)
        state = {key: t.cpu() for key, t in weights_of(got).items()}
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        # bit for bit where the code takes the same path on both devices; ReplaceMe's solve takes another off the
        # CPU (LAPACK's gelsd there, an eigendecomposition here), float64 rounded to float32 weights: an ulp or so
        torch.testing.assert_close(state[key], tensor, rtol=1e-6, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("placement", ["dispatched", "resident", "streamed"])
@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_every_strategy_keeps_each_op_on_one_device(strategy, placement, tmp_path):
    _check_one_device_per_op("strategy", strategy, placement, tmp_path)


@pytest.mark.parametrize("scorer", SCORERS.names())
def test_every_scorer_keeps_each_op_on_one_device(scorer, tmp_path):
    _check_one_device_per_op("scorer", scorer, "dispatched", tmp_path)


@pytest.mark.parametrize("policy", POLICIES.names())
def test_every_policy_keeps_each_op_on_one_device(policy, tmp_path):
    _check_one_device_per_op("policy", policy, "dispatched", tmp_path)


@pytest.mark.parametrize("tokens", [64, 5])  # full rank; fewer tokens than channels (a singular Gram matrix)
def test_replacemes_solve_off_the_cpu_gives_what_gelsd_gives_on_it(tokens):
    from flatten.strategies.baselines import _minimum_norm_solution

    generator = torch.Generator().manual_seed(0)
    m, target = (torch.randn(tokens, 16, dtype=torch.float64, generator=generator) for _ in range(2))
    gram, cross = m.T @ m, m.T @ target
    expected = _minimum_norm_solution(gram, cross)  # LAPACK's gelsd
    with stand_in_gpu() as gpu:
        got = _minimum_norm_solution(gram.to(gpu), cross.to(gpu))  # CUDA has no gelsd: the eigendecomposition
        assert got.device == gpu
        got = got.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(expected, torch.linalg.lstsq(gram, cross, driver="gelsd").solution)
