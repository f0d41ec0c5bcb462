"""Zero-shot evaluation through lm-eval: prunekit's offline task configs build exactly the requests that
lm-eval's stock tasks build from the same documents, and a tiny random model scores near chance."""
from __future__ import annotations

import os

import pytest
from conftest import DATA_DIR, byte_tokenizer, tiny_model

from prunekit import zeroshot
from prunekit.errors import PrunekitError
from prunekit.zeroshot_tasks.utils import load_docs

ZEROSHOT = os.path.join(DATA_DIR, "zeroshot")
needs_data = pytest.mark.skipif(not os.path.isdir(ZEROSHOT), reason="../shared/data/zeroshot is absent")
N = 20  # documents compared per task


def fake_hub(monkeypatch, docs):
    """datasets.load_dataset answers every split with `docs` (lm-eval's stock tasks call it in download())."""
    import datasets
    split = datasets.Dataset.from_list(docs)
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.DatasetDict({s: split for s in ("train", "validation", "test")}))


def requests_of(task) -> dict:
    task.build_all_requests(limit=N, rank=0, world_size=1)
    docs = list(task.eval_docs)[:N]
    return {"args": [inst.args for inst in task.instances], "targets": [task.doc_to_target(d) for d in docs],
            "metrics": sorted(task.aggregation()), "split": task.config.test_split or task.config.validation_split,
            "output_type": task.OUTPUT_TYPE}


@needs_data
@pytest.mark.parametrize("name", zeroshot.TASKS)
def test_offline_config_builds_the_stock_requests(name, monkeypatch):
    local = requests_of(zeroshot.load_tasks([name], DATA_DIR)[name])
    fake_hub(monkeypatch, load_docs(name, ZEROSHOT)[:N])
    stock = requests_of(zeroshot.stock_manager().load([name])["tasks"][name])
    assert len(local["args"]) >= 2 * N
    assert local == stock


# First documents of the hub's copies (super_glue/boolq, glue/rte, Rowan/hellaswag, winogrande_xl,
# ai2_arc, openbookqa main, piqa), fields that the conversion has to produce.
HUB_FIRST = {
    "boolq": {"question": "does ethanol take more energy make that produces", "label": 0},
    "rte": {"sentence2": "Christopher Reeve had an accident.", "label": 1},
    "hellaswag": {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
                  "label": "3"},
    "winogrande": {"option1": "Sarah", "option2": "Maria", "answer": "2"},
    "arc_easy": {"id": "Mercury_417466", "answerKey": "A"},
    "arc_challenge": {"id": "Mercury_7175875", "answerKey": "C"},
    "openbookqa": {"id": "8-343", "answerKey": "B"},
    "piqa": {"goal": "How do I ready a guinea pig cage for it's new occupants?", "label": 0},
}


@needs_data
@pytest.mark.parametrize("name", zeroshot.TASKS)
def test_local_files_convert_to_hub_documents(name):
    docs = load_docs(name, ZEROSHOT)
    assert HUB_FIRST[name].items() <= docs[0].items()
    assert len(docs) == {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                         "arc_challenge": 1172, "openbookqa": 500, "piqa": 1838}[name]
    if name == "boolq":
        assert docs[0]["passage"].startswith("Ethanol fuel -- All biomass goes through")
    if name == "openbookqa":
        assert docs[0]["question_stem"].startswith("A person wants to start saving money")


@needs_data
def test_tiny_random_model_scores_near_chance():
    result = zeroshot.evaluate_zeroshot(tiny_model("llama"), byte_tokenizer(), "arc_easy,winogrande", limit=40,
                                        data_dir=DATA_DIR)
    assert set(result) == {"arc_easy", "winogrande", "mean", "details"}
    assert abs(result["arc_easy"] - 1 / 4) < 0.2 and abs(result["winogrande"] - 1 / 2) < 0.2
    assert result["mean"] == pytest.approx((result["arc_easy"] + result["winogrande"]) / 2)
    assert result["details"]["arc_easy"]["samples"] == 40 and "acc_norm" in result["details"]["arc_easy"]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(PrunekitError, match="choose from boolq, rte, hellaswag") as err:
        zeroshot.load_tasks(["boolq", "mmlu"])
    assert "mmlu" in str(err.value) and "\n" not in str(err.value)


def test_no_local_files_and_no_hub_names_the_data_dir(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PrunekitError, match="PRUNEKIT_DATA_DIR") as err:
        zeroshot.load_tasks(["rte"], str(tmp_path))
    assert "\n" not in str(err.value)
