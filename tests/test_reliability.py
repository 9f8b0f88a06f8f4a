"""Malformed input gets a clean error and changes nothing; an interrupted save or compression loses nothing."""

import copy
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatten import Flattener, Plan, load_model, save_checkpoint
from flatten.criteria import POLICIES, SCORERS, SIMILARITIES
from flatten.run.cli import main
from tiny import TinySpec, tiny_model

SPEC = TinySpec("llama", hidden_multiple=2, num_kv_heads=2, group_size=2, head_dim=4, intermediate_size=12,
                num_layers=5, dtype=torch.float32)
CLEAN = (ValueError, TypeError, FileNotFoundError, FileExistsError)
TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def _calibration(samples=4, length=8, seed=0):
    return torch.randint(0, 61, (samples, length), generator=torch.Generator().manual_seed(seed))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


anything = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=8), st.lists(st.integers(), max_size=3), st.just(torch.zeros(2)))
BAD_DEVICES = st.sampled_from(["", "gpu", "cuda:x", "tpu0", 3.5, [], "cpu cpu"])


def _valid(option, value) -> bool:
    if option == "batch_size":
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    registry = {"scorer": SCORERS, "policy": POLICIES, "similarity": SIMILARITIES}[option]
    return isinstance(value, str) and value in registry


bad_remove = st.one_of(st.integers(max_value=0), st.integers(min_value=5), st.floats(), st.booleans(),
                       st.text(max_size=4), st.lists(st.integers(), max_size=2))
