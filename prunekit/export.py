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


# --- bitmask format: kept values plus a packed bitmask per pruned weight ----------------------------

SAVE_FORMATS = ("dense", "bitmask")


def pack_weight(weight) -> dict:
    """A sparse weight as its kept (nonzero) values in row-major order, the bitmask of where they
    are (packed 8 to a byte) and the shape: at 50 % in bf16, 1.125 bytes a weight instead of 2."""
    import numpy as np
    import torch
    kept = weight != 0
    bits = np.packbits(kept.reshape(-1).cpu().numpy())
    return {"values": weight[kept].contiguous(), "bitmask": torch.from_numpy(bits),
            "shape": torch.tensor(list(weight.shape), dtype=torch.int64)}


def unpack_weight(values, bitmask, shape):
    import numpy as np
    import torch
    n = int(torch.tensor(shape).prod())
    kept = torch.from_numpy(np.unpackbits(bitmask.numpy(), count=n).astype(bool)).reshape(*shape.tolist())
    weight = torch.zeros(kept.shape, dtype=values.dtype)
    weight[kept] = values
    return weight


def save_bitmask(model, tokenizer, path: str, record: dict, sparse_names: set[str], overwrite: bool = False) -> str:
    """Like save(), with every weight named in `sparse_names` stored as NAME.values / NAME.bitmask /
    NAME.shape. prunekit.json says "save_format": "bitmask"; load_pruned() restores the identical model."""
    from safetensors.torch import save_file
    tensors = {}
    for name, p in model.named_parameters():  # tied weights once
        if name in sparse_names:
            tensors.update({f"{name}.{k}": v for k, v in pack_weight(p.detach()).items()})
        else:
            tensors[name] = p.detach().contiguous()
    with atomic_folder(path, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "model.bitmask.safetensors"), metadata={"format": "prunekit-bitmask"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_record(tmp, {**record, "save_format": "bitmask"})
    return os.path.abspath(path)


def load_pruned(path: str):
    """A model saved by prunekit, in either format: dense folders load with from_pretrained; bitmask
    folders are rebuilt from their config and unpacked weights, in the saved dtype."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    record_path = os.path.join(path, "prunekit.json")
    fmt = json.load(open(record_path)).get("save_format", "dense") if os.path.exists(record_path) else "dense"
    if fmt == "dense":
        return AutoModelForCausalLM.from_pretrained(path).eval()
    raw = load_file(os.path.join(path, "model.bitmask.safetensors"))
    state = {k: v for k, v in raw.items() if not k.endswith((".values", ".bitmask", ".shape"))}
    for key in raw:
        if key.endswith(".values"):
            name = key[: -len(".values")]
            state[name] = unpack_weight(raw[key], raw[f"{name}.bitmask"], raw[f"{name}.shape"])
    config = AutoConfig.from_pretrained(path)
    dtype = next(iter(state.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")  # as from_pretrained
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{path}: bitmask checkpoint does not match its config "
                           f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval()
