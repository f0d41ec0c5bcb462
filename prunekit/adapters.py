"""Per-architecture adapters: the only place that knows how a model family is laid out.

An adapter answers the questions the pipeline asks: where the decoder blocks are, which linear
layers a block holds, which of them read straight from a norm (stade-w), and which config flag lets
a saved checkpoint carry a bias on a layer that has none (STADE's mean compensation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import PrunekitError


@dataclass(frozen=True)
class Adapter:
    model_types: tuple[str, ...]
    blocks_path: str                      # attribute path from the CausalLM to the ModuleList of blocks
    linears: tuple[str, ...]              # prunable linears inside a block, in execution order
    norm_fed: tuple[str, ...]             # linears whose input comes straight from a norm layer
    bias_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)  # config flag -> linears it gives a bias
    transposed: bool = False              # weights stored (in, out), as GPT-2's Conv1D
    final_norm: str = "model.norm"        # the norm between the last block and the head
    head_extra: tuple[str, ...] = ()      # modules between that norm and the head, where present (OPT project_out)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.blocks_path.split("."):
            obj = getattr(obj, part)
        return obj

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {name: block.get_submodule(name) for name in self.linears}

    def input_groups(self) -> list[tuple[str, ...]]:
        """The linears grouped by the tensor they read: consecutive norm-fed linears read one normed
        input (q/k/v, gate/up), every other linear its own (o_proj, down_proj)."""
        groups: list[list[str]] = []
        for i, name in enumerate(self.linears):
            if name in self.norm_fed and i and self.linears[i - 1] in self.norm_fed:
                groups[-1].append(name)
            else:
                groups.append([name])
        return [tuple(g) for g in groups]

    def parameter_counts(self, model: nn.Module) -> list[dict[str, int]]:
        """Per block: prunable linear name -> number of weights (what allocations weight by)."""
        return [{n: m.weight.numel() for n, m in self.block_linears(b).items()} for b in self.blocks(model)]

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight as (out_features, in_features); a view, so in-place edits reach the module."""
        return module.weight.t() if self.transposed else module.weight

    def can_hold_bias(self, linear: str, module: nn.Module) -> bool:
        return module.bias is not None or any(linear in names for names in self.bias_flags.values())

    def enable_bias(self, model: nn.Module, linear: str) -> None:
        """Give `linear` (in every block) a bias the saved config will declare: turn on the flag that
        governs it and give every other linear under that flag a zero bias, so the checkpoint loads."""
        for flag, names in self.bias_flags.items():
            if linear in names:
                setattr(model.config, flag, True)
                for block in self.blocks(model):
                    for name in names:
                        _ensure_bias(block.get_submodule(name))
                return
        if self.blocks(model)[0].get_submodule(linear).bias is None:
            raise PrunekitError(f"{linear} cannot store a bias in a {model.config.model_type} checkpoint")


def _ensure_bias(module: nn.Module) -> None:
    if module.bias is None:
        w = module.weight
        out_features = w.shape[1] if type(module).__name__ == "Conv1D" else w.shape[0]
        module.bias = nn.Parameter(torch.zeros(out_features, dtype=w.dtype, device=w.device))


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_NORM_FED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")

ADAPTERS = [
    Adapter(("llama",), "model.layers", _LLAMA_ATTN + _LLAMA_MLP, _LLAMA_NORM_FED,
            {"attention_bias": _LLAMA_ATTN, "mlp_bias": _LLAMA_MLP}),
    # Mistral and Qwen2 hard-code their bias choices: their checkpoints cannot gain new biases.
    Adapter(("mistral", "qwen2"), "model.layers", _LLAMA_ATTN + _LLAMA_MLP, _LLAMA_NORM_FED),
    Adapter(("qwen3",), "model.layers", _LLAMA_ATTN + _LLAMA_MLP, _LLAMA_NORM_FED,
            {"attention_bias": _LLAMA_ATTN}),
    Adapter(("opt",), "model.decoder.layers",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1"),
            {"enable_bias": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.out_proj", "fc1", "fc2")},
            final_norm="model.decoder.final_layer_norm", head_extra=("model.decoder.project_out",)),
    Adapter(("gpt2",), "transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
            ("attn.c_attn", "mlp.c_fc"), transposed=True, final_norm="transformer.ln_f"),
    Adapter(("gpt_neox",), "gpt_neox.layers",
            ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
            ("attention.query_key_value", "mlp.dense_h_to_4h"),
            {"attention_bias": ("attention.query_key_value", "attention.dense")},
            final_norm="gpt_neox.final_layer_norm"),
]
_BY_TYPE = {t: a for a in ADAPTERS for t in a.model_types}
SUPPORTED = tuple(sorted(_BY_TYPE))


def adapter_for(model_type: str) -> Adapter:
    if model_type not in _BY_TYPE:
        raise PrunekitError(
            f"unsupported architecture {model_type!r}: prunekit supports {', '.join(SUPPORTED)} "
            f"(add an Adapter in prunekit/adapters.py)")
    return _BY_TYPE[model_type]
