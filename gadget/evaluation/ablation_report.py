"""Files of ``varnet ablate`` (:mod:`gadget.evaluation.ablation`), in the seed paper's layout.

* ``ablation.md`` — Table 1 (equispaced masks) and Table 2 (random masks): one row per variant (the
  seed's order VN, VNU, VNU-K, E2E-VN), one column per mask setting, SSIM (best per column in
  bold); then a table of parameter counts, training budget and seconds per slice;
* ``ablation.json`` — everything: SSIM, PSNR, NMSE per variant and setting, the sweep, the recipe;
* ``fig3_acs.png`` — Fig. 3: SSIM against the number of ACS lines (equispaced masks, counted at
  the seed's 368 columns), one panel per acceleration, one line per variant.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

MARKDOWN, JSON, FIGURE = "ablation.md", "ablation.json", "fig3_acs.png"


def _ssim(result: dict, variant: str, key: str) -> float:
    return result["results"][variant]["scores"][key]["ssim"]


def ssim_table(result: dict, keys: Sequence[str]) -> list[str]:
    """Markdown rows: ``| model | setting… |``, SSIM with three decimals, best per column bold."""
    settings = result["settings"]
    lines = ["| model | " + " | ".join(settings[k]["label"] for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    best = {k: max((x for v in result["variants"] if not math.isnan(x := _ssim(result, v, k))), default=math.nan)
            for k in keys}
    for v in result["variants"]:
        cells = []
        for k in keys:
            value = _ssim(result, v, k)
            text = "n/a" if math.isnan(value) else f"{value:.3f}"
            cells.append(f"**{text}**" if value == best[k] and len(result["variants"]) > 1 else text)
        lines.append(f"| {result['results'][v]['name']} | " + " | ".join(cells) + " |")
    return lines


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    """The whole ``ablation.md``."""
    recipe = result["recipe"]
    espirit = result["espirit"].get("seconds_per_slice")
    out = ["# Model ablation (seed §4: Tables 1–2, Fig. 3)", "",
           f"Test set: {len(result['test_files'])} files in {', '.join(result['test_dirs'])}; target "
           f"`{result['target']}`; SSIM per volume, mean over volumes (fastMRI). Masks seeded by file name, "
           f"the same for every model. Equispaced ACS lines: {result['acs_rule']} (the seed's counts are for "
           f"368 columns). Training recipe shared by all models: {recipe['optim']['epochs']} epochs × ≤ "
           f"{recipe['run']['max_steps_per_epoch'] or 'all'} steps, Adam lr {recipe['optim']['lr']:g}, "
           f"{recipe['loss']['kind']} loss, seed {recipe['run']['seed']}, masks {recipe['data']['mask']} "
           f"{recipe['data']['accelerations']} / {recipe['data']['center_fractions']}.", "",
           "## Table 1: equispaced masks (SSIM)", "", *ssim_table(result, result["table1"]), "",
           "## Table 2: random masks (SSIM)", "", *ssim_table(result, result["table2"]), "",
           "## Models", "",
           "| model | sensitivities | parameters | training steps | training time (s) | s/slice (model) "
           "| s/slice (with ESPIRiT) |", "|---|---|---|---|---|---|---|"]
    for v in result["variants"]:
        r = result["results"][v]
        fixed = r["fixed_maps"]
        with_maps = r["seconds_per_slice"] + espirit if fixed and espirit is not None else r["seconds_per_slice"]
        out.append(f"| {r['name']} | {'fixed (ESPIRiT)' if fixed else 'learned'} | {r['parameters']:,} | "
                   f"{_num(r['training'].get('steps'), 'd')} | {_num(r['training'].get('seconds'), '.1f')} | "
                   f"{r['seconds_per_slice']:.3f} | {with_maps:.3f} |")
    failures = [f"{result['results'][v]['name']}, {result['settings'][k]['label']}: {'; '.join(sc['failed'])}"
                for v in result["variants"] for k, sc in result["results"][v]["scores"].items() if sc.get("failed")]
    if failures:
        out += ["", "Failed (n/a above; a partial mean would mislead):", *(f"* {f}" for f in failures)]
    out += ["", f"Fig. 3 (`{FIGURE}`): SSIM against the number of ACS lines, equispaced masks at "
            + ", ".join(f"{r}×" for r in result["sweep"]) + ".", ""]
    return "\n".join(out)


def figure(result: dict, path: Path) -> None:
    """Fig. 3: one panel per sweep acceleration, SSIM against ACS lines, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(result["sweep"].items())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (accel, keys) in zip(axes[0], panels):
        acs = [result["settings"][k]["acs"] for k in keys]
        for v in result["variants"]:
            ax.plot(acs, [_ssim(result, v, k) for k in keys], marker="o", label=result["results"][v]["name"])
        ax.set_title(f"equispaced, {accel}×")
        ax.set_xlabel("ACS lines (at 368 columns)")
        ax.set_ylabel("SSIM")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: str | Path, result: dict) -> list[Path]:
    """Write ``ablation.md``, ``ablation.json`` and ``fig3_acs.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKDOWN).write_text(markdown(result))
    (out_dir / JSON).write_text(json.dumps(result, indent=1, default=str, allow_nan=True))
    figure(result, out_dir / FIGURE)
    return [out_dir / MARKDOWN, out_dir / JSON, out_dir / FIGURE]


__all__ = ["write_report", "markdown", "ssim_table", "figure", "MARKDOWN", "JSON", "FIGURE"]
