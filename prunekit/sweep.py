"""Sweeps: one model, a grid of PruneConfigs, one JSONL line per finished cell, resumable after a crash.

A sweep file (YAML or JSON):

    model: smollm2-135m            # required; what run_cell loads
    calib: wikitext2               # optional run options, for the integrator's run_cell
    eval: [wikitext2, c4]          #   (a corpus or a list of corpora)
    eval_seqlen: 2048
    eval_windows: 40
    eval_dense: true
    base: {nsamples: 128, seqlen: 2048}            # PruneConfig keys shared by every cell
    grid:                                          # any PruneConfig key; the cartesian product is run
      method: [wanda, stade]
      allocation: [uniform, alpha]
      pattern: [unstructured, "2:4"]
      sparsity: [0.5, 0.6, 0.7]
    results: results.jsonl         # optional; relative to the sweep file's folder (default results.jsonl)

Combinations PruneConfig refuses (a 2:4 pattern with a uniform allocation at 0.6) are skipped with the
reason; a grid value valid in no combination at all is a typo and stops the sweep before it starts.
Each cell's id hashes its run options and the config keys that differ from PruneConfig's defaults, so
it stays the same when PruneConfig grows a field and changes when anything that matters changes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from typing import Callable

from .config import PruneConfig
from .errors import PrunekitError
from .recipe import check_types, read_mapping

RUN_OPTIONS = ("model", "calib", "eval", "eval_seqlen", "eval_windows", "eval_dense", "tasks", "limit")
SPEC_KEYS = set(RUN_OPTIONS) | {"base", "grid", "results"}


@dataclass
class Cell:
    params: dict                      # this cell's grid values, e.g. {"method": "wanda", "sparsity": 0.6}
    config: PruneConfig | None        # None: an impossible combination
    id: str = ""                      # stable short hash; "" for impossible cells
    reason: str = ""                  # why it is impossible

    @property
    def possible(self) -> bool:
        return self.config is not None


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def cell_id(run: dict, config: PruneConfig) -> str:
    defaults = {f.name: _default(f) for f in dataclasses.fields(PruneConfig)}
    changed = {k: v for k, v in config.to_dict().items() if v != defaults[k]}
    canonical = json.dumps({"run": run, "config": changed}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(canonical.encode()).hexdigest()[:12]


def load_sweep(path: str) -> dict:
    """Read and check a sweep file. A relative results path is taken from the sweep file's folder, so a
    rerun from another directory finds the same results and resumes instead of starting over."""
    spec = read_mapping(path)
    check_spec(spec, path)
    spec["results"] = os.path.join(os.path.dirname(path), spec.get("results") or "results.jsonl")
    return spec


def check_spec(spec: dict, source: str = "sweep") -> None:
    """Refuse what would otherwise fail cell after cell, hours in: unknown keys, an empty grid."""
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    if unknown := sorted(set(spec) - SPEC_KEYS):
        raise PrunekitError(f"{source}: unknown sweep keys {unknown}: known keys are {sorted(SPEC_KEYS)}")
    if not spec.get("model"):
        raise PrunekitError(f"{source}: a sweep needs model: (a folder, hub id or alias)")
    base, grid = spec.get("base") or {}, spec.get("grid") or {}
    if not isinstance(base, dict) or not isinstance(grid, dict) or not grid:
        raise PrunekitError(f"{source}: base must be a mapping and grid a non-empty mapping of key: [values]")
    for part, keys in (("base", base), ("grid", grid)):
        if unknown := sorted(set(keys) - fields):
            raise PrunekitError(f"{source}: unknown {part} keys {unknown}: known keys are {sorted(fields)}")
    if both := sorted(set(base) & set(grid)):
        raise PrunekitError(f"{source}: {both} are in both base and grid: keep each key in one of them")
    for key, values in grid.items():
        if isinstance(values, list) and not values:
            raise PrunekitError(f"{source}: grid {key} has no values")


def expand_grid(spec: dict) -> list[Cell]:
    """Cartesian product of the grid over base, in the grid's order; impossible cells kept as skipped,
    duplicates (sparsity null and 0.5 under 2:4 are one config) dropped."""
    check_spec(spec)
    base, grid = dict(spec.get("base") or {}), spec["grid"]
    axes = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
    run = {k: spec.get(k) for k in RUN_OPTIONS if spec.get(k) is not None}
    from .scoring import build_scorer
    cells, seen, valid_values = [], set(), set()
    for combo in itertools.product(*axes.values()):
        params = dict(zip(axes, combo))
        try:
            config = PruneConfig.from_dict(check_types({**base, **params}, "sweep"))
            build_scorer(config)  # unknown method
        except PrunekitError as exc:
            cells.append(Cell(params, None, reason=str(exc)))
            continue
        valid_values.update((k, json.dumps(v)) for k, v in params.items())
        cid = cell_id(run, config)
        if cid not in seen:
            seen.add(cid)
            cells.append(Cell(params, config, cid))
    for key, values in axes.items():
        for value in values:
            if (key, json.dumps(value)) not in valid_values:
                reason = next(c.reason for c in cells if not c.possible and c.params[key] == value)
                raise PrunekitError(f"grid {key}: {value!r} is valid in no combination: {reason}")
    return cells


def read_results(path: str) -> list[dict]:
    """Records of a results JSONL. A last line without its newline is a crash's partial write: dropped.
    A malformed complete line means the file was edited: refused, naming the line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for number, line in enumerate(lines[:-1], 1):  # lines[-1]: b"" or the partial last line
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PrunekitError(f"{path} line {number} is not JSON ({exc.msg}): fix or delete that line") from None
    return records


