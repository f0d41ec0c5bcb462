"""Tiny random models built in-process from configs, and a byte-level tokenizer: no files, no downloads."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

DATA_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
VOCAB = 256
# torch.compile's inductor builds CPU kernels with the host's C++ compiler
needs_cxx = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler for inductor")


def byte_tokenizer():
    """One token per byte (BPE with no merges over the byte-level alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def _configs():
    from transformers import (GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config,
                              Qwen3Config)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return {
        "llama": LlamaConfig(**common),
        "mistral": MistralConfig(**common),
        "qwen2": Qwen2Config(**common),
        "qwen3": Qwen3Config(**common, head_dim=16),
        "opt": OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                           bos_token_id=0, eos_token_id=0),
        "gpt_neox": GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=512),
    }


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox")


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[arch], attn_implementation="sdpa")
    with torch.no_grad():  # non-centred activations, so STADE's compensation has work to do
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("bias"):
                p.add_(0.5)
    return model.eval()


@pytest.fixture
def samples():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (8, 32), generator=g)


@pytest.fixture
def corpus_file(tmp_path):
    """A real text file for the CLI (a slice of Tiny Shakespeare, or generated text offline)."""
    src = os.path.join(DATA_DIR, "tinyshakespeare", "input.txt")
    text = open(src).read()[:40000] if os.path.exists(src) else " ".join(f"word{i % 97}" for i in range(8000))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return str(path)


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny Llama saved as a Hugging Face folder with a byte tokenizer."""
    def make(arch="llama"):
        path = tmp_path / f"tiny-{arch}"
        tiny_model(arch).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        return str(path)
    return make
