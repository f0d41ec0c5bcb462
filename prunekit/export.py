"""Save a pruned model that loads with plain AutoModelForCausalLM.from_pretrained, atomically."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


def check_output_dir(path: str, overwrite: bool) -> None:
    from .errors import PrunekitError
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise PrunekitError(f"output folder {path} exists and is not empty: pass --overwrite or another --out")


@contextlib.contextmanager
def atomic_folder(path: str, overwrite: bool = False):
    """Yield a temporary folder next to `path`; on success give it ordinary permissions and rename it
    into place, on any error remove it: an interrupted run never leaves a folder that looks complete."""
    check_output_dir(path, overwrite)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the saved model is an ordinary folder
        yield tmp
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        if os.path.exists(path):  # empty, or --overwrite
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_record(folder: str, record: dict) -> None:
    with open(os.path.join(folder, "prunekit.json"), "w") as f:
        json.dump(record, f, indent=2)


def save(model, tokenizer, path: str, record: dict, overwrite: bool = False) -> str:
    """Write safetensors weights, config, tokenizer and prunekit.json into a temporary folder next
    to `path`, then rename it into place: an interrupted run leaves no half-written model."""
    with atomic_folder(path, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_record(tmp, record)
    return os.path.abspath(path)
