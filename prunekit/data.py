"""Corpora: resolve a corpus argument to text, draw calibration segments, cut evaluation windows.

A corpus is a local text file (.txt/.raw: read as is; .jsonl: the "text" field of each line, joined
by blank lines) or a dataset name. Names resolve first to a local data folder ($PRUNEKIT_DATA_DIR,
laid out like the project's shared/data), then to Hugging Face `datasets` where the hub is reachable.
"""
from __future__ import annotations

import json
import os
import random

import torch

from .errors import PrunekitError

# name -> split -> (file in $PRUNEKIT_DATA_DIR, HF dataset args, joiner). As in the Wanda/SparseGPT
# loaders: calibration from the training text, evaluation from the test text.
DATASETS = {
    "wikitext2": {
        "calib": ("wikitext-2/valid.txt", ("wikitext", "wikitext-2-raw-v1", "train"), " "),
        "eval": ("wikitext-2-raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test"), "\n\n"),
    },
    "ptb": {
        "calib": ("ptb/ptb.train.txt", ("ptb_text_only", "penn_treebank", "train"), " "),
        "eval": ("ptb/ptb.test.txt", ("ptb_text_only", "penn_treebank", "test"), " "),
    },
    "c4": {
        "calib": ("c4/c4-train.00000-of-01024.txt", ("allenai/c4", "en", "train"), " "),
        "eval": ("c4/c4-validation.00000-of-00008.txt", ("allenai/c4", "en", "validation"), " "),
    },
}
_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
_C4_DOCS = {"train": 20000, "validation": 1100}  # validation: Wanda's first 1100 documents


MAX_UNDECODABLE = 0.001  # share of a text corpus that may be undecodable before it is refused


def _read_file(path: str, encoding: str = "utf-8") -> str:
    if path.endswith((".jsonl", ".json")):
        texts = []
        try:
            with open(path, encoding=encoding) as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            texts.append(json.loads(line)["text"])
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise PrunekitError(f"{path}:{lineno} is not a JSON object with a \"text\" field") from None
        except UnicodeDecodeError:
            raise PrunekitError(f"{path} is not {encoding} text: pass its encoding with --encoding") from None
        return "\n\n".join(texts)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode(encoding, errors="replace")
    except LookupError:
        raise PrunekitError(f"--encoding {encoding!r} is not a known text encoding: use e.g. utf-8 or latin-1") from None
    bad = text.count("\ufffd") - raw.decode(encoding, errors="ignore").count("\ufffd")
    if bad > MAX_UNDECODABLE * max(len(text), 1):
        raise PrunekitError(f"{path} is not {encoding} text ({bad} undecodable bytes of {len(raw)}): "
                            f"pass a text file, or its encoding with --encoding")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads


def _from_hub(name: str, split: str) -> str:
    _, (path, subset, hf_split), joiner = DATASETS[name][split]
    try:
        import datasets
        if name == "c4":
            data = datasets.load_dataset(path, data_files={hf_split: _C4_FILES[hf_split]}, split=hf_split)
            data = data.select(range(min(len(data), _C4_DOCS[hf_split])))
        else:
            data = datasets.load_dataset(path, subset, split=hf_split)
    except Exception as exc:  # ImportError, connection errors, missing datasets: all mean "not here"
        raise PrunekitError(
            f"dataset {name!r} is not available ({type(exc).__name__}): set PRUNEKIT_DATA_DIR to a folder laid "
            f"out like shared/data, pass a local text/JSONL file, or install `datasets` with hub access") from None
    column = "sentence" if name == "ptb" else "text"
    return joiner.join(data[column])


def load_text(corpus: str, split: str = "eval", encoding: str = "utf-8") -> str:
    """Text of a corpus; `split` is 'calib' or 'eval' and only matters for dataset names."""
    if os.path.isfile(os.path.expanduser(corpus)):
        text = _read_file(os.path.expanduser(corpus), encoding)
    elif corpus in DATASETS:
        local = os.path.join(os.environ.get("PRUNEKIT_DATA_DIR", ""), DATASETS[corpus][split][0])
        text = _read_file(local) if os.environ.get("PRUNEKIT_DATA_DIR") and os.path.isfile(local) else _from_hub(corpus, split)
    else:
        raise PrunekitError(f"corpus {corpus!r} is neither a file nor a dataset name ({', '.join(DATASETS)})")
    if not text.strip():
        raise PrunekitError(f"corpus {corpus!r} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text in one tokenizer call, tokenizer defaults (as the reference loaders)."""
    return tokenizer(text, return_tensors="pt").input_ids[0]


def calibration_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Wanda's/SparseGPT's sampler: random.seed(seed); per sample i = randint(0, n - seqlen - 1),
    take tokens [i, i + seqlen). Returns (nsamples, seqlen)."""
    n = ids.numel()
    if n < nsamples * seqlen or n - seqlen - 1 < 0:
        raise PrunekitError(f"calibration corpus has {n} tokens, too short for {nsamples} x {seqlen}: "
                            f"lower --nsamples or --seqlen, or use a longer corpus")
    random.seed(seed)
    starts = [random.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i:i + seqlen] for i in starts])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seqlen tokens, remainder dropped; the first max_windows if given."""
    count = ids.numel() // seqlen
    if count < 1:
        raise PrunekitError(f"evaluation corpus has {ids.numel()} tokens, fewer than one window of {seqlen}: "
                            f"lower --eval-seqlen or use a longer corpus")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].reshape(count, seqlen)
