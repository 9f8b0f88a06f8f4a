"""Latency: interleaved runs, and after / before ratios that say when the machine's noise could explain them; the
Stopwatch that times phases."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from flatten.evaluation.latency import Ratio, latency_ratios
from flatten.evaluation.measure import Stopwatch
from tiny import TinySpec, tiny_model


def test_a_ratio_is_resolved_only_when_its_interval_leaves_out_one():
    faster = Ratio.of([0.80, 0.82, 0.79, 0.85, 0.81, 0.83, 0.80, 0.84, 0.78])
    assert faster.resolved and faster.low == 0.79 and faster.high == 0.84 and 0.95 <= faster.coverage < 0.97
    noisy = Ratio.of([0.9, 1.1, 0.95, 1.05, 1.0, 0.97, 1.02, 0.99, 1.01])
    assert not noisy.resolved and "not resolved" in str(noisy)
    assert not Ratio.of([0.5, 0.5, 0.5]).resolved  # three pairs: too few to tell (coverage 75 %)


@given(st.lists(st.floats(0.1, 10), min_size=1, max_size=40))
def test_the_interval_holds_the_median(ratios):
    ratio = Ratio.of(ratios)
    assert ratio.low <= ratio.median <= ratio.high and ratio.pairs == len(ratios)
    assert min(ratios) <= ratio.low and ratio.high <= max(ratios)


def test_latency_ratios_time_both_models_in_turn():
    spec = TinySpec("llama", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=4, intermediate_size=24,
                    num_layers=4, dtype=torch.float32)
    big, small = tiny_model(spec), tiny_model(spec)
    del small.model.layers[2:]
    small.config.num_hidden_layers = 2
    after, before, prefill, decode = latency_ratios(small, big, prompt=8, new_tokens=2, repeats=5)
    assert after.repeats == before.repeats == prefill.pairs == decode.pairs == 5
    assert prefill.median > 0 and decode.low <= decode.median <= decode.high


def test_a_stopwatch_synchronises_at_each_phase_start_and_end_where_told(monkeypatch):
    calls = []
    monkeypatch.setattr(Stopwatch, "synchronize", lambda: calls.append(len(watch.seconds)))
    watch = Stopwatch()
    with watch("a"):
        pass
    with watch("a"):
        pass
    assert calls == [0, 0, 1, 1] and list(watch.seconds) == ["a"]
