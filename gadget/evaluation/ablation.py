"""``varnet ablate``: the seed paper's model ablation (§4, Tables 1–2, Fig. 3) at an equal budget.

The four variants of :data:`gadget.model.varnet.VARIANTS` — ``vn``, ``vnu``, ``vnu-k`` (fixed
ESPIRiT maps) and ``e2e`` (learned maps) — are trained with one recipe (same data, steps, seed,
optimiser and loss; the model section shared, per-variant changes only in ``ablation.models``),
then scored on a held-out test set with the seed's masks:

* Table 1, equispaced masks ``Me(r, l)``: 4× with 30, 6× with 22, 8× with 16 ACS lines;
* Table 2, random masks ``Mr(a, f)``: 4×/0.08, 6×/0.06, 8×/0.04 centre fractions;
* Fig. 3, SSIM against the number of ACS lines of equispaced masks (4× and 6×, ACS 8–30).

ACS rule (:func:`scaled_acs`): the seed's line counts are for fastMRI knees, 368 phase columns; a
file with ``W`` columns gets ``max(min_acs, round(l · W / 368))`` lines (the same fraction of
k-space; at least ``min_acs`` = 4 so that ESPIRiT has a 2-D calibration block). Random masks give
fractions and scale by themselves (fastMRI's ``round(W · f)``). Masks are fastMRI's
(``EquiSpacedMaskFunc`` with centre fraction ``l_W / W``, ``RandomMaskFunc``), seeded by the file name
so every variant sees the same masks. Scores are fastMRI's (per volume, then the mean over
volumes), against ``data.target`` of the recipe, cropped as ``varnet compare`` does.

The YAML is a training config (sections model, data, optim, loss, run; see
:mod:`gadget.train.config`) plus an ``ablation`` section, :class:`AblationSpec`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import yaml

from ..data.fastmri_file import open_volume
from ..data.typed_config import load_yaml_mapping
from ..mri.masks import make_mask
from ..mri.metrics import center_crop
from ..recon.fastmri_infer import crop_size_for
from ..train.config import TrainConfig, TrainConfigError, build_config, parse_override
from ..train.data import FixedMapsCache, list_files, resolve_target_key, restrict_to_padding
from .scoring import mean_std, score_volume

REFERENCE_WIDTH = 368   # phase columns of the seed's fastMRI knee k-space
MIN_ACS = 4
NAMES = {"vn": "VN", "vnu": "VNU", "vnu-k": "VNU-K", "e2e": "E2E-VN"}   # the seed's row labels
ORDER = ("vn", "vnu", "vnu-k", "e2e")                                 # the seed's row order

Progress = Callable[[str], None]


def scaled_acs(acs: int, width: int, reference: int = REFERENCE_WIDTH, minimum: int = MIN_ACS) -> int:
    """ACS lines for ``width`` phase columns: ``max(minimum, round(acs · width / reference))``."""
    return max(int(minimum), round(acs * width / reference))


@dataclass(frozen=True)
class Setting:
    """One mask setting: ``equispaced`` with ``acs`` lines (at the reference width) or ``random``
    with ``center_fraction``, at ``acceleration``."""

    kind: str
    acceleration: int
    acs: Optional[int] = None
    center_fraction: Optional[float] = None

    @property
    def key(self) -> str:
        detail = f"acs{self.acs}" if self.kind == "equispaced" else f"cf{self.center_fraction:g}"
        return f"{self.kind}-{self.acceleration}x-{detail}"

    @property
    def label(self) -> str:
        detail = f"{self.acs} ACS" if self.kind == "equispaced" else f"{self.center_fraction:g}"
        return f"{self.acceleration}×, {detail}"

    def mask(self, width: int, name: str, reference: int = REFERENCE_WIDTH,
             minimum: int = MIN_ACS) -> tuple[np.ndarray, int]:
        """``(bool (width,), ACS lines)`` for file ``name`` (fastMRI masks seeded by the name)."""
        seed = tuple(map(ord, name))
        if self.kind == "random":
            return make_mask("random", width, self.acceleration, self.center_fraction, seed=seed)
        lines = scaled_acs(self.acs, width, reference, minimum)
        mask, num_low = make_mask("equispaced", width, self.acceleration, lines / width, seed=seed)
        if num_low != lines:
            raise ValueError(f"equispaced mask for {name}: {num_low} ACS lines made, {lines} asked")
        return mask, num_low


@dataclass(frozen=True)
class AblationSpec:
    """The ``ablation`` section of the YAML (defaults: the seed's settings)."""

    test_dirs: list[str]
    variants: list[str] = field(default_factory=lambda: list(ORDER))
    runs_dir: str = "runs/ablation"          # one run per variant (runs_dir/VARIANT) + maps_cache/
    checkpoint: str = "final"                # final (equal steps) | best (best validation SSIM)
    max_slices: Optional[int] = None         # middle N slices of each test file
    reference_width: int = REFERENCE_WIDTH
    min_acs: int = MIN_ACS
    equispaced: list = field(default_factory=lambda: [[4, 30], [6, 22], [8, 16]])
    random: list = field(default_factory=lambda: [[4, 0.08], [6, 0.06], [8, 0.04]])
    sweep_accelerations: list = field(default_factory=lambda: [4, 6])
    sweep_acs: list = field(default_factory=lambda: [8, 12, 16, 24, 30])
    models: dict = field(default_factory=dict)  # per-variant overrides of the model section

    def table1(self) -> list[Setting]:
        return [Setting("equispaced", int(r), acs=int(l)) for r, l in self.equispaced]

    def table2(self) -> list[Setting]:
        return [Setting("random", int(a), center_fraction=float(f)) for a, f in self.random]

    def sweep(self) -> list[Setting]:
        return [Setting("equispaced", int(r), acs=int(l)) for r in self.sweep_accelerations for l in self.sweep_acs]

    def settings(self) -> list[Setting]:
        """Every setting once (the sweep shares its points with Table 1)."""
        seen: dict[str, Setting] = {}
        for s in self.table1() + self.table2() + self.sweep():
            seen.setdefault(s.key, s)
        return list(seen.values())


def parse_spec(values: Optional[Mapping[str, Any]], overrides: Sequence[tuple[str, Any]] = (),
               source: str = "config") -> AblationSpec:
    """An :class:`AblationSpec` from the YAML's ``ablation`` mapping and ``(key, value)`` overrides."""
    from ..model.varnet import VARIANTS

    known = {f.name for f in dataclasses.fields(AblationSpec)}
    merged = dict(values or {})
    merged.update(dict(overrides))
    unknown = sorted(set(merged) - known)
    if unknown:
        raise TrainConfigError(f"{source}: unknown setting(s) ablation.{', ablation.'.join(unknown)} "
                               f"(known: {', '.join(sorted(known))})")
    if not merged.get("test_dirs"):
        raise TrainConfigError(f"{source}: ablation.test_dirs must name held-out test directories")
    if isinstance(merged["test_dirs"], str):
        merged["test_dirs"] = [d.strip() for d in merged["test_dirs"].split(",")]
    if isinstance(merged.get("variants"), str):
        merged["variants"] = [v.strip() for v in merged["variants"].split(",")]
    spec = AblationSpec(**merged)
    bad = [v for v in spec.variants if v not in VARIANTS]
    if bad or not spec.variants:
        raise TrainConfigError(f"{source}: ablation.variants {spec.variants} must be among {', '.join(VARIANTS)}")
    if spec.checkpoint not in ("final", "best"):
        raise TrainConfigError(f"{source}: ablation.checkpoint must be final or best, got {spec.checkpoint!r}")
    if set(spec.models) - set(VARIANTS):
        unknown = sorted(set(spec.models) - set(VARIANTS))
        raise TrainConfigError(f"{source}: ablation.models has unknown variants {unknown}")
    if spec.max_slices is not None and spec.max_slices < 1:
        raise TrainConfigError(f"{source}: ablation.max_slices must be >= 1 or null")
    return spec


def load(path: str | Path, overrides: Sequence[str] = ()) -> tuple[AblationSpec, dict, list[str]]:
    """Read an ablation YAML: ``(spec, training sections, training overrides)``; ``overrides`` are
    ``section.key=value`` strings, ``ablation.*`` ones go to the spec."""
    path = Path(path)
    data = load_yaml_mapping(path, error=TrainConfigError, what="sections")
    ablation_items = [item for item in overrides if item.strip().startswith("ablation.")]
    spec_overrides = []
    for item in ablation_items:
        dotted, raw = item.split("=", 1) if "=" in item else (item, "")
        spec_overrides.append((dotted.strip().split(".", 1)[1], yaml.safe_load(raw) if raw.strip() else None))
    train_overrides = [item for item in overrides if item not in ablation_items]
    for item in train_overrides:
        parse_override(item)  # fail early with the training config's message
    spec = parse_spec(data.get("ablation"), spec_overrides, str(path))
    sections = {k: v for k, v in data.items() if k != "ablation"}
    return spec, sections, train_overrides


def variant_config(spec: AblationSpec, sections: Mapping[str, Any], overrides: Sequence[str],
                   variant: str, source: str = "config") -> TrainConfig:
    """The training config of one variant: the shared recipe, ``ablation.models[variant]``, the
    command-line overrides, then ``model.variant``, ``run.out_dir = runs_dir/variant`` and (unless set)
    ``data.maps_cache = runs_dir/maps_cache`` (shared by the fixed-map variants)."""
    values = {k: dict(v or {}) for k, v in sections.items()}
    values.setdefault("model", {}).update(spec.models.get(variant) or {})
    values["model"]["variant"] = variant
    values.setdefault("run", {})["out_dir"] = str(Path(spec.runs_dir) / variant)
    forced = [f"model.variant={variant}", f"run.out_dir={Path(spec.runs_dir) / variant}"]
    if not values.setdefault("data", {}).get("maps_cache") and not any(o.startswith("data.maps_cache=")
                                                                       for o in overrides):
        values["data"]["maps_cache"] = str(Path(spec.runs_dir) / "maps_cache")
    return build_config(values, [*overrides, *forced], source=source)


# ----------------------------------------------------------------------------- training


def _comparable(config: Mapping) -> dict:
    config = {k: dict(v) for k, v in config.items()}
    config.get("run", {}).pop("resume", None)
    return config


def train_variant(config: TrainConfig, progress: Progress = print) -> dict:
    """Train one variant, resume its unfinished run, or skip it when its ``final.pt`` was written
    with this very config. Returns ``{status, run_dir, steps, seconds}``."""
    from ..train.trainer import Trainer

    run_dir = Path(config.run.out_dir)
    variant = config.model.variant
    saved = run_dir / "config.yaml"
    if (run_dir / "final.pt").exists() and saved.exists():
        if _comparable(yaml.safe_load(saved.read_text())) == _comparable(config.to_dict()):
            progress(f"[ablate] {variant}: {run_dir / 'final.pt'} exists with this config, skipping training")
            return {"status": "skipped", "run_dir": str(run_dir), **_logged_budget(run_dir)}
    status = "trained"
    if (run_dir / "last.pt").exists():
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, resume=str(run_dir / "last.pt")))
        status = "resumed"
    progress(f"[ablate] {variant}: {'resuming' if status == 'resumed' else 'training'} in {run_dir} "
             f"({config.optim.epochs} epochs × ≤ {config.run.max_steps_per_epoch or 'all'} steps)")
    summary = Trainer(config).fit()
    progress(f"[ablate] {variant}: {summary['steps']} steps in {summary['seconds']:.0f} s")
    return {"status": status, "run_dir": str(run_dir), "steps": summary["steps"], "seconds": summary["seconds"]}