bad_ratio = st.one_of(st.floats().filter(lambda r: not 0 < r < 1), st.booleans(), st.text(max_size=4))
bad_calibration = st.one_of(
    st.builds(lambda n: torch.zeros(n), st.integers(0, 8)),                                # 1-D
    st.builds(lambda a, b: torch.zeros(a, b, 2, dtype=torch.long), st.integers(1, 3), st.integers(1, 3)),  # 3-D
    st.builds(lambda a, b: torch.rand(a, b), st.integers(1, 3), st.integers(2, 8)),         # not token ids
    st.builds(lambda a: torch.zeros(a, 1, dtype=torch.long), st.integers(0, 3)),           # too short
    st.builds(lambda a: torch.zeros(0, a, dtype=torch.long), st.integers(0, 8)),           # empty
    st.builds(lambda v: torch.full((2, 8), v), st.integers(61, 10**6) | st.integers(-10**6, -1)),  # not in vocab
    st.lists(st.integers(0, 60), max_size=8), st.none(), st.text(max_size=8),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_malformed_arguments_to_the_api_get_a_clean_error_and_leave_the_model_alone(data):
    model = tiny_model(SPEC)
    state = _state(model)
    case = data.draw(st.sampled_from(["calibration", "remove", "ratio", "option"]), label="case")
    with pytest.raises(CLEAN) as raised:
        if case == "calibration":
            Flattener(model, data.draw(bad_calibration, label="calibration"), progress=False).compress(remove=1)
        elif case == "remove":
            Flattener(model, _calibration(), progress=False).compress(remove=data.draw(bad_remove, label="remove"))
        elif case == "ratio":
            Flattener(model, _calibration(), progress=False).compress(ratio=data.draw(bad_ratio, label="ratio"))
        else:
            option = data.draw(st.sampled_from(["scorer", "policy", "similarity", "batch_size", "device"]))
            values = BAD_DEVICES if option == "device" else anything.filter(lambda v: not _valid(option, v))
            Flattener(model, _calibration(), progress=False, **{option: data.draw(values, label=option)}).compress(remove=1)
    assert str(raised.value)  # says what was wrong
    assert _unchanged(model, state)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A compressed tiny model's plan, saved, with the original model."""
    folder = tmp_path_factory.mktemp("plan")
    model = tiny_model(SPEC)
    _, plan = Flattener(copy.deepcopy(model), _calibration(), progress=False).compress(remove=2)
    plan.save(folder / "plan.json")
    return model, folder / "plan.json"


def _mutations():
    """Ways to damage a plan document: a field set to an arbitrary JSON value, or the text truncated."""
    json_values = st.recursive(st.none() | st.booleans() | st.integers(-100, 100) | st.floats() | st.text(max_size=5),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                           max_size=2), max_leaves=5)
    field = st.sampled_from(["format", "model", "weights", "merges", "merges.0", "merges.0.position",
                             "merges.0.keep_groups", "merges.0.keep_channels", "merges.0.span", "merges.1.position"])
    return st.one_of(st.tuples(st.just("set"), field, json_values), st.tuples(st.just("truncate"), st.floats(0, 0.99)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations())
def test_a_damaged_plan_is_refused_with_a_clean_error(saved, mutation, tmp_path_factory):
    original, path = saved
    text = path.read_text()
    folder = tmp_path_factory.mktemp("damaged")
    for weights in path.parent.glob("*.safetensors"):
        (folder / weights.name).write_bytes(weights.read_bytes())
    if mutation[0] == "truncate":
        damaged = text[: int(len(text) * mutation[1])]
    else:
        document, (_, field, value) = json.loads(text), mutation
        *parents, last = field.split(".")
        node = document
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
        damaged = json.dumps(document)
    (folder / "plan.json").write_text(damaged)
    model = copy.deepcopy(original)
    try:
        Plan.load(folder / "plan.json").apply(model)
    except CLEAN as error:
        assert str(error)
    # a damage that leaves a valid plan (e.g. a metadata field) must still give a well-formed model
    else:
        assert len(model.model.layers) == model.config.num_hidden_layers


def test_a_truncated_checkpoint_is_refused_by_the_api_and_the_cli(tmp_path, capsys):
    out = save_checkpoint(tiny_model(SPEC), tmp_path / "model")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _digest(out)
    with pytest.raises(ValueError, match=f"cannot load a model and tokenizer from {out}"):
        load_model(out)
    assert main(["eval", str(out), "--windows", "1"]) == 2
    err = capsys.readouterr().err
    assert "flatten eval: error: cannot load a model" in err and "Traceback" not in err
    assert _digest(out) == before
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype must be a torch.dtype or 'auto', got 'fp32'"):
        load_model(out, dtype="fp32")


def _run_child(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_and_plan_whole(tmp_path):
    """A process killed (SIGKILL) while it writes a new checkpoint and plan over old ones."""
    model = tiny_model(SPEC)
    _, plan = Flattener(copy.deepcopy(model), _calibration(), progress=False).compress(remove=1)
    save_checkpoint(model, tmp_path / "out")
    plan.save(tmp_path / "plan.json")
    checkpoint_before, plan_before = _digest(tmp_path / "out"), (tmp_path / "plan.json").read_text()

    code = """
        import os, signal
        import torch
        import flatten.plan
        from flatten import Flattener, save_checkpoint
        from tiny import TinySpec, tiny_model

        spec = TinySpec("llama", 2, 2, 2, 4, 12, num_layers=5, dtype=torch.float32, seed=1)
        model = tiny_model(spec)
        calibration = torch.randint(0, 61, (4, 8), generator=torch.Generator().manual_seed(0))
        _, plan = Flattener(model, calibration, progress=False).compress(remove=2)

        def killed(folder):
            (folder / "half.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)

        write = flatten.plan.write_atomically
        def killed_at_the_json(path, writer):
            if path.suffix == ".json":
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, writer)

        if "WHAT" == "checkpoint":
            save_checkpoint(model, "out", overwrite=True, extras=killed)
        else:
            flatten.plan.write_atomically = killed_at_the_json
            plan.save("plan.json")
    """
    for what in ("checkpoint", "plan"):
        child = _run_child(code.replace("WHAT", what), tmp_path)
        assert child.returncode == -9, child.stderr

    assert _digest(tmp_path / "out") == checkpoint_before
    assert (tmp_path / "plan.json").read_text() == plan_before
    reloaded = Plan.load(tmp_path / "plan.json")
    assert [m.keep_channels for m in reloaded.merges] == [m.keep_channels for m in plan.merges]
    assert all(torch.equal(a.down_proj, b.down_proj) for a, b in zip(reloaded.merges, plan.merges))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "out" in names and all(n in ("out", "plan.json") or n.startswith(".") or n.endswith(".safetensors")
                                  for n in names), names


def test_a_killed_compression_resumes_from_its_checkpoint_to_the_same_weights(tiny, tmp_path):
    """``flatten compress --checkpoint`` killed (SIGKILL) after its first merge, then run again."""
    model, text = tiny
    command = ["compress", str(model), "--remove", "3", "--calib", str(text), "--samples", "4", "--seq-len", "16",
               "--batch-size", "2", "--no-eval", "--no-latency", "--quiet"]
    resume = ["--out", str(tmp_path / "resumed"), "--checkpoint", str(tmp_path / "progress.json")]
    child = _run_child(f"""
        import os, signal
        from flatten.engine.executor import Executor
        from flatten.run.cli import main

        take, taken = Executor.take, []
        def killed_after_one(self, *args):
            if taken:
                os.kill(os.getpid(), signal.SIGKILL)
            taken.append(1)
            return take(self, *args)
        Executor.take = killed_after_one
        main({command + resume!r})
    """, tmp_path)
    assert child.returncode == -9, child.stderr
    assert Plan.load(tmp_path / "progress.json").removed == 1 and not (tmp_path / "resumed").exists()

    assert main(command + resume) == 0
    assert main(command + ["--out", str(tmp_path / "whole")]) == 0
    assert Plan.load(tmp_path / "progress.json").removed == 3
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def _removes_some_of_five(text: str) -> bool:
    try:
        return 1 <= int(text) <= 4
    except ValueError:
        return False


def _bad_compress_options():
    """One malformed option of ``flatten compress`` for the 5-block tiny model, as command-line words."""
    number = st.integers(-10**6, 10**6).map(str) | st.floats().map(str) | st.text(max_size=6)
    nonpositive = st.integers(-10**3, 0).map(str)
    return st.one_of(
        st.tuples(st.just("--remove"), st.integers(-10**3, 0).map(str) | st.integers(5, 10**3).map(str)),
        st.tuples(st.just("--ratio"), st.floats().filter(lambda r: not 0 < r < 1).map(str)),
        st.tuples(st.just("--fraction"), st.floats().filter(lambda r: not 0 < r < 1).map(str)),
        st.tuples(st.just("--samples"), nonpositive | st.integers(1000, 10**6).map(str)),
        st.tuples(st.just("--seq-len"), st.integers(-10**3, 1).map(str)),
        st.tuples(st.just("--batch-size"), nonpositive),
        st.tuples(st.sampled_from(["--scorer", "--strategy", "--similarity", "--policy"]),
                  st.text(alphabet="abcxyz-_", min_size=1, max_size=8).filter(
                      lambda v: v not in SCORERS and v not in POLICIES and v not in SIMILARITIES)),
        st.tuples(st.just("--device"), st.sampled_from(["gpu", "cuda:x", "tpu", "0.5"])),
        st.tuples(st.just("--calib"), st.sampled_from(["missing.txt", "empty.txt"])),
        st.tuples(st.just("--remove"), number.filter(lambda v: not _removes_some_of_five(v))),
    ).map(list)


@settings(max_examples=40, deadline=None)
@given(option=_bad_compress_options())
def test_malformed_command_lines_get_a_clean_error_and_write_nothing(tiny, tmp_path_factory, option):
    model, text = tiny
    work = tmp_path_factory.mktemp("cli")
    (work / "empty.txt").write_text("")
    before = _digest(model)
    args = ["compress", str(model), "--out", str(work / "out"), "--calib", str(text), "--samples", "2", "--seq-len", "8",
            "--batch-size", "2", "--no-eval", "--no-latency", "--quiet", *option]
    if option[0] == "--calib":
        args[-1] = str(work / option[1])
    cwd = os.getcwd()
    try:
        os.chdir(work)
        code = main(args)
    except SystemExit as exit:  # argparse: an option of the wrong type, with its usage line
        code = exit.code
    finally:
        os.chdir(cwd)
    assert code == 2
    assert not (work / "out").exists() and _digest(model) == before
