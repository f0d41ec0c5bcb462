"""Bad input and failures end with one clear line (exit 2) and no partial output; runs are deterministic."""
import errno
import os

import pytest
import torch

from conftest import tiny_model
from prunekit import PruneConfig, prune
from test_cli import expect_error


def test_truncated_safetensors(tiny_dir, corpus_file, capsys):
    model = tiny_dir()
    path = os.path.join(model, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    expect_error(capsys, "truncated or corrupt", "prune", "--model", model, "--calib", corpus_file,
                 "--nsamples", 2, "--seqlen", 32)


def test_gguf_that_is_not_a_model(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(os.urandom(4096))
    expect_error(capsys, "is not a GGUF file", "prune", "--model", bad)


def test_random_bytes_as_corpus(tiny_dir, tmp_path, capsys):
    junk = tmp_path / "junk.txt"
    junk.write_bytes(os.urandom(20000))
    expect_error(capsys, "junk.txt is not utf-8 text", "prune", "--model", tiny_dir(), "--calib", junk,
                 "--nsamples", 2, "--seqlen", 32)
    expect_error(capsys, "is not a known text encoding", "prune", "--model", tiny_dir(), "--calib", junk,
                 "--encoding", "klingon", "--nsamples", 2, "--seqlen", 32)


def test_latin1_corpus_with_its_encoding(tiny_dir, tmp_path, capsys):
    text = tmp_path / "latin.txt"
    text.write_bytes(("café naïve déjà vu " * 400).encode("latin-1"))
    expect_error(capsys, "is not utf-8 text", "prune", "--model", tiny_dir(), "--calib", text,
                 "--nsamples", 2, "--seqlen", 32)
    from prunekit.cli import main
    assert main(["prune", "--model", tiny_dir(), "--calib", str(text), "--encoding", "latin-1",
                 "--nsamples", "2", "--seqlen", "32", "--device", "cpu"]) == 0


def test_length_beyond_the_context(tiny_dir, corpus_file, capsys):
    expect_error(capsys, "--seqlen 100000 is beyond the model's context (512 positions)", "prune", "--model",
                 tiny_dir(), "--calib", corpus_file, "--nsamples", 1, "--seqlen", 100000)
    expect_error(capsys, "--eval-seqlen 4096 is beyond", "prune", "--model", tiny_dir(), "--calib", corpus_file,
                 "--nsamples", 2, "--seqlen", 32, "--eval", corpus_file, "--eval-seqlen", 4096)


def test_disk_full_while_saving(tiny_dir, corpus_file, tmp_path, capsys, monkeypatch):
    from prunekit import export

    def full(folder, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(folder, "prunekit.json"))
    monkeypatch.setattr(export, "write_record", full)
    expect_error(capsys, "No space left on device", "prune", "--model", tiny_dir(), "--calib", corpus_file,
                 "--nsamples", 2, "--seqlen", 32, "--out", tmp_path / "out", "--device", "cpu")
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_nan_in_a_block_output_is_named(samples):
    model = tiny_model("llama")
    model.model.layers[0].register_forward_hook(lambda m, a, out: (out[0] * float("nan"),) + tuple(out[1:])
                                                 if isinstance(out, tuple) else out * float("nan"))
    from prunekit import PrunekitError
    with pytest.raises(PrunekitError, match="NaN/inf in the calibration activations of block 1"):
        prune(model, PruneConfig(method="wanda", nsamples=8, seqlen=32, device="cpu"), samples)


@pytest.mark.parametrize("method", ["wanda", "stade", "sparsegpt"])
def test_deterministic(method, samples):
    """The same seed, inputs and settings give bit-identical masks and weights."""
    a, b = tiny_model("llama"), tiny_model("llama")
    config = PruneConfig(method=method, pattern="2:4", nsamples=8, seqlen=32, device="cpu", batch_size=3)
    prune(a, config, samples)
    prune(b, config, samples)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_text_reads_with_universal_newlines(tmp_path):
    """wiki.test.raw has CRLF line ends: they read as \\n, as Python's text mode (and the reference) reads them."""
    from prunekit.data import load_text
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"one\r\ntwo\rthree\n")
    assert load_text(str(path)) == "one\ntwo\nthree\n"


def test_nan_read_a_block_late_still_names_its_block(samples, monkeypatch):
    """On a GPU the NaN flags are read a block late (the loop never waits for the GPU): a NaN in
    block 1, the last block, stops the prune at the end, naming block 1; one in block 0 stops it at
    block 1, naming block 0."""
    from prunekit import PrunekitError
    from prunekit.execution import loop
    monkeypatch.setattr(loop, "_lagged_checks", lambda device, checkpointed: True)
    for block in (0, 1):
        model = tiny_model("llama")
        with torch.no_grad():
            model.model.layers[block].self_attn.q_proj.weight[0, 0] = float("nan")
        with pytest.raises(PrunekitError, match=f"NaN/inf in the pruning scores of block {block} self_attn.q_proj"):
            prune(model, PruneConfig(method="wanda", nsamples=8, seqlen=32, device="cpu"), samples)
    check = loop.NaNCheck(lag=True)
    assert check.add(0, ["a"], [[torch.tensor(True), None]]) is None  # read a block later
    assert "block 0 a" in str(check.add(1, ["a"], [[torch.tensor(False), None]]))
    assert check.done() is None
