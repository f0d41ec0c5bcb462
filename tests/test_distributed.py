"""Two gloo ranks on the CPU (torchrun) give the single process's model: the same masks, weights within
float tolerance (the statistics are summed in another order)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.parametrize("method", ["stade", "sparsegpt"])  # Chan-merged means; X^T X and sums of squares
def test_two_ranks_equal_one_process(method, tiny_dir, corpus_file, tmp_path):
    model = tiny_dir()
    args = ["prune", "--model", model, "--method", method, "--calib", corpus_file, "--nsamples", "8",
            "--seqlen", "64", "--device", "cpu", "--record-error"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "prunekit", *args, "--out", str(tmp_path / "one"),
                          "--json", str(tmp_path / "one.json")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(29500 + os.getpid() % 1000), "-m", "prunekit", *args,
                          "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        if k.endswith("weight") and ".layers." in k and "norm" not in k:
            assert torch.equal(a[k] == 0, b[k] == 0), k  # identical masks
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    ra, rb = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert [e["rel_mse"] for e in rb["block_error"]] == pytest.approx([e["rel_mse"] for e in ra["block_error"]],
                                                                       rel=1e-3)
