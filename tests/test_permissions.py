"""What the library writes gets the mode a plain ``open()`` / ``mkdir()`` gives under the process's umask (not
the 0600 / 0700 of ``tempfile``), still written whole or not at all; a replaced folder keeps nothing of the old."""

import os
import stat
from contextlib import contextmanager

import pytest
import torch

from flatten import Plan, save_checkpoint
from flatten.files import write_atomically
from flatten.models.export import export_gguf
from flatten.models.record import RunRecord
from flatten.plan import Merge, model_signature
from flatten.run.report import cut_plot, similarity_heatmap
from test_export import _bpe_folder
from tiny import TinySpec, tiny_model

SPEC = TinySpec("llama", hidden_multiple=8, num_kv_heads=2, group_size=2, head_dim=8, intermediate_size=64,
                num_layers=3, dtype=torch.float32)
MODES = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}  # umask: (files, folders)


@contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def model():
    return tiny_model(SPEC)


def _modes(root):
    """``{relative path: mode}`` of ``root`` and everything under it."""
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def _assert_modes(root, mask):
    file_mode, dir_mode = MODES[mask]
    wrong = {}
    for name, mode in _modes(root).items():
        want = dir_mode if os.path.isdir(os.path.join(root, name)) else file_mode
        if mode != want:
            wrong[name] = f"{mode:o} (want {want:o})"
    assert not wrong, f"under umask {mask:03o}: {wrong}"


def _plan(model):
    # one merge with compensation weights, so the plan writes its .safetensors beside the JSON too
    return Plan(model=model_signature(model), method={"scorer": "test"}, similarity=[[1.0, 0.5], [0.5, 1.0]],
                merges=[Merge(position=0, span=(0, 1), similarity=0.5, keep_groups=[0, 1], keep_channels=[0, 1],
                              o_proj=torch.zeros(4, 4))])


def _extras(model, stale=False):
    """What ``flatten compress`` / ``recover`` write beside the weights: plan, run record, card, figures."""
    def write(folder):
        _plan(model).save(folder / "plan.json")
        RunRecord(name=folder.name, base_model="tiny", decisions="plan.json").save(folder)
        (folder / "README.md").write_text("# tiny\n")
        similarity_heatmap([[1.0, 0.5], [0.5, 1.0]], [(0, 1)], folder / "similarity.png")
        cut_plot([0.1, 0.2], (0, 1), folder / "cut.png")
        (folder / "sub").mkdir()
        (folder / "sub" / "note.txt").write_text("nested\n")
        if stale:
            (folder / "stale.txt").write_text("from the old checkpoint\n")
    return write


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


@pytest.mark.parametrize("mask", sorted(MODES))
def test_every_output_gets_the_mode_the_umask_gives(model, tmp_path, mask):
    tokenizer = tmp_path / "tok"
    _bpe_folder(tokenizer)
    out = tmp_path / "out"
    with _umask(mask):
        save_checkpoint(model, out, extras=_extras(model))
        assert {"model.safetensors", "config.json", "plan.json", "flatten_run.json", "README.md", "similarity.png",
                "cut.png"} <= {p.name for p in out.iterdir()}
        assert any(p.name.startswith("plan.json.") and p.suffix == ".safetensors" for p in out.iterdir())
        _assert_modes(out, mask)

        plans = tmp_path / "plans"  # a plan on its own (and a resume checkpoint), saved into a new folder
        _plan(model).save(plans / "checkpoint.json")
        _assert_modes(plans, mask)

        gguf = export_gguf(model, tmp_path / "gguf" / "tiny.gguf", outtype="f32", tokenizer_from=tokenizer)
        _assert_modes(gguf.parent, mask)
        assert gguf.stat().st_size > 0

        record = tmp_path / "record.json"  # replacing an existing file: the new file's mode, not the old one's
        record.write_text("{}")
        record.chmod(0o640)
        write_atomically(record, lambda tmp: open(tmp, "w").write("{\"a\": 1}\n"))
        assert stat.S_IMODE(record.stat().st_mode) == MODES[mask][0] and record.read_text() == "{\"a\": 1}\n"
    for folder in (out, plans, gguf.parent, tmp_path):
        assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files were left behind"


@pytest.mark.parametrize("first, second", [(0o077, 0o022), (0o022, 0o077)])
def test_overwriting_a_folder_leaves_nothing_of_the_old_one(model, tmp_path, first, second):
    out = tmp_path / "out"
    with _umask(first):
        save_checkpoint(model, out, extras=_extras(model, stale=True))
        (out / "sub" / "old.txt").write_text("old\n")
    assert (out / "stale.txt").is_file()
    with _umask(second):
        save_checkpoint(model, out, overwrite=True, extras=_extras(model))
    names = {os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files}
    assert "stale.txt" not in names and "sub/old.txt" not in names and "model.safetensors" in names
    _assert_modes(out, second)
    assert _leftovers(tmp_path, "out") == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_atomically(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_flatten_compress_writes_a_folder_others_can_read(tiny, tmp_path, capsys):
    from flatten.run.cli import main

    model, text = tiny
    out = tmp_path / "out"
    with _umask(0o022):
        code = main(["compress", str(model), "--calib", str(text), "--remove", "1", "--out", str(out), "--quiet",
                     "--no-eval", "--no-latency", "--samples", "2", "--seq-len", "16", "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    assert {"model.safetensors", "config.json", "tokenizer.json", "flatten_run.json", "README.md"} <= {
        p.name for p in out.iterdir()}
    _assert_modes(out, 0o022)
