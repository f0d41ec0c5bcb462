"""Any checkpoint dtype x any compute dtype, for every method and pattern, end to end; the saved model
keeps the checkpoint's dtype; float32 compute gives a bf16/fp16 checkpoint the masks of a float32 one."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import byte_tokenizer, tiny_model
from prunekit import PruneConfig, prune
from prunekit.adapters import adapter_for
from prunekit.api import prune_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """tiny Llama, Qwen2 and OPT saved in float32, bfloat16 and float16, with a byte tokenizer."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for arch in ("llama", "qwen2", "opt"):
        for name, dtype in DTYPES.items():
            path = root / f"{arch}-{name}"
            tiny_model(arch).to(dtype).save_pretrained(path)
            byte_tokenizer().save_pretrained(path)
            paths[arch, name] = str(path)
    return paths


def _saved_dtypes(folder: str) -> set:
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ["wanda", "stade", "magnitude"])
@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16"])
@pytest.mark.parametrize("ckpt", list(DTYPES))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_dtype_matrix(arch, ckpt, dtype, method, pattern, checkpoints, corpus_file, tmp_path):
    out = None if (arch == "qwen2" and method == "stade") else str(tmp_path / "out")  # qwen2 cannot store biases
    config = PruneConfig(method=method, pattern=pattern, nsamples=4, seqlen=32, dtype=dtype, device="cpu")
    record, net = prune_model(checkpoints[arch, ckpt], config, calib=corpus_file, eval=corpus_file,
                              eval_seqlen=64, eval_windows_max=2, out=out, log=None)
    assert record["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert torch.isfinite(torch.tensor(record["ppl"]))
    assert {p.dtype for p in net.parameters()} == {DTYPES[ckpt]}  # edited in the checkpoint's dtype
    if out:
        assert _saved_dtypes(out) == {{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[ckpt]}
        assert json.load(open(os.path.join(out, "prunekit.json")))["placement"]["line"].startswith("placement:")


@pytest.mark.parametrize("ckpt", list(DTYPES))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_every_method_allocation_pattern_and_compute_dtype(arch, ckpt, samples, tmp_path, monkeypatch):
    """The whole cross product in process: magnitude/wanda/stade/sparsegpt x uniform/alpha/owl x
    unstructured/2:4/4:8 x --dtype auto/float32/bfloat16/float16 on each checkpoint dtype: the prune
    ends, every weight stays in the checkpoint's dtype and finite, and the target sparsity is met."""
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))  # the ESD of each model computed once here
    failures = []
    for dtype in ("auto", "float32", "bfloat16", "float16"):
        for method in ("magnitude", "wanda", "stade", "sparsegpt"):
            for allocation in ("uniform", "alpha", "owl"):
                for pattern in ("unstructured", "2:4", "4:8"):
                    model = tiny_model(arch).to(DTYPES[ckpt])
                    config = PruneConfig(method=method, pattern=pattern, allocation=allocation, nsamples=4,
                                         seqlen=32, dtype=dtype, device="cpu")
                    try:
                        report = prune(model, config, samples[:4])
                    except Exception as exc:  # collected, so that one run names every failing combination
                        failures.append(f"{dtype} {method} {allocation} {pattern}: {type(exc).__name__}: {exc}")
                        continue
                    params = list(model.parameters())
                    if {p.dtype for p in params} != {DTYPES[ckpt]} or not all(torch.isfinite(p).all() for p in params):
                        failures.append(f"{dtype} {method} {allocation} {pattern}: dtype or non-finite weights")
                    elif report.sparsity != pytest.approx(0.5, abs=0.02):
                        failures.append(f"{dtype} {method} {allocation} {pattern}: sparsity {report.sparsity}")
    assert not failures, "\n".join(failures)


def _masks(model, adapter):
    return {f"{i}.{n}": adapter.weight(m) == 0 for i, b in enumerate(adapter.blocks(model))
            for n, m in adapter.block_linears(b).items()}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ["wanda", "stade", "magnitude"])
