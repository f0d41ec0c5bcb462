"""A run killed (SIGKILL) after a few blocks resumes from its checkpoint to the same model, bit for bit;
a resume with another config is refused naming the difference."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import byte_tokenizer
from test_cli import expect_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def four_blocks(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    path = tmp_path / "src"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def _args(model, corpus, out, *extra):
    return ["prune", "--model", model, "--method", "sparsegpt", "--allocation", "owl", "--calib", corpus,
            "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--out", str(out), *map(str, extra)]


def _weights(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.mark.parametrize("offload", ["auto", "disk"])
def test_killed_run_resumes_bit_for_bit(four_blocks, corpus_file, tmp_path, capsys, offload):
    """In memory, and under --offload disk (blocks read from the checkpoint and written to the output
    as they finish: on resume the finished blocks go from the checkpoint into the new output)."""
    from prunekit.cli import main
    ckpt = tmp_path / "ckpt"
    extra = ("--offload", offload)
    killer = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        from prunekit.execution import resume
        original = resume.Checkpointer.save
        def save(self, i, *args):
            original(self, i, *args)
            if i == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        resume.Checkpointer.save = save
        from prunekit.cli import main
        main({_args(four_blocks, corpus_file, tmp_path / "out", "--checkpoint-dir", ckpt, *extra)!r})
    """)
    done = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not (tmp_path / "out").exists() and (ckpt / "state.json").exists()
    # another config refuses to resume, naming the difference
    expect_error(capsys, "it was made with sparsity=0.5", *_args(four_blocks, corpus_file, tmp_path / "out",
                                                                 "--checkpoint-dir", ckpt, "--resume",
                                                                 "--sparsity", "0.6", *extra))
    assert main(_args(four_blocks, corpus_file, tmp_path / "out", "--checkpoint-dir", ckpt, "--resume", *extra)) == 0
    assert "resuming at block 2 of 4" in capsys.readouterr().err
    assert not ckpt.exists()  # cleared once the result is saved
    assert main(_args(four_blocks, corpus_file, tmp_path / "whole", "--no-checkpoint", *extra)) == 0
    a, b = _weights(tmp_path / "out"), _weights(tmp_path / "whole")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_leftover_checkpoint_needs_resume(four_blocks, corpus_file, tmp_path, capsys):
    (tmp_path / "out.checkpoint").mkdir()
    (tmp_path / "out.checkpoint" / "state.json").write_text("{}")
    expect_error(capsys, "holds an interrupted run: pass --resume", *_args(four_blocks, corpus_file, tmp_path / "out"))


def test_resume_of_a_run_saved_before_an_option_existed(tmp_path):
    """An interrupted run's state lacks an option added since (it ran with that option's default):
    the same settings resume; a different value of the new option is refused in one line."""
    import json

    from prunekit import PruneConfig, PrunekitError
    from prunekit.execution.resume import Checkpointer
    config = PruneConfig(method="wanda", nsamples=8, seqlen=32)
    Checkpointer(str(tmp_path), config)  # a fresh run: nothing to compare
    saved = {k: v for k, v in Checkpointer(str(tmp_path), config).config.items() if k != "residual_dtype"}
    (tmp_path / "state.json").write_text(json.dumps({"config": saved, "world_size": 1}))
    assert Checkpointer(str(tmp_path), config, resume=True).state is not None
    with pytest.raises(PrunekitError, match="made with residual_dtype='float32', this run has residual_dtype='compute'"):
        Checkpointer(str(tmp_path), PruneConfig(method="wanda", nsamples=8, seqlen=32, residual_dtype="compute"),
                     resume=True)
