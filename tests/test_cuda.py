"""The CUDA path: every strategy, scorer and policy on a GPU gives what it gives on the CPU (skipped without one).

Two ways a user runs on a GPU: weights stay on the CPU and only the block in hand visits the device
(``device="cuda"``), or the whole model is on the device already. Both must end in the CPU run's result,
up to the order of floating-point sums.
"""

import copy

import pytest
import torch

from flatten import ARCHITECTURES, Flattener, get_strategy
from flatten.criteria import SCORERS
from tiny import TinySpec, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CALIBRATION = torch.randint(0, 61, (8, 24), generator=torch.Generator().manual_seed(5))


def _spec(model_type: str) -> TinySpec:
    return TinySpec(model_type, hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=8, intermediate_size=40,
                    num_layers=6, bias=model_type == "qwen2", dtype=torch.float64)


def _removed(record) -> list:
    """What a strategy's record says it took out: merge spans, or removed blocks / sub-layers / MLP width."""
    if hasattr(record, "merges"):
        return [(m.span, m.keep_groups) for m in record.merges]
    return record.removed, record.zeroed, record.mlp_width


def _assert_same_model(a, b):
    """Same logits up to float32 rounding: the statistics multiply float32 activations (summed in float64),
    and a CPU and a GPU round those products differently; the least-squares refits carry that through."""
    ids = CALIBRATION[:2]
    expected, got = a.cpu()(input_ids=ids).logits, b.cpu()(input_ids=ids).logits
    assert (got - expected).norm() <= 1e-4 * expected.norm()


@pytest.mark.parametrize("strategy", ["flattengpt", "shortgpt", "sleb", "laco", "blockpruner", "prune-only"])
@pytest.mark.parametrize("model_type", ARCHITECTURES.names())
def test_each_strategy_gives_the_cpu_result_on_cuda(strategy, model_type):
    original, kind = tiny_model(_spec(model_type)), get_strategy(strategy)
    options = {"collapse": 2, "threshold": 0.0} if strategy == "laco" else {}
    on_cpu, cpu_record = kind(copy.deepcopy(original), CALIBRATION, progress=False, **options).compress(remove=2)
    streamed, streamed_record = kind(copy.deepcopy(original), CALIBRATION, device="cuda", progress=False,
                                     **options).compress(remove=2)
    assert next(streamed.parameters()).device.type == "cpu"  # the weights stay where the user keeps them
    resident, resident_record = kind(copy.deepcopy(original).cuda(), CALIBRATION, progress=False,
                                     **options).compress(remove=2)
    assert next(resident.parameters()).device.type == "cuda"
    assert _removed(cpu_record) == _removed(streamed_record) == _removed(resident_record)
    _assert_same_model(on_cpu, streamed)
    _assert_same_model(on_cpu, resident)


@pytest.mark.parametrize("scorer", SCORERS.names())
@pytest.mark.parametrize("policy", ["greedy", "greedy-recompute", "trial-loss"])
def test_each_scorer_and_policy_gives_the_cpu_result_on_cuda(scorer, policy):
    original = tiny_model(_spec("qwen2"))
    results = []
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(original)
        results.append(Flattener(model, CALIBRATION, scorer=scorer, policy=policy, device=device,
                                 progress=False).compress(remove=2))
    (on_cpu, cpu_plan), (on_cuda, cuda_plan) = results
    assert [(m.span, m.keep_groups, m.keep_channels) for m in cpu_plan.merges] == \
        [(m.span, m.keep_groups, m.keep_channels) for m in cuda_plan.merges]
    _assert_same_model(on_cpu, on_cuda)


def test_a_compressed_model_generates_with_its_kv_cache_on_cuda():
    model, _ = Flattener(tiny_model(_spec("llama")).cuda().float(), CALIBRATION, progress=False).compress(remove=2)
    prompt = CALIBRATION[:2, :6].cuda()
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("strategy", ["flattengpt", "replaceme", "sleb"])
def test_a_model_dispatched_over_the_gpu_and_cpu_memory_gives_the_cpu_result(tmp_path, strategy):
    """Blocks 0-2 on the GPU, 3-5 offloaded to CPU memory by accelerate (meta weights behind hooks)."""
    from transformers import AutoModelForCausalLM

    from flatten import save_checkpoint

    tiny_model(_spec("qwen2")).save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0,
                  **{f"model.layers.{i}": 0 if i < 3 else "cpu" for i in range(6)}}
    dispatched = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map, dtype=torch.float64)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float64)
    on_cpu, cpu_record = get_strategy(strategy)(plain, CALIBRATION, progress=False).compress(remove=2)
    on_gpu, gpu_record = get_strategy(strategy)(dispatched, CALIBRATION, progress=False).compress(remove=2)
    assert _removed(cpu_record) == _removed(gpu_record)
    save_checkpoint(on_gpu, tmp_path / "out")
    _assert_same_model(on_cpu, AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64))
