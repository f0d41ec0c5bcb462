"""bench-speed on the CPU: a 2:4 model gives a table per layer shape; a model that is not 2:4 is refused."""
import pytest

from test_cli import expect_error, run


def test_bench_speed_cpu(tiny_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "p24"
    assert run(capsys, "prune", "--model", tiny_dir(), "--pattern", "2:4", "--calib", corpus_file, "--nsamples", 2,
               "--seqlen", 32, "--out", out, "--device", "cpu")[0] == 0
    code, _, err = run(capsys, "bench-speed", "--model", out, "--device", "cpu", "--tokens", "16,64",
                       "--json", tmp_path / "speed.json")
    assert code == 0, err
    import json
    record = json.loads((tmp_path / "speed.json").read_text())
    assert {r["shape"] for r in record["layers"]} == {"64x64", "32x64", "128x64", "64x128"}
    assert all(r["dense_ms"] > 0 and r["csr_ms"] > 0 for r in record["layers"]) and "no 2:4 kernel" in record["note"]


def test_bench_speed_refuses_dense(tiny_dir, capsys):
    expect_error(capsys, "is not 2:4 sparse: prune with --pattern 2:4 first", "bench-speed", "--model", tiny_dir(),
                 "--device", "cpu")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA GPU visible")
def test_bench_speed_cuda(tiny_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "p24"
    run(capsys, "prune", "--model", tiny_dir(), "--pattern", "2:4", "--calib", corpus_file, "--nsamples", 2,
        "--seqlen", 32, "--out", out)
    assert run(capsys, "bench-speed", "--model", out, "--dtype", "float16", "--tokens", "128")[0] == 0
