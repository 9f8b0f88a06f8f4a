"""Strategy options: declared once on the constructor, parsed alike for Python, the CLI and compare.py."""

import json
import textwrap

import pytest
import torch

import flatten  # noqa: F401  (registers every built-in strategy)
from flatten.criteria import FixedSpans, FlattenGPTScorer
from flatten.criteria.policies import ContiguousCut
from flatten.run.cli import main
from flatten.strategies.compressor import STRATEGIES, get_strategy
from flatten.strategies.options import Method, build_strategy, options_of, parse_spans, strategies_help
from tiny import TinySpec, tiny_model

FAST = ["--samples", "2", "--seq-len", "16", "--batch-size", "2", "--no-eval", "--no-latency", "--quiet"]


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_built_in_option_declares_a_type_and_a_help(name):
    for option in options_of(get_strategy(name)).values():
        assert option.types() and option.help, f"{name}: option {option.name} lacks a type or a help text"


def test_options_convert_to_their_declared_types():
    arguments = Method.parse("laco:collapse=3:threshold=0.5:lowest=none:search_samples=2").arguments()
    assert arguments == {"collapse": 3, "threshold": 0.5, "lowest": None, "search_samples": 2}
    arguments = Method.parse("flattengpt:prune=0:one_block_fallback=loss:checkpoint=p.json").arguments()
    assert arguments["prune"] is False and arguments["one_block_fallback"] == "loss"
    assert str(arguments["checkpoint"]) == "p.json"
    assert parse_spans("9-10+13-14") == parse_spans("9-10,13-14") == [(9, 10), (13, 14)]


def test_scorer_and_policy_options_build_them_and_a_bare_name_stays_a_name():
    arguments = Method.parse("cut-absorb:policy=fixed:policy.spans=1-2+3-4:ridge=3").arguments()
    assert isinstance(arguments["policy"], FixedSpans) and arguments["policy"].spans == [(1, 2), (3, 4)]
    assert isinstance(arguments["scorer"], FlattenGPTScorer) and arguments["scorer"].ridge == 3.0
    assert arguments["scorer"].heads == "reconstruction"  # the default scorer, with one option changed
    arguments = Method.parse("cut-absorb:policy.tokens=all:scorer=flattengpt:scorer.ridge=2").arguments()
    assert isinstance(arguments["policy"], ContiguousCut) and arguments["policy"].tokens == "all"
    assert arguments["scorer"].heads == "contribution" and arguments["scorer"].ridge == 2.0
    assert Method.parse("flattengpt:scorer=magnitude:policy=greedy").arguments() == {"scorer": "magnitude",
                                                                                     "policy": "greedy"}


@pytest.mark.parametrize("text, says", [
    ("sleb:ridge=3", "sleb has no option 'ridge'; its options: search_samples (int | None"),
    ("sleb:search_samples=many", "search_samples='many': expected int | None"),
    ("sleb:search_samples", "is not key=value"),
    ("cut-absorb:policy.nope=1", "policy 'cut' has no option 'nope'; its options: tokens"),
    ("flattengpt:policy=fixed", "policy 'fixed' needs its option spans"),
    ("flattengpt:policy=fixed:policy.spans=1to2", "spans must look like 9-10+13-14"),
    ("flattengpt:scorer=magnitude:ridge=3", "scorer 'magnitude' has no option 'ridge'"),
    ("flattengpt:scorer=nonsense", "unknown scorer 'nonsense'; known:"),
    ("dropout", "unknown strategy 'dropout'; known:"),
])
def test_bad_options_get_clear_errors(text, says):
    with pytest.raises(ValueError, match=None) as error:
        Method.parse(text).arguments()
    assert says in str(error.value)


def test_build_strategy_equals_the_constructor():
    spec = TinySpec("llama", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=4, intermediate_size=24,
                    num_layers=5, dtype=torch.float32)
    calibration = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(0))
    made = build_strategy("replaceme:ridge=0.5:tokens=all", tiny_model(spec), calibration, progress=False)
    assert type(made).__name__ == "ReplaceMe" and made.ridge == 0.5 and made.tokens == "all"


PLUGIN = '''
from typing import Annotated

from flatten.merge import remove_blocks
from flatten.strategies.baselines import Baseline
from flatten.strategies.compressor import register_strategy


@register_strategy("every-nth")
class EveryNth(Baseline):
    name, title = "every-nth", "drop every n-th block from the top (test plug-in)"

    def __init__(self, model, calibration, n: Annotated[int, "distance between dropped blocks"] = 1,
                 batch_size: int = 4, device=None, progress: bool = True):
        super().__init__(model, calibration, batch_size=batch_size, device=device, progress=progress)
        self.n = n

    def options(self):
        return {"n": self.n}

    def compress(self, remove=None, ratio=None):
        k = self.blocks_to_remove(remove, ratio)
        count = len(self.arch.layers_of(self.model))
        drop = sorted(count - 1 - self.n * j for j in range(k))
        remove_blocks(self.model, drop, self.arch)
        return self.model, self.record_removal(0.0, removed=drop)
'''


def test_a_strategy_in_its_own_file_works_from_the_command_line(tiny, tmp_path, capsys):
    plugin = tmp_path / "every_nth.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    try:
        with pytest.raises(SystemExit):
            main(["compress", "--plugin", str(plugin), "--help"])
        assert "n (int, default 1): distance between dropped blocks" in capsys.readouterr().out
        out = tmp_path / "out"
        code = main(["compress", str(tiny[0]), "--calib", str(tiny[1]), "--plugin", str(plugin),
                     "--method", "every-nth:n=2", "--remove", "2", "--out", str(out), *FAST])
        assert code == 0, capsys.readouterr().err
        assert json.loads((out / "removal.json").read_text())["removed"] == [2, 4]
        assert main(["compress", str(tiny[0]), "--plugin", str(plugin), "--method", "every-nth:m=2"]) == 2
        assert "every-nth has no option 'm'; its options: n (int, default 1)" in capsys.readouterr().err
        assert main(["reproduce", str(out)]) == 0  # the plug-in again, loaded once
    finally:
        STRATEGIES.unregister("every-nth")


def test_help_lists_every_strategy_with_its_options():
    text = strategies_help()
    for name in STRATEGIES.names():
        assert f"{name}: {get_strategy(name).title}" in text
    assert "search_samples (int | None, default None)" in text and "fixed(spans)" in text
