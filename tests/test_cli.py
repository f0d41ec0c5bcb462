"""The command line: a full run on a tiny saved model, and a one-line error (exit 2) for each bad input."""
import json
import os

import pytest
from transformers import AutoModelForCausalLM

from prunekit.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("prunekit:")], err


def expect_error(capsys, fragment, *argv):
    code, lines, err = run(capsys, *argv)
    assert code == 2, err
    assert len(lines) == 1 and fragment in lines[0], err
    assert not any("Traceback" in line for line in err)


def test_prune_save_json_and_eval(tiny_dir, corpus_file, tmp_path, capsys):
    model = tiny_dir("llama")
    out, js = tmp_path / "pruned", tmp_path / "run.json"
    code, _, err = run(capsys, "prune", "--model", model, "--method", "stade", "--calib", corpus_file,
                       "--nsamples", 8, "--seqlen", 64, "--eval", corpus_file, "--eval-seqlen", 128,
                       "--eval-windows", 4, "--eval-dense", "--out", out, "--json", js, "--device", "cpu")
    assert code == 0, err
    record = json.loads(js.read_text())
    for key in ("ppl", "ppl_dense", "sparsity", "prune_seconds", "eval_tokens_per_second", "layers"):
        assert key in record
    assert record["sparsity"] == pytest.approx(0.5)
    assert len(record["layers"]) == 14 and {"name", "sparsity"} <= set(record["layers"][0])
    saved = json.loads((out / "prunekit.json").read_text())
    assert saved["config"]["method"] == "stade" and "versions" in saved and saved["ppl"] == record["ppl"]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.model.layers[1].mlp.down_proj.bias.abs().sum() > 0
    # eval on the saved folder gives the same perplexity as the run reported
    code, _, err = run(capsys, "eval", "--model", out, "--eval", corpus_file, "--seqlen", 128,
                       "--eval-windows", 4, "--json", tmp_path / "eval.json")
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["ppl"] == pytest.approx(record["ppl"], rel=1e-4)


def test_jsonl_corpus(tiny_dir, tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line {i} " * 30}) for i in range(60)))
    code, _, err = run(capsys, "prune", "--model", tiny_dir(), "--method", "wanda", "--pattern", "4:8",
                       "--calib", path, "--nsamples", 4, "--seqlen", 64)
    assert code == 0, err


def test_missing_model(capsys, corpus_file):
    expect_error(capsys, "does not exist", "prune", "--model", "/no/such/model", "--calib", corpus_file)
    expect_error(capsys, "does not exist", "prune", "--model", "./missing.gguf")


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import BloomConfig
    from conftest import byte_tokenizer
    path = tmp_path / "bloom"
    AutoModelForCausalLM.from_config(BloomConfig(vocab_size=256, hidden_size=32, n_layer=1, n_head=4)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    expect_error(capsys, "unsupported architecture 'bloom'", "prune", "--model", path)


@pytest.mark.parametrize("args,fragment", [
    (["--sparsity", "1.5"], "outside (0, 1)"),
    (["--sparsity", "0"], "outside (0, 1)"),
    (["--pattern", "4:4"], "impossible"),
    (["--pattern", "two:four"], "malformed"),
    (["--pattern", "2:4", "--sparsity", "0.6"], "prunes exactly 0.5"),
    (["--method", "nope"], "unknown method"),
])
def test_bad_settings(args, fragment, capsys):
    expect_error(capsys, fragment, "prune", "--model", "smollm2-135m", *args)


def test_bad_inputs_need_a_model(tiny_dir, corpus_file, tmp_path, capsys):
    model = tiny_dir("llama")
    expect_error(capsys, "divisible by 3", "prune", "--model", model, "--pattern", "1:3", "--calib", corpus_file)
    expect_error(capsys, "too short", "prune", "--model", model, "--calib", corpus_file,
                 "--nsamples", 1000, "--seqlen", 512)
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    expect_error(capsys, "fewer than one window", "prune", "--model", model, "--calib", corpus_file,
                 "--nsamples", 2, "--seqlen", 32, "--eval", short)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    expect_error(capsys, "exists and is not empty", "prune", "--model", model, "--out", busy)
    assert os.listdir(busy) == ["keep.txt"]
    expect_error(capsys, "neither a file nor a dataset", "prune", "--model", model, "--calib", "no-such-corpus")


def test_unsavable_bias_fails_before_pruning(tiny_dir, corpus_file, tmp_path, capsys):
    expect_error(capsys, "cannot store", "prune", "--model", tiny_dir("mistral"), "--method", "stade",
                 "--calib", corpus_file, "--nsamples", 2, "--seqlen", 32, "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    code, _, err = run(capsys, "prune", "--model", tiny_dir("mistral"), "--method", "stade", "--no-bias-update",
                       "--calib", corpus_file, "--nsamples", 2, "--seqlen", 32, "--out", tmp_path / "o")
    assert code == 0, err


def test_dataset_name_resolves_offline(tiny_dir, monkeypatch, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "wikitext-2").mkdir(parents=True)
    (data / "wikitext-2" / "valid.txt").write_text("some calibration text " * 400)
    monkeypatch.setenv("PRUNEKIT_DATA_DIR", str(data))
    code, _, err = run(capsys, "prune", "--model", tiny_dir(), "--calib", "wikitext2", "--nsamples", 4, "--seqlen", 64)
    assert code == 0, err
    monkeypatch.setenv("PRUNEKIT_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expect_error(capsys, "not available", "prune", "--model", tiny_dir("opt"), "--calib", "ptb")


def test_analyze_prints_table_and_draws_plot(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    png, js = tmp_path / "alpha.png", tmp_path / "alpha.json"
    code = main(["analyze", "--model", tiny_dir(), "--sparsity", "0.6", "--plot", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0
    assert "mean alpha" in out and len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 2
    record = json.loads(js.read_text())
    assert len(record["blocks"]) == 2 and len(record["matrices"]) == 14
    mean = sum(b["sparsity"] for b in record["blocks"]) / 2  # equal-sized blocks
    assert mean == pytest.approx(0.6, abs=1e-6)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
