"""--save-format bitmask: about half the bytes of dense at 50 % in bf16, and back to the identical model."""
import json
import os

import pytest
import torch

import prunekit
from prunekit import PruneConfig
from prunekit.api import prune_model
from prunekit.export import pack_weight, unpack_weight


def test_pack_round_trip_exact():
    w = torch.randn(7, 13).to(torch.bfloat16)
    w[w.abs() < 0.5] = 0
    packed = pack_weight(w)
    assert packed["bitmask"].numel() == (7 * 13 + 7) // 8
    assert torch.equal(unpack_weight(packed["values"], packed["bitmask"], packed["shape"]), w)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_bitmask_folder_loads_to_the_identical_model(pattern, tmp_path, corpus_file):
    from conftest import byte_tokenizer, tiny_model
    src = tmp_path / "src"
    model = tiny_model("llama").to(torch.bfloat16)
    model.config.intermediate_size = 128
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    kw = dict(method="stade", pattern=pattern, nsamples=4, seqlen=64, device="cpu")
    prune_model(str(src), PruneConfig(**kw), calib=corpus_file, out=str(tmp_path / "dense"), log=None)
    prune_model(str(src), PruneConfig(**kw, save_format="bitmask"), calib=corpus_file, out=str(tmp_path / "bits"),
                log=None)
    assert json.load(open(tmp_path / "bits" / "prunekit.json"))["save_format"] == "bitmask"
    dense, bits = prunekit.load(str(tmp_path / "dense")), prunekit.load(str(tmp_path / "bits"))
    assert bits.model.layers[0].mlp.down_proj.bias is not None  # STADE's biases come back too
    for (n, a), (_, b) in zip(dense.state_dict().items(), bits.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(dense(ids).logits, bits(ids).logits)
    def size(d):
        return sum(os.path.getsize(tmp_path / d / f) for f in os.listdir(tmp_path / d) if "safetensors" in f)
    block_share = 1 - 2 * 256 * 64 / sum(p.numel() for p in dense.parameters())  # embeddings and head stay dense
    assert size("bits") < size("dense") * (1 - 0.4 * block_share)


def test_eval_reads_the_bitmask_format(tmp_path, corpus_file, capsys):
    from conftest import byte_tokenizer, tiny_model
    from prunekit.cli import main
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    common = ["--calib", corpus_file, "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--no-checkpoint"]
    assert main(["prune", "--model", str(src), *common, "--out", str(tmp_path / "d")]) == 0
    assert main(["prune", "--model", str(src), *common, "--out", str(tmp_path / "b"), "--save-format", "bitmask"]) == 0
    ppl = []
    for d in ("d", "b"):
        assert main(["eval", "--model", str(tmp_path / d), "--eval", corpus_file, "--seqlen", "64", "--eval-windows",
                     "2", "--device", "cpu", "--json", str(tmp_path / f"{d}.json")]) == 0
        ppl.append(json.loads((tmp_path / f"{d}.json").read_text())["ppl"])
    assert ppl[0] == ppl[1]
