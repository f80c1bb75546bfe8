"""Writing comparison results: ``results.md``, ``results.csv`` and ``figure.png``.

Rows are :func:`gadget.evaluation.compare.compare_methods` dicts (pooled, each with its
``by_source`` rows): ``results.md`` has a table per source and the pooled ``all`` table (a single
table for one source), ``results.csv`` one line per source and method with a ``source`` column.
The figure uses matplotlib's object API (``matplotlib.figure.Figure``), so no pyplot state or
backend is touched.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

CSV_FIELDS = ("source", "method", "ssim", "psnr", "nmse", "seconds_per_slice", "target", "volumes", "slices",
              "status", "note")
_HEADER = ["| method | SSIM | PSNR (dB) | NMSE | s/slice | target | status |",
           "|---|---:|---:|---:|---:|---|---|"]


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _shown(files: Sequence[str], limit: int = 8) -> str:
    return ", ".join(files[:limit]) + (f" (+{len(files) - limit} more)" if len(files) > limit else "")


def _table(rows: Sequence[dict]) -> list[str]:
    lines = list(_HEADER)
    for r in rows:
        status = r["status"] if not r["note"] else f"{r['status']}: {r['note']}"
        lines.append(f"| {r['method']} | {_fmt(r['ssim'], '.4f')} | {_fmt(r['psnr'], '.2f')} | "
                     f"{_fmt(r['nmse'], '.4g')} | {_fmt(r['seconds_per_slice'], '.3g')} | {r['target'] or '—'} | "
                     f"{status.replace('|', '/')} |")
    return lines


def per_source_rows(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """``{source: [row per method]}`` from pooled rows' ``by_source``, then ``"all"`` (the pooled rows).
    Rows without ``by_source`` are returned as ``{"all": rows}``."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        for part in r.get("by_source", ()):
            out.setdefault(part["source"], []).append(part)
    out["all"] = list(rows)
    return out


def results_markdown(rows: Sequence[dict], files: Sequence[str] = (), mask_note: str = "",
                     sources: Optional[Mapping[str, Sequence[str]]] = None) -> str:
    """A markdown report: what was compared, then a table per source and the pooled table (one
    table when there is one source); one row per method (skips and failures say why)."""
    sources = dict(sources or ({"all": list(files)} if files else {}))
    tables = per_source_rows(rows)
    targets = sorted({t for r in rows for t in r["target"].split(", ") if t})
    lines = ["# Reconstruction comparison", ""]
    if len(sources) == 1:
        (name, names), = sources.items()
        lines.append((f"- source: {name}; " if name != "all" else "- ") + f"files ({len(names)}): {_shown(names)}")
    elif sources:
        lines.append(f"- sources ({len(sources)}): "
                     + "; ".join(f"{n} ({len(fs)} file{'s' * (len(fs) != 1)}: {_shown(fs, 4)})"
                                 for n, fs in sources.items()))
    if mask_note:
        lines.append(f"- undersampling: {mask_note}")
    lines += [f"- scored against: {', '.join(targets) or 'n/a'} (fastMRI evaluate semantics: crop to the "
              "target width, data range = target volume max, mean over volumes)", ""]
    if len(tables) <= 2:  # one source: its table is the pooled one
        return "\n".join(lines + _table(rows)) + "\n"
    for name, part in tables.items():
        count = (len(sources[name]) if name in sources else
                 sum(map(len, sources.values())) if name == "all" and sources else max(r["volumes"] for r in part))
        what = "pooled: the mean over every volume of every source" if name == "all" else "per source"
        lines += [f"## {name} ({count} file{'s' * (count != 1)}; {what})", ""] + _table(part) + [""]
    return "\n".join(lines)


def write_csv(path: str | Path, rows: Sequence[dict]) -> None:
    """One line per source and method (each source's rows, then ``all``: the pooled rows)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for part in per_source_rows(rows).values():
            for r in part:
                writer.writerow({k: r.get(k, "all") if k == "source" else r[k] for k in CSV_FIELDS})


def write_figure(path: str | Path, figure: dict, rows: Sequence[dict]) -> None:
    """Top row: truth and each method (same grey scale); bottom row: |method − truth| (common scale)."""
    from matplotlib.figure import Figure

    truth = figure["truth"]
    images = figure["images"]
    names = list(images)
    ncols = 1 + len(names)
    vmax = float(truth.max()) or 1.0
    errors = {n: np.abs(images[n] - truth) for n in names}
    emax = max([float(np.percentile(e, 99.5)) for e in errors.values()] + [1e-12 * vmax])
    psnr = {r["method"]: r.get("per_volume", [{}])[0].get("psnr") if r.get("per_volume") else None for r in rows}
    fig = Figure(figsize=(2.6 * ncols, 5.6), layout="constrained")
    axes = fig.subplots(2, ncols, squeeze=False)
    axes[0, 0].imshow(truth, cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title(f"truth ({figure['target_key']})", fontsize=9)
    axes[1, 0].axis("off")
    axes[1, 0].text(0.5, 0.5, f"{figure['file']}\nslice {figure['slice']}\n|error| scale 0–{emax:.3g}",
                    ha="center", va="center", fontsize=8, transform=axes[1, 0].transAxes)
    for j, name in enumerate(names, start=1):
        axes[0, j].imshow(images[name], cmap="gray", vmin=0, vmax=vmax)
        title = name if psnr.get(name) is None else f"{name}\nPSNR {psnr[name]:.2f} dB (vol.)"
        axes[0, j].set_title(title, fontsize=9)
        axes[1, j].imshow(errors[name], cmap="magma", vmin=0, vmax=emax)
        axes[1, j].set_title(f"|{name} − truth|", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=110)


def write_report(out_dir: str | Path, rows: Sequence[dict], figure: Optional[dict],
                 files: Sequence[str] = (), mask_note: str = "",
                 sources: Optional[Mapping[str, Sequence[str]]] = None) -> dict[str, Path]:
    """Write the three outputs into ``out_dir`` (created); returns their paths. Without any
    reconstructed image (every method skipped) no figure is written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "csv": out / "results.csv"}
    paths["markdown"].write_text(results_markdown(rows, files, mask_note, sources))
    write_csv(paths["csv"], rows)
    figure_path = out / "figure.png"
    if figure is not None:
        write_figure(figure_path, figure, rows)
        paths["figure"] = figure_path
    elif figure_path.exists():
        figure_path.unlink()  # a figure from an earlier run would not match these results
    return paths
