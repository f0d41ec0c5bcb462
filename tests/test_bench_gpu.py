"""bench/bench_gpu.py runs on the CPU with a tiny shape: every row has its numbers and the JSON is written."""
import json
import os
import sys

from conftest import needs_cxx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))


def test_bench_gpu_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    import bench_gpu
    out = tmp_path / "gpu.json"
    rows = bench_gpu.main(["--shape", "tiny", "--layers", "2", "--nsamples", "4", "--seqlen", "64",
                           "--runs", "wanda", "wanda 2:4 alpha", "--offload", "auto", "cpu", "--out", str(out),
                           "--dtype", "bfloat16", "--activation-dtype", "auto", "bfloat16"])
    saved = json.loads(out.read_text())
    assert [r["run"] for r in saved["rows"]] == ["wanda"] * 4 + ["wanda 2:4 alpha"] * 4
    assert [r["storage"] for r in saved["rows"]] == ["float32", "bfloat16"] * 4
    for row in rows:
        assert row["prune_s"] > 0 and row["floor_s"] > 0 and row["peak_rss_gib"] > 0
        assert row["sparsity"] > 0.49 and row["placement"]["line"].startswith("placement:")
        assert {"statistics pass", "masks"} <= set(row["phases"])
    assert saved["meta"]["shape"] == "tiny" and saved["meta"]["blocks"] == 2


@needs_cxx
def test_bench_gpu_compile_trial(tmp_path, monkeypatch):
    """--compile-trial times torch.compile on block 0's full pass beside the eager pass (the measurement
    behind prunekit having no --compile: README, "torch.compile")."""
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    import bench_gpu
    out = tmp_path / "gpu.json"
    bench_gpu.main(["--shape", "tiny", "--layers", "2", "--nsamples", "4", "--seqlen", "64", "--runs",
                    "--no-floor", "--compile-trial", "--dtype", "float32", "--out", str(out)])
    trial = json.loads(out.read_text())["meta"]["compile_trial"]
    assert trial["eager_pass_s"] > 0 and trial["compiled_pass_s"] > 0 and trial["compile_s"] > 0
    assert trial["blocks"] == 2 and trial["wins"] == (trial["saved_s"] > trial["compile_s"])


def test_bench_gram_tiny(tmp_path):
    """bench/bench_gram.py on the CPU: a row per way and width, the banded upper triangle checked
    against the full GEMM (the same sums in the same order: bit for bit), the JSON written."""
    import bench_gram
    out = tmp_path / "gram.json"
    bench_gram.main(["--columns", "24", "40", "--tokens", "96", "--batches", "3", "--bands", "4", "8",
                     "--repeat", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["columns"], r["way"]) for r in rows] == [
        (c, w) for c in (24, 40) for w in ("full float32 GEMM", "upper triangle, 4 bands", "upper triangle, 8 bands")]
    assert all(r["ms"] > 0 for r in rows) and {r["vs full"] for r in rows if r["way"].startswith("full")} == {1.0}
    assert all(r["same"] == "bit for bit" or r["same"].startswith("max rel diff") for r in rows)
    assert all(float(r["same"].split()[-1]) < 1e-5 for r in rows if r["same"] != "bit for bit")
