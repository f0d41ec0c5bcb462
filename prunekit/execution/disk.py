"""Models larger than RAM: weights read from the checkpoint when a block needs them, pruned blocks
written as they finish, activations in a memory-mapped scratch file when RAM is short.

The model is a skeleton on the meta device (accelerate's init_empty_weights: buffers such as rotary
tables are real); the shell (embeddings, final norm, head) is read once; each block is read from the
checkpoint's safetensors (sharded or not) when the loop reaches it and returned to meta when it is
done. The output's shards are planned up front from the skeleton's shapes, so every shard's header
is known before its first byte is written and the tensors stream to disk in block order: memory
stays flat in depth. A GGUF is dequantized once into a safetensors cache folder that later runs reuse.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PrunekitError

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}


def parse_size(text: str | int) -> int:
    """'50GB', '500MB', 1000 -> bytes (decimal units, as transformers)."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[:-len(unit)]) * factor)
    try:
        return int(t)
    except ValueError:
        raise PrunekitError(f"--max-shard-size {text!r} is not a size: use e.g. 5GB or 500MB") from None


class CheckpointReader:
    """Tensors of a safetensors checkpoint folder (one file, or shards with model.safetensors.index.json),
    read one at a time."""

    def __init__(self, folder: str):
        from safetensors import safe_open
        self.folder, self._open = folder, safe_open
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                self.files = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.isfile(single):
            with safe_open(single, "pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise PrunekitError(f"{folder} has no model.safetensors or model.safetensors.index.json: "
                                f"--offload disk reads safetensors checkpoints (save the model with safetensors)")
    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        """A copy of one tensor. The file is opened (memory-mapped) for this read only: a handle kept
        open would keep every page read so far resident, and memory would grow with depth."""
        with self._open(self.files[name], "pt") as f:
            return f.get_tensor(name)

    def key(self) -> str:
        """Names this checkpoint's contents cheaply (see files_key)."""
        return files_key(self.files.values())

    def nbytes(self) -> int:
        return sum(os.path.getsize(p) for p in set(self.files.values()))


