"""`prunekit report`: a sweep's JSONL turned into the tables and plots of a pruning paper.

Tables: rows are method [+ allocation] (plus any other config key that varies), columns are target
sparsity / N:M pattern, cells are perplexity, one table per eval corpus, with a dense row when the
records carry ppl_dense; a zero-shot table when they carry zeroshot. Plots: perplexity vs sparsity,
per-block allocated sparsity, and per-block reconstruction error when the records carry block_error.
The folder is written aside and renamed into place, so a crash never leaves half a report.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

from .config import parse_pattern
from .errors import PrunekitError
from .sweep import read_results

FILES = ("report.md", "ppl_vs_sparsity.png", "allocation.png", "block_error.png")
LABEL_FIXED = {"method", "allocation", "sparsity", "pattern", "extra"}  # in the label anyway, or a column


def load_records(path: str) -> tuple[list[dict], list[dict]]:
    """(finished records, failed records); a cell run again (a retried failure) counts by its last line."""
    latest = {}
    for i, record in enumerate(read_results(path)):
        latest[record.get("id", i)] = record
    ok = [r for r in latest.values() if r.get("status", "ok") == "ok" and isinstance(r.get("config"), dict)]
    return ok, [r for r in latest.values() if r.get("status") == "failed"]


def perplexities(record: dict, key: str = "ppl") -> dict[str, float]:
    """{corpus: ppl} whether the record holds one float (named by its eval) or a dict per corpus."""
    value = record.get(key)
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    corpus = record.get("eval")
    if isinstance(corpus, list) and len(corpus) == 1:
        corpus = corpus[0]
    return {corpus if isinstance(corpus, str) else "ppl": value}


def column(record: dict) -> tuple:
    """Sort key and identity of a table column: unstructured by sparsity first, then N:M patterns."""
    config = record["config"]
    nm = parse_pattern(config["pattern"])
    return (nm is not None, nm[1] if nm else 0, nm[0] if nm else 0, round(config["sparsity"], 6), config["pattern"])


def column_label(col: tuple) -> str:
    *_, sparsity, pattern = col
    if pattern == "unstructured":
        return f"{sparsity * 100:g}%"
    n, m = parse_pattern(pattern)
    return pattern if abs(sparsity - n / m) < 1e-6 else f"{pattern} @ {sparsity * 100:g}%"


def row_labels(records: list[dict]) -> list[str]:
    """'wanda', 'wanda + alpha', and 'key=value' for any other config key (or model, calib) that
    varies across the records, so two different runs never hide in one cell."""
    def value(r, k):
        return r["config"][k] if k in r["config"] else r.get(k)
    keys = sorted({k for r in records for k in r["config"]} - LABEL_FIXED) + ["model", "calib"]
    varying = [k for k in keys if len({json.dumps(value(r, k), sort_keys=True) for r in records}) > 1]
    labels = []
    for r in records:
        c = r["config"]
        label = c["method"] + ("" if c["allocation"] == "uniform" else f" + {c['allocation']}")
        extras = [f"{k}={value(r, k)}" for k in varying]
        labels.append(label + (f" ({', '.join(extras)})" if extras else ""))
    return labels


def _number(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"  # inf and nan print as such


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"] + \
           ["| " + " | ".join(row) + " |" for row in rows]


def ppl_tables(records: list[dict], labels: list[str]) -> list[str]:
    columns = sorted({column(r) for r in records})
    corpora = list(dict.fromkeys(c for r in records for c in perplexities(r)))
    lines = []
    for corpus in corpora:
        cells = {}
        for r, label in zip(records, labels):
            if corpus in perplexities(r):
                cells[label, column(r)] = perplexities(r)[corpus]
        rows = []
        dense = next((perplexities(r, "ppl_dense")[corpus] for r in records
                      if corpus in perplexities(r, "ppl_dense")), None)
        if dense is not None:
            rows.append(["dense"] + [_number(dense)] * len(columns))
        for label in dict.fromkeys(labels):
            rows.append([label] + [_number(cells.get((label, col))) for col in columns])
        header = ["method"] + [column_label(c) for c in columns]
        lines += [f"### Perplexity: {corpus}", ""] + _table(header, rows) + [""]
    return lines


def _scores(accs: dict) -> dict:
    """Task -> accuracy, and the mean; other entries (lm-eval's per-task details) are left out."""
    return {t: v for t, v in accs.items() if isinstance(v, (int, float))}


def zeroshot_table(records: list[dict], labels: list[str]) -> list[str]:
    scored = [(r, label) for r, label in zip(records, labels) if isinstance(r.get("zeroshot"), dict)]
    if not scored:
        return []
    tasks = list(dict.fromkeys(t for r, _ in scored for t in _scores(r["zeroshot"]) if t != "mean")) + ["mean"]
    percent = all(v <= 1 for r, _ in scored for v in _scores(r["zeroshot"]).values())
    scale = 100 if percent else 1

    def cells(accs):
        accs = _scores(accs)
        return [_number(accs[t] * scale if accs.get(t) is not None else None) for t in tasks]
    rows = []
    dense = next((r for r, _ in scored if isinstance(r.get("zeroshot_dense"), dict)), None)
    if dense is not None:  # the dense model's accuracy, once, as the papers' first row
        rows.append(["dense", "0"] + cells(dense["zeroshot_dense"]))
    for r, label in sorted(scored, key=lambda x: column(x[0])):
        rows.append([label, column_label(column(r))] + cells(r["zeroshot"]))
    unit = "accuracy, %" if percent else "accuracy"
    return [f"### Zero-shot ({unit})", ""] + _table(["method", "sparsity"] + tasks, rows) + [""]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PrunekitError("report plots need matplotlib: pip install 'prunekit[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(plt, n: int, width: float = 5.0, height: float = 3.6):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _colors(labels: list[str]) -> dict[str, str]:
    """One colour per method row, the same in every panel and plot."""
    return {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(labels))}


def plot_ppl(plt, records: list[dict], labels: list[str], path: str) -> None:
    """Perplexity against target sparsity per method, log scale: unstructured as lines, each N:M
    pattern as its own marker series, the dense model as a dashed line."""
    corpora = list(dict.fromkeys(c for r in records for c in perplexities(r)))
    colors = _colors(labels)
    fig, axes = _grid(plt, len(corpora))
    for ax, corpus in zip(axes, corpora):
        series = {}
        for r, label in zip(records, labels):
            if isinstance(perplexities(r).get(corpus), (int, float)) and math.isfinite(perplexities(r)[corpus]):
                key = label, r["config"]["pattern"]
                series.setdefault(key, []).append((r["config"]["sparsity"], perplexities(r)[corpus]))
        for (label, pattern), points in series.items():
            style = dict(marker="o", label=label) if pattern == "unstructured" else \
                dict(marker="s", ls=":", label=f"{label} {pattern}")
            ax.plot(*zip(*sorted(points)), ms=4, color=colors[label], **style)
        dense = next((perplexities(r, "ppl_dense")[corpus] for r in records
                      if corpus in perplexities(r, "ppl_dense")), None)
        if dense is not None:
            ax.axhline(dense, color="black", ls="--", lw=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("target sparsity")
        ax.set_ylabel("perplexity")
        ax.set_title(corpus)
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_per_block(plt, records: list[dict], labels: list[str], key: str, value: str, ylabel: str,
                   path: str, log: bool = False) -> None:
    """One panel per sparsity/pattern column, one line per method: record[key] = [{block, value}]."""
    with_data = [(r, label) for r, label in zip(records, labels) if r.get(key)]
    columns = sorted({column(r) for r, _ in with_data})
    colors = _colors(labels)
    fig, axes = _grid(plt, len(columns))
    for ax, col in zip(axes, columns):
        for r, label in with_data:
            if column(r) == col:
                points = sorted((b["block"], b[value]) for b in r[key])
                ax.plot(*zip(*points), marker="o", ms=3, label=label, color=colors[label])
        if key == "allocation":
            ax.axhline(col[-2], color="black", ls="--", lw=1, label="target")
        if log:
            ax.set_yscale("log")
        ax.set_title(column_label(col))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("block")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_out(out_dir: str) -> None:
    """Replace only an empty folder or an earlier report: never delete a folder holding other files."""
    if os.path.exists(out_dir):
        other = sorted(set(os.listdir(out_dir)) - set(FILES)) if os.path.isdir(out_dir) else [out_dir]
        if other:
            raise PrunekitError(f"{out_dir} holds files that are not a report ({', '.join(other[:3])}): "
                                f"pass a new or empty --out folder")


def write_report(results_jsonl: str, out_dir: str) -> str:
    """Write report.md and its PNGs into out_dir (created, or replacing an earlier report); return
    the path of report.md."""
    records, failed = load_records(results_jsonl)
    if not records:
        raise PrunekitError(f"{results_jsonl} holds no finished cells to report")
    _check_out(out_dir)
    plt = _pyplot()
    labels = row_labels(records)
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a report is an ordinary folder
        models = ", ".join(dict.fromkeys(str(r.get("model")) for r in records))
        lines = [f"# Pruning report: {models}", "",
                 f"{len(records)} finished cells from `{os.path.basename(results_jsonl)}`"
                 f"{f', {len(failed)} failed' if failed else ''}; "
                 f"calibration: {', '.join(dict.fromkeys(str(r.get('calib')) for r in records))}.", ""]
        lines += ppl_tables(records, labels) + zeroshot_table(records, labels)
        if any(perplexities(r) for r in records):
            plot_ppl(plt, records, labels, os.path.join(tmp, "ppl_vs_sparsity.png"))
            lines += ["### Perplexity vs sparsity", "", "![perplexity vs sparsity](ppl_vs_sparsity.png)", ""]
        if any(r.get("allocation") for r in records):
            plot_per_block(plt, records, labels, "allocation", "sparsity", "allocated sparsity",
                           os.path.join(tmp, "allocation.png"))
            lines += ["### Allocated sparsity per block", "", "![allocation](allocation.png)", ""]
        if any(r.get("block_error") for r in records):
            plot_per_block(plt, records, labels, "block_error", "rel_mse", "relative MSE",
                           os.path.join(tmp, "block_error.png"), log=True)
            lines += ["### Reconstruction error per block", "", "![block error](block_error.png)", ""]
        if failed:
            lines += ["### Failed cells", ""] + _table(
                ["cell", "error"], [[", ".join(f"{k}={v}" for k, v in r.get("params", {}).items()),
                                     str(r.get("error", "")).replace("|", "\\|")] for r in failed]) + [""]
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write("\n".join(lines))
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        _check_out(out_dir)
        if os.path.isdir(out_dir) and os.listdir(out_dir):  # an earlier report: swap it out, then delete it
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_dir, "report.md")
