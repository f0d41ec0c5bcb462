"""Local zero-shot files -> documents with the hub's field names, so lm-eval's stock prompts apply unchanged.

lm-eval loads this file by path (`!function utils.x` in the YAMLs beside it), so it imports nothing from
prunekit. `dataset(task, data_dir)` is each YAML's custom_dataset; data_dir (the zeroshot folder) comes
in through the TaskManager's metadata. Each folder's PROVENANCE.md describes its file.
"""
from __future__ import annotations

import bz2
import json
import os
import re

FILES = {  # task -> (files in data_dir/<task>, split lm-eval evaluates)
    "boolq": (["dev.jsonl"], "validation"),
    "rte": (["val.jsonl"], "validation"),
    "hellaswag": (["hellaswag_val_full.txt.bz2"], "validation"),
    "winogrande": (["dev.jsonl", "dev-labels.lst"], "validation"),
    "arc_easy": (["ARC-Easy-Test.jsonl"], "test"),
    "arc_challenge": (["ARC-Challenge-Test.jsonl"], "test"),
    "openbookqa": (["test.jsonl"], "test"),
    "piqa": (["valid.jsonl", "valid-labels.lst"], "validation"),
}


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _boolq(rows):  # super_glue/boolq: the passage carries the article title, "title -- passage"
    return [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": i,
             "label": int(r["answer"])} for i, r in enumerate(rows)]


def _rte(rows):  # glue/rte: ClassLabel entailment=0, not_entailment=1
    return [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "idx": r["idx"],
             "label": ["entailment", "not_entailment"].index(r["label"])} for r in rows]


def _arc(rows, stem="question"):  # ai2_arc ("question") / openbookqa ("question_stem"): choices as lists
    return [{"id": r["id"], stem: r["question"]["stem"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]},
             "answerKey": r["answerKey"]} for r in rows]


# ActivityNet contexts end in the lowercase start of the next sentence: that fragment is the hub's ctx_b,
# which lm-eval capitalises. WikiHow contexts end in a full sentence (ctx_b is empty there).
_CTX_B = re.compile(r"^(.*[.!?][\"')]?) ([a-z][^.!?]*)$")


def _hellaswag(lines):  # 6 lines per item: "activity_label: ctx", label, 4 endings (tags already stripped)
    docs = []
    for i in range(0, len(lines) - len(lines) % 6, 6):
        label, ctx = lines[i].split(": ", 1)
        split = _CTX_B.match(ctx)
        ctx_a, ctx_b = split.groups() if split else (ctx, "")
        docs.append({"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                     "endings": lines[i + 2:i + 6], "label": lines[i + 1]})
    return docs


def load_docs(task: str, data_dir: str) -> list[dict]:
    """The documents of one task, in the hub's format, from data_dir/<task>/."""
    paths = [os.path.join(data_dir, task, name) for name in FILES[task][0]]
    if task == "hellaswag":
        with bz2.open(paths[0], "rt", encoding="utf-8") as f:
            return _hellaswag(f.read().split("\n"))
    rows = _jsonl(paths[0])
    if task == "winogrande":  # answer "1"/"2" from the label file
        return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": a}
                for r, a in zip(rows, _lines(paths[1]), strict=True)]
    if task == "piqa":
        return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(a)}
                for r, a in zip(rows, _lines(paths[1]), strict=True)]
    if task == "openbookqa":
        return _arc(rows, "question_stem")
    return {"boolq": _boolq, "rte": _rte}.get(task, _arc)(rows)


def dataset(task: str, data_dir: str, **_):
    """custom_dataset for the YAMLs: a DatasetDict with the one split lm-eval evaluates."""
    import datasets
    return datasets.DatasetDict({FILES[task][1]: datasets.Dataset.from_list(load_docs(task, data_dir))})


# --- prompt functions, as lm-eval's hellaswag/utils.py and winogrande/preprocess_winogrande.py ---

def _hs_preprocess(text):
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag_process_docs(data):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hs_preprocess(doc["activity_label"] + ": " + ctx),
                "choices": [_hs_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}
    return data.map(one)


def winogrande_text(doc):  # several contexts (the sentence up to the blank, each option filled in)
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc):  # one continuation: the sentence after the blank
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