@pytest.mark.parametrize("ckpt", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_float32_compute_masks_equal_float32_checkpoint(arch, ckpt, method, pattern, samples):
    """A low-precision checkpoint computed in float32 is its values upcast: the masks equal those of a
    float32 checkpoint holding the same values, and the kept weights are untouched. (STADE stores its
    bias compensation in the checkpoint's dtype, so from block 1 on its inputs differ by that rounding:
    its first block is compared.)"""
    adapter = adapter_for(arch)
    low = tiny_model(arch).to(DTYPES[ckpt])
    high = tiny_model(arch).to(DTYPES[ckpt]).float()
    config = PruneConfig(method=method, pattern=pattern, nsamples=8, seqlen=32, dtype="float32", device="cpu")
    prune(low, config, samples)
    prune(high, config, samples)
    for name, mask in _masks(high, adapter).items():
        if method != "stade" or name.startswith("0."):
            assert torch.equal(_masks(low, adapter)[name], mask), name
    first = f"{adapter.blocks_path}.0."
    for (n, a), (_, b) in zip(low.named_parameters(), high.named_parameters()):
        if "bias" not in n and (method != "stade" or n.startswith(first) or ".layers." not in n):
            assert torch.equal(a.float(), b), n


def test_bf16_checkpoint_in_bf16_is_used_as_is(samples, monkeypatch):
    """No float32 master copy and no per-pass casts of a bf16 checkpoint computed in bf16."""
    model = tiny_model("llama").to(torch.bfloat16)
    casts = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if isinstance(self, torch.nn.Parameter) or (self.dim() == 2 and self.dtype != out.dtype
                                                     and self.shape[0] in (64, 128) and self.shape[1] in (64, 128)):
            casts.append(tuple(self.shape))
        return out
    report = prune(model, PruneConfig(method="wanda", nsamples=8, seqlen=32, dtype="bfloat16", device="cpu"), samples)
    assert report.sparsity == pytest.approx(0.5)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "to", spy)
        from prunekit.execution import Compute
        with Compute(torch.device("cpu"), torch.bfloat16).run(model.model.layers[0]) as block:
            assert all(p.dtype == torch.bfloat16 for p in block.parameters())  # LLaMA: RMS norms, no LayerNorm
    assert not casts


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("ckpt", ["float32", "bfloat16"])
def test_residual_in_compute_dtype(arch, ckpt, samples):
    """--residual-dtype compute: each block's residual stream enters in bf16 and its output is bf16
    (the stream never widens to float32 inside); the statistics stay float32; the block inputs rest in
    bf16 by default; the masks stay close to those of the float32 residual stream."""
    from prunekit.execution import Compute
    config = PruneConfig(method="wanda", nsamples=8, seqlen=32, dtype="bfloat16", device="cpu",
                         residual_dtype="compute")
    assert Compute.from_config(config).residual == torch.bfloat16
    assert Compute.from_config(config).storage == torch.bfloat16
    assert not Compute.storage_is_planned(config, torch.device("cpu"))
    model, wide = tiny_model(arch).to(DTYPES[ckpt]), tiny_model(arch).to(DTYPES[ckpt])
    adapter = adapter_for(arch)
    seen = []
    for block in adapter.blocks(model):
        block.register_forward_pre_hook(lambda m, args, kw: seen.append(("in", args[0].dtype)), with_kwargs=True)
        block.register_forward_hook(lambda m, args, out: seen.append(
            ("out", (out[0] if isinstance(out, (tuple, list)) else out).dtype)))
    report = prune(model, config, samples)
    prune(wide, PruneConfig(method="wanda", nsamples=8, seqlen=32, dtype="bfloat16", device="cpu"), samples)
    assert report.sparsity == pytest.approx(0.5)
    assert report.placement["storage_dtype"] == "bfloat16"
    assert seen[0] == ("in", DTYPES[ckpt])  # the input capture: the embeddings' output, stored in bf16
    assert set(seen[1:]) == {("in", torch.bfloat16), ("out", torch.bfloat16)}
    masks, wide_masks = _masks(model, adapter), _masks(wide, adapter)
    agree = min((masks[k] == wide_masks[k]).float().mean().item() for k in masks)
    assert 0.9 < agree  # the same statistics up to bf16 rounding of the residual stream


def test_residual_dtype_flag():
    from prunekit.cli import _config, build_parser
    from prunekit.errors import PrunekitError
    args = build_parser().parse_args(["prune", "--model", "m", "--residual-dtype", "compute"])
    assert _config(args).residual_dtype == "compute"
    assert PruneConfig.from_dict(PruneConfig(residual_dtype="compute").to_dict()).residual_dtype == "compute"
    with pytest.raises(PrunekitError, match="--residual-dtype 'bf16' is not one of float32, compute"):
        PruneConfig(residual_dtype="bf16")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_residual_compute_end_to_end_with_evaluation(arch, checkpoints, corpus_file):
    """prune + perplexity under --residual-dtype compute (OPT's LayerNorms take the bf16 stream inside
    the blocks and a float32 one in the whole-model evaluation)."""
    config = PruneConfig(method="wanda", nsamples=4, seqlen=32, dtype="bfloat16", device="cpu", residual_dtype="compute")
    record, _ = prune_model(checkpoints[arch, "float32"], config, calib=corpus_file, eval=corpus_file,
                            eval_seqlen=64, eval_windows_max=2, out=None, log=None)
    assert torch.isfinite(torch.tensor(record["ppl"])) and record["sparsity"] == pytest.approx(0.5, abs=1e-6)
