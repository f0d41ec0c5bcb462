"""Zero-shot accuracy with lm-evaluation-harness: 0 shots, lm-eval's HFLM around the in-memory model.

Tasks: Wanda's/SparseGPT's/AlphaPruning's seven (boolq, rte, hellaswag, winogrande, arc_easy,
arc_challenge, openbookqa) plus piqa. A task whose files lie in $PRUNEKIT_DATA_DIR/zeroshot/<task>/
(or data_dir/zeroshot/<task>/) runs through prunekit's configs in zeroshot_tasks/: lm-eval's stock
prompts and metrics over the local files, converted to the hub's fields. Any other task runs through
lm-eval's stock config, which downloads its data from the Hugging Face hub.

Metric: `acc` for every task, as Wanda reports them (its authors, locuslab/wanda#31: "In the paper, we
report the `acc` metric"; AlphaPruning reuses Wanda's evaluation code). lm-eval's length-normalised
`acc_norm` (hellaswag, arc_*, openbookqa, piqa) is under "details", with the standard errors.
"""
from __future__ import annotations

import functools
import os

import torch

from .errors import PrunekitError

TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
METRIC = "acc"
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zeroshot_tasks")


def local_dir(data_dir: str | None = None) -> str | None:
    """The folder holding one subfolder per task: data_dir, else $PRUNEKIT_DATA_DIR, plus /zeroshot."""
    root = data_dir or os.environ.get("PRUNEKIT_DATA_DIR")
    return os.path.join(root, "zeroshot") if root else None


@functools.lru_cache(maxsize=1)
def stock_manager():
    """lm-eval's own task index (about 15k configs, several seconds to build): once per process."""
    from lm_eval.tasks import TaskManager
    return TaskManager()


def _local_manager(folder: str):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=CONFIGS, include_defaults=False, metadata={"data_dir": folder})


def load_tasks(tasks, data_dir: str | None = None) -> dict:
    """name -> lm-eval Task: prunekit's offline config where the local files exist, the stock one otherwise."""
    from .zeroshot_tasks.utils import FILES
    tasks = list(dict.fromkeys(t.strip() for t in tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise PrunekitError(f"unknown zero-shot task(s) {', '.join(unknown) or '(none given)'}: "
                            f"choose from {', '.join(TASKS)}")
    folder = local_dir(data_dir)
    local = [t for t in tasks if folder and all(os.path.isfile(os.path.join(folder, t, f)) for f in FILES[t][0])]
    hub = [t for t in tasks if t not in local]
    loaded = _local_manager(folder).load(local)["tasks"] if local else {}
    if hub:
        try:
            loaded.update(stock_manager().load(hub)["tasks"])
        except Exception as exc:  # no `datasets` hub access, connection errors: all mean "not here"
            raise PrunekitError(
                f"zero-shot data for {', '.join(hub)} is not in {folder or '$PRUNEKIT_DATA_DIR/zeroshot'}/<task>/ and "
                f"the Hugging Face hub is not reachable ({type(exc).__name__}): set PRUNEKIT_DATA_DIR to a folder "
                f"laid out like shared/data (zeroshot/<task>/ files as in its PROVENANCE.md)") from None
    return {t: loaded[t] for t in tasks}


def evaluate_zeroshot(model, tokenizer, tasks=TASKS, limit: int | None = None, batch_size: int | str = 16,
                      device: str | torch.device | None = None, data_dir: str | None = None) -> dict:
    """{task: acc, ..., "mean": mean acc, "details": {task: lm-eval's metrics and sample count}}.

    tasks: names from TASKS, or one comma-separated string.
    limit: the first N documents of each task (lm-eval's --limit). The model runs where it lives,
    or is moved to `device` first. Log-softmax in float32, so bf16 logits don't tie choices.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    task_objs = load_tasks(tasks.split(",") if isinstance(tasks, str) else tasks, data_dir)
    if device is not None:
        model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32)
    out = simple_evaluate(model=lm, tasks=list(task_objs.values()), num_fewshot=0, limit=limit, log_samples=False,
                          task_manager=_local_manager(""))  # tasks come built: spare it indexing the stock ones
    details = {}
    for name in task_objs:
        metrics = {k.split(",")[0]: v for k, v in out["results"][name].items() if "," in k}
        details[name] = {**metrics, "samples": out["n-samples"][name]["effective"]}
    scores = {name: details[name][METRIC] for name in task_objs}
    return {**scores, "mean": sum(scores.values()) / len(scores), "details": details}
