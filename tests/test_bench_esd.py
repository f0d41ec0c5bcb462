"""bench/bench_esd.py runs on the CPU with small random shapes: the two-stage rows agree with eigvalsh,
and --host-floor times dsbev at b = 1 and each band width."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_esd_small_two_stage_and_host_floor(tmp_path):
    out = tmp_path / "esd.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PRUNEKIT_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_esd.py"), "--random", "small",
                          "--layers", "1", "--device", "cpu", "--precisions", "float64", "--bands", "8",
                          "--graph", "--host-floor", "--skip-byte-key", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    saved = json.loads(out.read_text())
    rows = {r["precision"]: r for r in saved["rows"]}
    assert set(rows) == {"float64", "float64, two-stage b=8", "float64, two-stage b=8, graph"}
    for label in ("float64, two-stage b=8", "float64, two-stage b=8, graph"):
        assert rows[label]["max_dpeak"] < 1e-9 and rows[label]["max_dmid"] < 1e-9
    assert saved["meta"]["two_stage"]["float64, two-stage b=8, graph"]["graph"] == "off"  # CUDA graphs: CUDA only
    floor = saved["meta"]["host_floor"]
    assert floor["n"] == 256 and floor["threads"] >= 1  # the small shape's widest Gram
    assert set(floor["seconds_per_round"]) == {"1", "8"} and all(s > 0 for s in floor["seconds_per_round"].values())
    assert "b = 1:" in run.stdout and "b = 8:" in run.stdout