def files_key(paths) -> str:
    """A cheap name for files' contents: their paths, sizes and modification times (blake2b)."""
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(set(paths)):
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def gguf_cache(source, cache_root: str | None = None) -> str:
    """A safetensors copy of a GGUF model, made once (dequantized to float32 by transformers) and
    reused: keyed by the GGUF file's path, size and modification time."""
    from ..export import atomic_folder
    from ..loading import load
    path = os.path.join(source.path, source.gguf_file)
    if cache_root is None:
        from ..allocation.alpha import cache_dir
        cache_root = os.path.join(cache_dir(), "gguf")
    folder = os.path.join(cache_root, f"{os.path.splitext(source.gguf_file)[0]}-{files_key([path])[:16]}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    model, tokenizer, _, _ = load(source.spec)
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def _set(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        mod._buffers[leaf] = tensor


def load_skeleton(folder: str, tokenizer: bool = True):
    """(model on meta with its shell loaded, tokenizer (None if not asked for), adapter, reader) for a
    safetensors folder."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..adapters import adapter_for
    reader = CheckpointReader(folder)
    config = AutoConfig.from_pretrained(folder)
    adapter = adapter_for(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    in_blocks = {id(p) for p in adapter.blocks(model).parameters()}
    for name, p in list(model.named_parameters()):
        if id(p) in in_blocks:
            continue
        if name in reader:
            _set(model, name, reader.get(name))
        elif p.device.type == "meta" and not getattr(config, "tie_word_embeddings", False):
            raise PrunekitError(f"{folder}: tensor {name} is missing from the checkpoint")
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.eval()
    model.config.use_cache = False
    return model, AutoTokenizer.from_pretrained(folder) if tokenizer else None, adapter, reader


class ShardWriter:
    """Writes a checkpoint whose tensors arrive in a known order, without holding a shard in memory:
    shards are planned from the names, shapes and dtypes up front, so each file's safetensors header
    is written when the shard opens and each tensor's bytes are appended as it arrives."""

    def __init__(self, folder: str, layout: list[tuple[str, tuple, torch.dtype]], max_shard_size: int):
        self.folder = folder
        shards, current, size = [], [], 0
        for name, shape, dtype in layout:
            nbytes = _numel(shape) * torch.finfo(dtype).bits // 8 if dtype.is_floating_point else _numel(shape)
            if current and size + nbytes > max_shard_size:
                shards.append(current)
                current, size = [], 0
            current.append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        if current:
            shards.append(current)
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.where = {name: k for k, shard in enumerate(shards) for name, *_ in shard}
        self.shards = shards
        self.pending = [[name for name, *_ in shard] for shard in shards]
        self.files: dict[int, object] = {}
        self.total = sum(nb for shard in shards for *_, nb in shard)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        k = self.where[name]
        if not self.pending[k] or self.pending[k][0] != name:
            raise RuntimeError(f"tensor {name} arrived out of the planned order")
        spec = next(s for s in self.shards[k] if s[0] == name)
        if tuple(tensor.shape) != spec[1] or tensor.dtype != spec[2]:
            raise RuntimeError(f"tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, planned {spec[1]} {spec[2]}")
        if k not in self.files:
            self.files[k] = self._open(k)
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
        self.files[k].write(data.numpy().tobytes())
        self.pending[k].pop(0)
        if not self.pending[k]:
            self.files.pop(k).close()

    def _open(self, k: int):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, nbytes in self.shards[k]:
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        f = open(os.path.join(self.folder, self.names[k]), "wb")
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        return f

    def finish(self) -> None:
        left = [name for names in self.pending for name in names]
        if left:
            raise RuntimeError(f"{len(left)} planned tensors were never written, e.g. {left[0]}")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {name: self.names[k] for name, k in self.where.items()}}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def output_layout(model: nn.Module, adapter) -> list[tuple[str, tuple, torch.dtype]]:
    """Every unique parameter (tied ones once, under their first name) in the order they are written:
    the shell first (it is loaded already), then block by block, the order in which blocks finish."""
    in_blocks = {id(p) for p in adapter.blocks(model).parameters()}
    params = list(model.named_parameters())
    shell = [(n, p) for n, p in params if id(p) not in in_blocks]
    blocks = [(n, p) for n, p in params if id(p) in in_blocks]
    return [(n, tuple(p.shape), p.dtype) for n, p in shell + blocks]


class DiskBlocks:
    """Block weights from the checkpoint: onload(i) reads block i (to the compute device), offload(i)
    writes it to the output and returns it to meta, release(i) returns it to meta unwritten, and
    finish() completes the output's shards."""

    def __init__(self, model: nn.Module, adapter, reader: CheckpointReader, device: torch.device,
                 writer: ShardWriter | None = None):  # the loop sets the writer once the layout is final
        self.model, self.adapter, self.reader, self.device, self.writer = model, adapter, reader, device, writer
        self.blocks = adapter.blocks(model)

    def prefix(self, i: int) -> str:
        return f"{self.adapter.blocks_path}.{i}."

    def onload(self, i: int) -> None:
        block, prefix = self.blocks[i], self.prefix(i)
        for name, p in list(block.named_parameters()):
            full = prefix + name
            if full in self.reader:
                tensor = self.reader.get(full)
            else:  # a bias the pruning added (zero until compensated)
                tensor = torch.zeros(p.shape, dtype=p.dtype)
            _set(block, name, tensor.to(self.device))

    def offload(self, i: int) -> None:
        if self.writer is not None:
            self.write(i, {name: p.data for name, p in self.blocks[i].named_parameters()})
        self.release(i)

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Block i's parameters (by name within the block) into the output, in the planned order."""
        prefix = self.prefix(i)
        for name, _ in self.blocks[i].named_parameters():
            self.writer.write(prefix + name, tensors[name])

    def release(self, i: int) -> None:
        self.blocks[i].to("meta")
        _trim_heap()

    # BlockStreamer's other verbs, which have nothing to do here: each block is read when it is onloaded,
    # and nothing runs in the background
    def start(self, first: int = 0) -> None:
        pass

    def install_all(self) -> None:
        pass

    def close(self) -> None:
        pass

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.finish()

    def named_weights(self):
        """(full name, weight as out x in) of every prunable linear, one at a time from disk."""
        for i, block in enumerate(self.blocks):
            for name, module in self.adapter.block_linears(block).items():
                w = self.reader.get(f"{self.prefix(i)}{name}.weight")
                yield f"{self.prefix(i)}{name}", (w.t() if self.adapter.transposed else w)


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc). A block's tensors are tens of MB; once freed,
    glibc keeps such chunks in its heap (its mmap threshold grows after large frees), and without
    this the resident set would grow block after block although nothing is held."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def scratch_tensor(shape: tuple, dtype: torch.dtype, folder: str) -> tuple[torch.Tensor, str]:
    """A tensor backed by a memory-mapped file in `folder` (removed by the caller)."""
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=".prunekit-activations-", suffix=".bin", dir=folder)
    os.close(fd)
    return torch.from_file(path, shared=True, size=_numel(shape), dtype=dtype).view(shape), path


@dataclass
class DiskRun:
    """What a disk-offloaded prune needs: the checkpoint, the output's (temporary) folder and shard
    size, and the scratch folder for activations that do not fit in RAM."""
    reader: CheckpointReader
    folder: str
    max_shard_size: int = parse_size("50GB")   # transformers' default
    scratch_dir: str | None = None
    writer: ShardWriter | None = None

    def open_writer(self, model: nn.Module, adapter) -> ShardWriter:
        """Plan the output's shards and write the shell (embeddings, final norm, head) now."""
        self.writer = ShardWriter(self.folder, output_layout(model, adapter), self.max_shard_size)
        in_blocks = {id(p) for p in adapter.blocks(model).parameters()}
        for name, p in model.named_parameters():
            if id(p) not in in_blocks:
                self.writer.write(name, p.data)
        return self.writer
