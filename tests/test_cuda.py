"""The CUDA path: every registered strategy, scorer and policy on a GPU gives what it gives on the CPU (skipped
without one).

Three ways a model meets a GPU, each in float32 and in bfloat16, each against the CPU's run in the same dtype:
``resident`` (the whole model on the GPU), ``streamed`` (weights in CPU memory, ``device="cuda"``: only the block
in hand visits the GPU; the weights must stay where the user keeps them) and ``dispatched`` (accelerate's hooks:
blocks 0, 2 and 4 and the rest of the model on the GPU, blocks 1 and 3 offloaded to CPU memory and 5 to disk, all
computing on the GPU, so any two adjacent blocks live on two devices).

- float32: the same decisions (blocks removed, spans merged, KV groups and channels kept) and logits within
  ``FLOAT32_LOGITS`` of the CPU model's (norm of the difference over the norm). CPU and GPU kernels round float32
  products and sums in other orders (PyTorch's default keeps TF32 off), the statistics sum those products in
  float64, and the least-squares refits carry the difference on, amplified by the statistics' conditioning.
- bfloat16: the same decisions, and the mean calibration loss of the compressed model within ``BFLOAT16_LOSS``
  of the CPU's (relative), rather than its logits: bf16 keeps 8 bits of mantissa (0.4 % per rounding) and CPU and
  GPU kernels may round and accumulate bf16 products differently, so single logits may differ by a bf16 step;
  the loss averages over every calibration token, while a wrong weight moves it by percents (the candidates
  these strategies choose between differ by 1-4 % in loss here). The decisions are taken on float64 statistics;
  on these tiny models no two candidates are as close as the bf16 rounding (the CPU's float32 and bf16 runs of
  every strategy take the same decisions).

Tiny models (6 blocks, 8 x 16 calibration tokens, 2 removed), searches on 4 sequences: the whole file ran in 27 s
on an H200 (torch 2.11; 139 runs against their CPU references).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from flatten import STRATEGIES, Flattener, get_strategy
from flatten.calibration import _tensor_core_sums, add_upper_gram, product32, symmetric
from flatten.criteria import POLICIES, SCORERS
from flatten.evaluation.perplexity import mean_nll
from flatten.models.dispatch import device_of
from tiny import TinySpec, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")
CALIBRATION = torch.randint(0, 61, (8, 16), generator=torch.Generator().manual_seed(5))
PLACEMENTS = ["resident", "streamed", "dispatched"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FLOAT32_LOGITS = 1e-4  # seen on an H200: at most 3.5e-6
BFLOAT16_LOSS = 2e-3  # seen on an H200: equal to 5 decimals
_ON_GPU, _IN_CPU_MEMORY, _ON_DISK = (0, 2, 4), (1, 3), (5,)
_REFERENCES: dict[tuple, tuple] = {}  # (what, name, dtype) -> the CPU run's model and decisions


def _spec(model_type: str = "qwen2") -> TinySpec:
    return TinySpec(model_type, hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=8, intermediate_size=40,
                    num_layers=6, bias=model_type == "qwen2", dtype=torch.float32)


def _decisions(record) -> list:
    """What a strategy's record says it took out: merge spans with the groups and channels kept, or removed
    blocks / zeroed sub-layers / MLP width."""
    if hasattr(record, "merges"):
        return [(m.span, m.keep_groups, m.keep_channels) for m in record.merges]
    return [record.removed, getattr(record, "zeroed", []), getattr(record, "mlp_width", None)]


def _required(factory) -> list[str]:
    """Options ``factory`` cannot be called without (beyond the model and calibration of a strategy)."""
    return [name for name, p in inspect.signature(factory).parameters.items()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and name not in ("model", "calibration")]


def _builder(what: str, name: str):
    """``build(model, **harness)``: the strategy ``name``, or FlattenGPT with scorer or policy ``name``."""
    factory = {"strategy": get_strategy, "scorer": SCORERS.get, "policy": POLICIES.get}[what](name)
    if _required(factory):
        pytest.skip(f"{what} {name} needs options this test cannot choose: {', '.join(_required(factory))}")
    if what == "strategy":
        options = {"search_samples": 4} if "search_samples" in inspect.signature(factory).parameters else {}
        return lambda model, **harness: factory(model, CALIBRATION, progress=False, **options, **harness)
    return lambda model, **harness: Flattener(model, CALIBRATION, progress=False, **{what: name}, **harness)


def _reference(what: str, name: str, dtype: torch.dtype):
    key = (what, name, dtype)
    if key not in _REFERENCES:
        model, record = _builder(what, name)(tiny_model(_spec()).to(dtype)).compress(remove=2)
        _REFERENCES[key] = (model, _decisions(record))
    return _REFERENCES[key]


def _dispatched(model, folder):
    from accelerate import dispatch_model

    gpu = GPU.index if GPU.type == "cuda" else GPU.type
    device_map = {name: gpu for name in ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head")}
    device_map.update({f"model.layers.{i}": gpu for i in _ON_GPU})
    device_map.update({f"model.layers.{i}": "cpu" for i in _IN_CPU_MEMORY})
    device_map.update({f"model.layers.{i}": "disk" for i in _ON_DISK})
    model = dispatch_model(model, device_map, main_device=GPU, offload_dir=str(folder))
    model.hf_device_map = device_map  # as transformers records it
    return model


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    ids = CALIBRATION[:2]
    return model(input_ids=ids.to(device_of(model))).logits.float().cpu()


def _check_gives_the_cpu_result(what: str, name: str, placement: str, dtype: str, folder):
    expected, decisions = _reference(what, name, DTYPES[dtype])
    model = tiny_model(_spec()).to(DTYPES[dtype])
    harness = {}
    if placement == "resident":
        model = model.to(GPU)
    elif placement == "streamed":
        harness = {"device": GPU.type}
    else:
        model = _dispatched(model, folder)
    got, record = _builder(what, name)(model, **harness).compress(remove=2)
    assert _decisions(record) == decisions
    devices = {p.device.type for p in got.parameters()}
    if placement == "dispatched":  # on the GPU or offloaded; no block came to the CPU for good
        assert devices <= {GPU.type, "meta"}
    else:  # streamed: the weights stay where the user keeps them
        assert devices == {GPU.type if placement == "resident" else CPU.type}
    assert all(p.dtype == DTYPES[dtype] for p in got.parameters() if not p.is_meta)
    if dtype == "float32":
        want, have = _logits(expected), _logits(got)
        error = float((have - want).norm() / want.norm())
        print(f"\n{what} {name} {placement} {dtype}: logits off by {error:.1e} (relative)")
        assert error <= FLOAT32_LOGITS
    else:
        batches = list(CALIBRATION.split(4))
        want, have = mean_nll(expected, batches), mean_nll(got, batches)
        print(f"\n{what} {name} {placement} {dtype}: loss {have:.5f} against {want:.5f} on the CPU")
        assert abs(have - want) <= BFLOAT16_LOSS * want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_each_strategy_gives_the_cpu_result_on_cuda(strategy, placement, dtype, tmp_path):
    _check_gives_the_cpu_result("strategy", strategy, placement, dtype, tmp_path)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("scorer", SCORERS.names())
def test_each_scorer_gives_the_cpu_result_on_cuda(scorer, placement, dtype, tmp_path):
    _check_gives_the_cpu_result("scorer", scorer, placement, dtype, tmp_path)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("policy", POLICIES.names())
def test_each_policy_gives_the_cpu_result_on_cuda(policy, placement, dtype, tmp_path):
    _check_gives_the_cpu_result("policy", policy, placement, dtype, tmp_path)


def test_a_compressed_model_generates_with_its_kv_cache_on_cuda():
    model, _ = Flattener(tiny_model(_spec("llama")).to(GPU), CALIBRATION, progress=False).compress(remove=2)
    prompt = CALIBRATION[:2, :6].to(GPU)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_bfloat16_statistics_on_cuda_are_float32_sums_of_exact_products():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 70, generator=generator).bfloat16()
    y = torch.randn(300, 9, generator=generator)  # float32: the refit's target minus the MLP's input
    assert _tensor_core_sums(GPU), "torch.mm(..., out_dtype=torch.float32) is missing: bf16 statistics upcast"
    gram = torch.zeros(70, 70, dtype=torch.float64, device=GPU)
    add_upper_gram(gram, x.to(GPU), rows=16)
    want = x.double().T @ x.double()
    assert float((symmetric(gram).cpu() - want).norm() / want.norm()) <= 1e-6
    want = x.double().T @ y.double()
    cross = product32(x.to(GPU).T, y.to(GPU)).double().cpu()
    assert float((cross - want).norm() / want.norm()) <= 2e-5  # y kept to 16 bits: 2**-17 per entry