def _logged_budget(run_dir: Path) -> dict:
    """Steps and training seconds of a finished run, from its train_log.csv."""
    import csv

    try:
        with open(run_dir / "train_log.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        return {"steps": int(rows[-1]["step"]), "seconds": float(rows[-1]["seconds"])}
    except (OSError, KeyError, IndexError, ValueError):
        return {"steps": None, "seconds": None}


# ----------------------------------------------------------------------------- evaluation


def _test_slices(path: Path, max_slices: Optional[int]) -> list[int]:
    from .compare import select_slices

    with open_volume(path) as vol:
        return select_slices(vol.num_slices, max_slices)


@torch.no_grad()
def evaluate_variant(model, settings: Sequence[Setting], files: Sequence[Path], maps: FixedMapsCache,
                     target: str = "auto", max_slices: Optional[int] = None, reference: int = REFERENCE_WIDTH,
                     minimum: int = MIN_ACS, device: torch.device = torch.device("cpu"),
                     progress: Progress = print) -> dict:
    """Score ``model`` on every setting: ``{"scores": {key: {ssim, psnr, nmse, volumes, slices,
    failed}}, "seconds_per_slice": model forward time per slice}``. Fixed-map models get ``maps``
    (ESPIRiT of the mask's ACS lines, cached). A setting where the maps or the model fail on a file
    (e.g. ESPIRiT finds no signal in a tiny ACS block) scores NaN and lists the failures."""
    model.eval()
    per_volume: dict[str, list[dict]] = {s.key: [] for s in settings}
    failed: dict[str, list[str]] = {s.key: [] for s in settings}
    slices_by_setting = dict.fromkeys(per_volume, 0)
    timing = [0.0, 0]   # forward seconds, slices
    for n, path in enumerate(files):
        slices = _test_slices(path, max_slices)
        with open_volume(path) as vol:
            key = resolve_target_key(list(vol.handle.keys()), target)
            if key is None:
                raise TrainConfigError(f"{path}: no target dataset for data.target={target!r}")
            kspace = np.asarray(vol.kspace[slices[0]:slices[-1] + 1], dtype=np.complex64)
            truth = np.asarray(vol.handle[key][slices[0]:slices[-1] + 1], dtype=np.float32)
            padding, recon_size = vol.encoding.padding, vol.encoding.recon_size
        progress(f"[ablate]   {path.name} ({n + 1}/{len(files)}): {len(settings)} settings × {len(slices)} slices")
        for setting in settings:
            mask, num_low = setting.mask(kspace.shape[-1], path.name, reference, minimum)
            mask = restrict_to_padding(mask, padding)
            try:
                images = _reconstruct(model, path, slices, kspace, mask, num_low, padding, recon_size, maps,
                                      device, timing)
            except ValueError as exc:
                failed[setting.key].append(f"{path.name}: {exc}")
                progress(f"[ablate]   {setting.label} failed on {path.name}: {exc}")
                continue
            per_volume[setting.key].append(score_volume(truth, images))
            slices_by_setting[setting.key] += len(slices)
    scores = {}
    for s in settings:
        vols = per_volume[s.key]
        scores[s.key] = {**{m: mean_std(v[m] for v in vols)[0] if not failed[s.key] else float("nan")
                            for m in ("ssim", "psnr", "nmse")},
                         "volumes": len(vols), "slices": slices_by_setting[s.key], "failed": failed[s.key]}
    return {"scores": scores, "seconds_per_slice": timing[0] / max(timing[1], 1)}


def _reconstruct(model, path: Path, slices: Sequence[int], kspace: np.ndarray, mask: np.ndarray, num_low: int,
                 padding, recon_size, maps: FixedMapsCache, device: torch.device, timing: list) -> np.ndarray:
    """One volume under one mask → cropped images float32 ``(slice, H, W)``; adds the forward
    time and slice count to ``timing``."""
    mask_t = torch.from_numpy(mask).to(device)
    images = []
    for i, slice_num in enumerate(slices):
        masked = torch.from_numpy(kspace[i] * mask)
        kwargs = {}
        if getattr(model, "needs_maps", False):
            kwargs["sens_maps"] = maps.get(path, slice_num, num_low, masked, padding)[None].to(device)
        start = time.perf_counter()
        out = model(masked[None].to(device), mask_t, num_low, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: time them, not their launch
        timing[0] += time.perf_counter() - start
        timing[1] += 1
        image = out[0].float().cpu().numpy()
        images.append(center_crop(image, crop_size_for(image.shape, recon_size)))
    return np.stack(images)


def _checkpoint_path(run_dir: Path, which: str) -> Path:
    path = run_dir / f"{which}.pt"
    if not path.exists() and which == "best":
        path = run_dir / "final.pt"  # no validation set: no best.pt
    if not path.exists():
        raise TrainConfigError(f"{path}: no checkpoint to evaluate (training did not finish?)")
    return path


def run_ablation(config_path: str | Path, out_dir: str | Path, overrides: Sequence[str] = (),
                 variants: Optional[Sequence[str]] = None, progress: Progress = print) -> dict:
    """Train (or resume, or skip) every variant, evaluate them, write the report; returns the
    result dict that ``ablation.json`` holds."""
    from ..model.checkpoint import load_checkpoint
    from ..model.varnet import count_parameters
    from ..recon.engine import resolve_device
    from .ablation_report import write_report

    spec, sections, train_overrides = load(config_path, overrides)
    if variants:
        spec = parse_spec({**dataclasses.asdict(spec), "variants": list(variants)}, source="--variants")
    variants = sorted(spec.variants, key=ORDER.index)
    configs = {v: variant_config(spec, sections, train_overrides, v, str(config_path)) for v in variants}
    files = list_files(spec.test_dirs)
    settings = spec.settings()
    progress(f"[ablate] variants {', '.join(variants)}; test set {len(files)} files in "
             f"{', '.join(spec.test_dirs)}; {len(settings)} mask settings")
    training = {v: train_variant(configs[v], progress) for v in variants}

    any_config = configs[variants[0]]
    maps = FixedMapsCache(any_config.data.maps_cache, any_config.data.maps_cache_mb)
    device = resolve_device(any_config.run.device)
    results: dict[str, Any] = {}
    for v in variants:
        path = _checkpoint_path(Path(configs[v].run.out_dir), spec.checkpoint)
        model = load_checkpoint(path).model.to(device)
        progress(f"[ablate] evaluating {v} ({path})")
        evaluated = evaluate_variant(model, settings, files, maps, configs[v].data.target, spec.max_slices,
                                     spec.reference_width, spec.min_acs, device, progress)
        results[v] = {"name": NAMES[v], "checkpoint": str(path), "parameters": count_parameters(model),
                      "fixed_maps": bool(model.needs_maps), "training": training[v], **evaluated}
    result = {
        "variants": variants, "results": results, "test_dirs": list(spec.test_dirs),
        "test_files": [p.name for p in files], "target": any_config.data.target,
        "settings": {s.key: dataclasses.asdict(s) | {"label": s.label} for s in settings},
        "table1": [s.key for s in spec.table1()], "table2": [s.key for s in spec.table2()],
        "sweep": {str(r): [Setting("equispaced", int(r), acs=int(l)).key for l in spec.sweep_acs]
                  for r in spec.sweep_accelerations},
        "acs_rule": f"max({spec.min_acs}, round(l * W / {spec.reference_width})) lines for W phase columns",
        "espirit": {**maps.stats(), "seconds_per_slice": maps.compute_seconds / maps.computed if maps.computed
                    else None},
        "recipe": {k: v for k, v in configs[variants[0]].to_dict().items() if k != "model"},
        "models": {v: configs[v].model.to_dict() for v in variants},
    }
    written = write_report(out_dir, result)
    progress(f"[ablate] written: {', '.join(str(p) for p in written)}")
    return result


__all__ = ["AblationSpec", "Setting", "scaled_acs", "parse_spec", "load", "variant_config", "train_variant",
           "evaluate_variant", "run_ablation", "REFERENCE_WIDTH", "MIN_ACS", "NAMES", "ORDER"]