def _drop_partial_line(path: str) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)


def _append(path: str, record: dict) -> None:
    """One line, on disk before the next cell starts: a crash loses at most the cell it was running.
    Tensors and numpy values become lists or numbers rather than losing a finished cell to a TypeError."""
    line = json.dumps(record, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_sweep(spec: dict, run_cell: Callable[[PruneConfig], dict], results_path: str | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Run every possible cell not already finished in results_path (default spec["results"]).

    run_cell(config) -> record dict (e.g. prune_model's record); the line written is that record with
    id, status "ok", params and config set (and the spec's model, calib, eval where it has none).
    A PrunekitError from run_cell is written as status "failed" with its message and the sweep goes on;
    a failed cell is retried on the next run (the failure may have been a missing file). Anything else,
    KeyboardInterrupt included, propagates: the lines written so far stay, and the next run resumes.

    Returns counts: cells (possible ones), ran (this time, failures included), failed,
    skipped_finished, skipped_impossible, and impossible: [{params, reason}]."""
    path = results_path or spec.get("results") or "results.jsonl"
    cells = expand_grid(spec)
    possible = [c for c in cells if c.possible]
    run = {k: spec[k] for k in ("model", "calib", "eval") if spec.get(k) is not None}  # unless run_cell says
    done = {r.get("id") for r in read_results(path) if r.get("status") == "ok"}
    if os.path.exists(path):
        _drop_partial_line(path)
    elif os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    summary = {"results": path, "cells": len(possible), "ran": 0, "failed": 0,
               "skipped_finished": sum(c.id in done for c in possible),
               "skipped_impossible": len(cells) - len(possible),
               "impossible": [{"params": c.params, "reason": c.reason} for c in cells if not c.possible]}
    todo = [c for c in possible if c.id not in done]
    for i, cell in enumerate(todo, 1):
        label = ", ".join(f"{k}={v}" for k, v in cell.params.items())
        if log:
            log(f"[{i}/{len(todo)}] {label}")
        head = {"id": cell.id, "params": cell.params, "config": cell.config.to_dict()}
        try:
            record = {**run, **run_cell(cell.config), **head, "status": "ok"}
        except PrunekitError as exc:
            record = {**head, "status": "failed", "error": str(exc)}
            summary["failed"] += 1
            if log:
                log(f"[{i}/{len(todo)}] {label}: failed: {exc}")
        _append(path, record)
        summary["ran"] += 1
    return summary
