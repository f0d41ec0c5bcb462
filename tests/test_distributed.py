"""Two gloo ranks on the CPU (torchrun) give the single process's model: the same masks, weights within
float tolerance (the statistics are summed in another order)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def free_port() -> str:
    """A port nobody listens on now. (One port per pytest process, as before, was taken again by the
    next test while the last rendezvous still held it: 'address already in use'.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


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
                          "--master-port", free_port(), "-m", "prunekit", *args,
                          "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("sparsity") == 1, two.stdout  # rank 0 alone reports (and writes --json)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        if k.endswith("weight") and ".layers." in k and "norm" not in k:
            assert torch.equal(a[k] == 0, b[k] == 0), k  # identical masks
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    ra, rb = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert [e["rel_mse"] for e in rb["block_error"]] == pytest.approx([e["rel_mse"] for e in ra["block_error"]],
                                                                       rel=1e-3)


def test_two_ranks_resume_after_a_kill(tiny_dir, corpus_file, tmp_path):
    """Both ranks killed (SIGKILL) after block 0: the same torchrun command with --resume continues
    from each rank's checkpointed shard and ends with the uninterrupted run's model, bit for bit; one
    process cannot resume what two made."""
    model, ckpt = tiny_dir(), tmp_path / "ckpt"
    args = ["prune", "--model", model, "--method", "sparsegpt", "--calib", corpus_file, "--nsamples", "8",
            "--seqlen", "64", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    killer = tmp_path / "killer.py"
    killer.write_text(f"""
import os, signal, sys
sys.path.insert(0, {root!r})
from prunekit.execution import resume
original = resume.Checkpointer.save
def save(self, i, *args):
    original(self, i, *args)
    os.kill(os.getpid(), signal.SIGKILL)
resume.Checkpointer.save = save
from prunekit.cli import main
sys.exit(main(sys.argv[1:]))
""")

    def torchrun(*cmd):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", free_port(), *cmd],
                              capture_output=True, text=True, env=env)

    out = ["--out", str(tmp_path / "out"), "--checkpoint-dir", str(ckpt)]
    assert torchrun(str(killer), *args, *out).returncode != 0
    assert {p.name for p in ckpt.iterdir()} == {"state.json", "block-00000.safetensors",
                                               "activations-00000-rank0.safetensors",
                                               "activations-00000-rank1.safetensors"}
    one = subprocess.run([sys.executable, "-m", "prunekit", *args, *out, "--resume"], capture_output=True,
                         text=True, env=env)
    assert one.returncode == 2 and "made by 2 process(es), this run has 1" in one.stderr
    resumed = torchrun("-m", "prunekit", *args, *out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at block 1 of 2" in resumed.stderr and not ckpt.exists()
    whole = torchrun("-m", "prunekit", *args, "--out", str(tmp_path / "whole"), "--no-checkpoint")
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prune_model_leaves_the_group_it_made(tiny_dir, corpus_file, tmp_path):
    """Under torchrun, prune_model leaves the gloo group it joined once its collectives are done (a
    group left to the interpreter's exit can abort the process: SIGABRT, pytorch/pytorch#190489), and
    keeps a group the caller made itself."""
    model = tiny_dir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "api.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from prunekit.api import prune_model
from prunekit.config import PruneConfig
own = sys.argv[1] == "own"
if own:
    dist.init_process_group("gloo")
config = PruneConfig(method="wanda", nsamples=4, seqlen=32, device="cpu")
prune_model({model!r}, config, calib={corpus_file!r})
with open(os.path.join({str(tmp_path)!r}, sys.argv[1] + os.environ["RANK"]), "w") as f:
    f.write(str(dist.is_initialized()))
if own:
    dist.destroy_process_group()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode, expected in (("api", "False"), ("own", "True")):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", free_port(), str(script), mode],
                             capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert [(tmp_path / f"{mode}{rank}").read_text() for rank in (0, 1)] == [expected] * 2, mode
