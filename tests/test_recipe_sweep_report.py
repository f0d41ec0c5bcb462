"""Recipes, sweeps and reports without a model: a fake run_cell stands in for prune + evaluate."""
import json
import re

import pytest

from prunekit.cli import build_parser
from prunekit.config import PruneConfig
from prunekit.errors import PrunekitError
from prunekit.recipe import (explicit_args, load_recipe, merge, overrides_from_args, recorded_run,
                             save_recipe)
from prunekit.report import write_report
from prunekit.sweep import expand_grid, load_sweep, read_results, run_sweep

GRID = {"method": ["wanda", "magnitude"], "allocation": ["uniform", "alpha"],
        "pattern": ["unstructured", "2:4"], "sparsity": [0.5, 0.6]}


def one_line_error(fn, *fragments):
    with pytest.raises(PrunekitError) as exc:
        fn()
    message = str(exc.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


# ---------------------------------------------------------------- recipes

@pytest.mark.parametrize("ext", ["yaml", "yml", "json"])
def test_recipe_round_trip(tmp_path, ext):
    config = PruneConfig(method="stade", pattern="2:4", allocation="owl", sparsity=0.6, epsilon=0.2, nsamples=32)
    path = str(tmp_path / f"recipe.{ext}")
    save_recipe(config, path)
    assert merge(load_recipe(path), {}) == config


def test_yaml_numbers_are_yaml_1_2(tmp_path):
    """Unquoted 2:4 must stay a pattern (YAML 1.1 reads base-60 124), 1e-3 must be a float."""
    path = tmp_path / "r.yaml"
    path.write_text("method: wanda\npattern: 2:4\nepsilon: 1e-1\nnsamples: 16\n")
    recipe = load_recipe(str(path))
    assert recipe == {"method": "wanda", "pattern": "2:4", "epsilon": 0.1, "nsamples": 16}
    assert merge(recipe, {}).sparsity == 0.5


def test_prunekit_json_record_is_a_recipe(tmp_path):
    config = PruneConfig(method="stade", sparsity=0.7, allocation="alpha")
    record = {"model": "smollm2-135m", "config": config.to_dict(), "calib": "wikitext2", "eval": "c4",
              "ppl": 31.2, "layers": [{"name": "x", "sparsity": 0.7}], "versions": {"torch": "2"}}
    path = tmp_path / "prunekit.json"
    path.write_text(json.dumps(record))
    assert merge(load_recipe(str(path)), {}) == config
    assert recorded_run(str(path)) == {"model": "smollm2-135m", "calib": "wikitext2", "eval": "c4"}


def test_a_record_of_an_earlier_prunekit_with_a_retired_key(tmp_path):
    """prunekit.json from a version that had --compile: off, the key is dropped; on, a one-line error."""
    record = {"config": {**PruneConfig(method="wanda").to_dict(), "compile": False}}
    path = tmp_path / "prunekit.json"
    path.write_text(json.dumps(record))
    assert merge(load_recipe(str(path)), {}) == PruneConfig(method="wanda")
    record["config"]["compile"] = True
    path.write_text(json.dumps(record))
    with pytest.raises(PrunekitError, match="'compile' is no longer supported.*remove it"):
        load_recipe(str(path))


def test_bad_recipes_are_one_line_errors(tmp_path):
    unknown = tmp_path / "u.yaml"
    unknown.write_text("method: wanda\nsparsty: 0.5\n")
    one_line_error(lambda: load_recipe(str(unknown)), str(unknown), "sparsty", "known keys", "'sparsity'")
    bad_yaml = tmp_path / "b.yaml"
    bad_yaml.write_text("method: [wanda\nsparsity: 0.5\n")
    one_line_error(lambda: load_recipe(str(bad_yaml)), str(bad_yaml), "not valid YAML", "line")
    bad_json = tmp_path / "b.json"
    bad_json.write_text('{"method": "wanda",}')
    one_line_error(lambda: load_recipe(str(bad_json)), str(bad_json), "not valid JSON", "line 1")
    wrong_type = tmp_path / "t.json"
    wrong_type.write_text('{"nsamples": "128"}')
    one_line_error(lambda: load_recipe(str(wrong_type)), "nsamples must be int", "'128'")
    impossible = tmp_path / "i.json"
    impossible.write_text('{"pattern": "2:4", "sparsity": 0.7}')
    one_line_error(lambda: load_recipe(str(impossible)), str(impossible), "prunes exactly 0.5")
    not_mapping = tmp_path / "l.yaml"
    not_mapping.write_text("- wanda\n")
    one_line_error(lambda: load_recipe(str(not_mapping)), "must hold a mapping")
    one_line_error(lambda: load_recipe(str(tmp_path / "missing.yaml")), "cannot read")


def test_typed_flags_override_the_recipe():
    parser = build_parser()
    recipe = {"method": "stade", "sparsity": 0.6, "nsamples": 32, "allocation": "alpha"}
    # --method wanda equals the parser default but was typed: it wins; --nsamples was not typed: recipe's 32
    argv = ["prune", "--model", "m", "--method", "wanda", "--sparsity", "0.7", "--no-bias-update"]
    args = parser.parse_args(argv)
    typed = explicit_args(parser, argv)
    assert typed == {"model", "method", "sparsity", "no_bias_update"}
    overrides = overrides_from_args(args, typed)
    assert overrides == {"method": "wanda", "sparsity": 0.7, "bias_update": False}
    config = merge(recipe, overrides)
    assert (config.method, config.sparsity, config.nsamples, config.allocation, config.bias_update) == \
        ("wanda", 0.7, 32, "alpha", False)
    # the parser is left as it was: defaults and required flags back
    again = parser.parse_args(["prune", "--model", "m"])
    assert again.method == "wanda" and again.nsamples == 128 and again.no_bias_update is False
    with pytest.raises(SystemExit):  # required flags are required again (prune's --model is optional: --config)
        parser.parse_args(["eval"])
    assert explicit_args(parser, ["analyze", "--model", "m", "--epsilon", "0.1"]) == {"model", "epsilon"}


def test_typed_pattern_takes_a_recorded_nm_sparsity_along():
    """A saved record stores the resolved 0.5 of its 2:4 pattern; typing --pattern 1:4 must not clash."""
    recorded = PruneConfig(pattern="2:4").to_dict()
    assert merge(recorded, {"pattern": "1:4"}).sparsity == 0.25
    assert merge({"pattern": "2:4", "sparsity": 0.7, "allocation": "alpha"}, {"pattern": "4:8"}).sparsity == 0.7


# ---------------------------------------------------------------- sweeps

def spec(tmp_path, **extra):
    return {"model": "tiny", "calib": "c.txt", "eval": "wikitext2", "base": {"nsamples": 8, "seqlen": 64},
            "grid": dict(GRID), "results": str(tmp_path / "results.jsonl"), **extra}


def fake_ppl(config: PruneConfig) -> float:
    ppl = 10 * (1 + config.sparsity) ** 4 * (1.5 if config.method == "magnitude" else 1.0)
    return ppl * (0.9 if config.allocation == "alpha" else 1.0) * (1.2 if config.pattern != "unstructured" else 1.0)


class FakeRun:
    """Counts calls; fails with `fail` on call number `fail_at`."""

    def __init__(self, fail_at=None, fail=RuntimeError):
        self.calls, self.fail_at, self.fail = [], fail_at, fail

    def __call__(self, config):
        self.calls.append(config)
        if len(self.calls) == self.fail_at:
            raise self.fail("boom")
        blocks = [{"block": i, "metric": 0.0, "sparsity": config.sparsity + (i - 1.5) * 0.02} for i in range(4)]
        return {"ppl": fake_ppl(config), "sparsity": config.sparsity, "allocation": blocks,
                "prune_seconds": 1.0}


def test_grid_expansion_skips_impossible_cells(tmp_path):
    cells = expand_grid(spec(tmp_path))
    possible = [c for c in cells if c.possible]
    impossible = [c for c in cells if not c.possible]
    # 2 methods x 2 allocations x 2 patterns x 2 sparsities; 2:4 + uniform + 0.6 is impossible per method
    assert len(cells) == 16 and len(possible) == 14 and len(impossible) == 2
    assert all(c.params["pattern"] == "2:4" and c.params["allocation"] == "uniform" and c.params["sparsity"] == 0.6
               and "prunes exactly 0.5" in c.reason for c in impossible)
    assert len({c.id for c in possible}) == 14
    assert [c.id for c in possible] == [c.id for c in expand_grid(spec(tmp_path)) if c.possible]  # stable
    assert all(c.config.nsamples == 8 and c.config.seqlen == 64 for c in possible)
    assert expand_grid(spec(tmp_path, model="other"))[0].id != possible[0].id  # the run is part of the id


def test_grid_dedup_and_typos(tmp_path):
    s = spec(tmp_path, grid={"pattern": ["2:4"], "sparsity": [None, 0.5]})
    assert len(expand_grid(s)) == 1  # the same config twice
    s = spec(tmp_path, grid={"allocation": ["uniform", "alpah"]})
    one_line_error(lambda: expand_grid(s), "grid allocation", "'alpah'", "valid in no combination")
    s = spec(tmp_path, grid={"method": ["wanda", "wandda"]})
    one_line_error(lambda: expand_grid(s), "'wandda'", "unknown method")
    one_line_error(lambda: expand_grid(spec(tmp_path, grid={"sparsty": [0.5]})), "unknown grid keys")
    one_line_error(lambda: expand_grid(spec(tmp_path, base={"method": "x"}, grid={"method": ["wanda"]})),
                   "both base and grid")
    one_line_error(lambda: expand_grid(spec(tmp_path, epochs=3)), "unknown sweep keys ['epochs']")


def test_load_sweep_yaml(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("model: tiny\ngrid:\n  method: [wanda, stade]\n  pattern: [unstructured, 2:4, 4:8]\n")
    s = load_sweep(str(path))
    assert s["results"] == str(tmp_path / "results.jsonl")  # beside the sweep file
    assert [c.config.pattern for c in expand_grid(s)] == ["unstructured", "2:4", "4:8"] * 2


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_sweep_resumes_after_a_crash(tmp_path, interrupt):
    s = spec(tmp_path)
    results = tmp_path / "results.jsonl"
    crashing = FakeRun(fail_at=3, fail=interrupt)
    with pytest.raises(interrupt):
        run_sweep(s, crashing)
    assert len(crashing.calls) == 3 and len(read_results(str(results))) == 2
    with open(results, "a") as f:  # the crash cut the third line short
        f.write('{"id": "abc", "status": "o')
    rest = FakeRun()
    summary = run_sweep(s, rest)
    assert len(rest.calls) == 12  # 14 possible, 2 finished before the crash
    assert summary["ran"] == 12 and summary["skipped_finished"] == 2 and summary["skipped_impossible"] == 2
    assert summary["failed"] == 0 and len(summary["impossible"]) == 2
    finished = {c.to_json() for c in crashing.calls[:2]}
    assert not finished & {c.to_json() for c in rest.calls}  # nothing finished was recomputed
    lines = results.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # the partial line is gone
    assert len(records) == 14 and len({r["id"] for r in records}) == 14
    assert all(r["status"] == "ok" and r["model"] == "tiny" for r in records)
    for r in records:
        assert r["ppl"] == pytest.approx(fake_ppl(PruneConfig.from_dict(r["config"])))
    again = FakeRun()
    assert run_sweep(s, again)["ran"] == 0 and not again.calls


def test_failed_cells_are_recorded_and_retried(tmp_path):
    s = spec(tmp_path, grid={"method": ["wanda", "stade"], "sparsity": [0.5]})
    summary = run_sweep(s, FakeRun(fail_at=1, fail=PrunekitError))
    assert summary["ran"] == 2 and summary["failed"] == 1
    records = read_results(s["results"])
    assert [r["status"] for r in records] == ["failed", "ok"] and records[0]["error"] == "boom"
    retry = FakeRun()
    assert run_sweep(s, retry)["ran"] == 1 and retry.calls[0].method == "wanda"


def test_corrupt_middle_line_is_refused(tmp_path):
    s = spec(tmp_path, grid={"method": ["wanda"]})
    (tmp_path / "results.jsonl").write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    one_line_error(lambda: run_sweep(s, FakeRun()), "line 2 is not JSON")


# ---------------------------------------------------------------- reports

def parse_tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """{### title: [{column header: cell} per row]} for every table under a ### heading."""
    tables, title, header = {}, None, None
    for line in markdown.splitlines():
        if line.startswith("### "):
            title, header = line[4:], None
        elif line.startswith("|") and title:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                tables.setdefault(title, []).append(dict(zip(header, cells)))
    return tables


def by_row(rows: list[dict], *keys: str) -> dict[tuple, dict]:
    return {tuple(row[k] for k in keys): row for row in rows}


def rich_run(config):
    """Two eval corpora, a dense baseline, zero-shot accuracies and per-block errors."""
    ppl = fake_ppl(config)
    acc = {"boolq": 0.7 - config.sparsity / 4, "piqa": 0.75 - config.sparsity / 5}
    acc["mean"] = sum(acc.values()) / 2
    return {**FakeRun()(config), "ppl": {"wikitext2": ppl, "c4": ppl * 1.5},
            "ppl_dense": {"wikitext2": 9.5, "c4": 14.25}, "zeroshot": acc,
            "block_error": [{"block": i, "rel_mse": 0.01 * (i + 1) * config.sparsity} for i in range(4)]}


def column_name(config) -> str:
    """50%, 60% unstructured; 2:4 at its own 0.5; '2:4 @ 60%' when a non-uniform allocation averages 0.6."""
    percent = f"{config['sparsity'] * 100:g}%"
    if config["pattern"] == "unstructured":
        return percent
    return config["pattern"] if config["sparsity"] == 0.5 else f"{config['pattern']} @ {percent}"


def test_report_tables_match_the_results(tmp_path):
    s = spec(tmp_path, eval=["wikitext2", "c4"])
    run_sweep(s, rich_run)
    path = write_report(s["results"], str(tmp_path / "report"))
    out = tmp_path / "report"
    assert path == str(out / "report.md")
    for png in ("ppl_vs_sparsity.png", "allocation.png", "block_error.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
        assert f"]({png})" in (out / "report.md").read_text()
    tables = parse_tables((out / "report.md").read_text())
    records = read_results(s["results"])
    zeroshot = by_row(tables["Zero-shot (accuracy, %)"], "method", "sparsity")
    assert len(zeroshot) == len(records) == 14
    for corpus in ("wikitext2", "c4"):
        table = by_row(tables[f"Perplexity: {corpus}"], "method")
        assert len(table) == 5  # dense, wanda, wanda + alpha, magnitude, magnitude + alpha
        for r in records:
            c = r["config"]
            label = c["method"] + ("" if c["allocation"] == "uniform" else f" + {c['allocation']}")
            assert table[label,][column_name(c)] == f"{r['ppl'][corpus]:.2f}"
            accs = zeroshot[label, column_name(c)]
            assert [accs[t] for t in ("boolq", "piqa", "mean")] == [f"{r['zeroshot'][t] * 100:.2f}"
                                                                    for t in ("boolq", "piqa", "mean")]
        dense = table["dense",]
        assert set(dense.values()) == {"dense", f"{r['ppl_dense'][corpus]:.2f}"}
        assert table["wanda",]["2:4 @ 60%"] == "—"  # the impossible cell stays empty
    assert not list(tmp_path.glob(".report.tmp-*"))


def test_report_with_plain_float_ppl_and_replacing(tmp_path):
    s = spec(tmp_path, grid={"method": ["wanda", "magnitude"], "sparsity": [0.5, 0.7]})
    run_sweep(s, FakeRun())
    out = tmp_path / "report"
    write_report(s["results"], str(out))
    md = (out / "report.md").read_text()
    table = by_row(parse_tables(md)["Perplexity: wikitext2"], "method")  # a float ppl: named by its eval
    assert float(table["magnitude",]["70%"]) == pytest.approx(fake_ppl(PruneConfig(method="magnitude", sparsity=0.7)),
                                                             abs=0.0051)
    assert (out / "allocation.png").exists() and not (out / "block_error.png").exists()
    assert "Zero-shot" not in md and "block_error" not in md
    write_report(s["results"], str(out))  # an earlier report is replaced
    (out / "notes.txt").write_text("mine")
    one_line_error(lambda: write_report(s["results"], str(out)), "not a report", "notes.txt")
    assert (out / "notes.txt").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(lambda: write_report(str(empty), str(tmp_path / "r2")), "no finished cells")


def test_report_lists_failed_cells(tmp_path):
    s = spec(tmp_path, grid={"method": ["wanda", "stade"]})
    run_sweep(s, FakeRun(fail_at=2, fail=PrunekitError))
    md = open(write_report(s["results"], str(tmp_path / "r"))).read()
    assert "### Failed cells" in md and "method=stade" in md and "boom" in md
    assert re.search(r"1 finished cells .*1 failed", md)
