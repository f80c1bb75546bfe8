"""Package a trained checkpoint as the shipped weights, with its recipe and evaluation table.

    python bench/ship_weights.py runs/ship-synth-brain-more2/best.pt --evaluation eval4.md eval8.md

Reads the checkpoint (our format), keeps its training description, adds the human-readable data
sentence, the exact recipe and the evaluation tables (``varnet compare`` results.md files), and
writes ``gadget/weights/varnet_synth_brain_v1.pt`` (refusing anything over 20 MB).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from gadget.model.checkpoint import load_checkpoint, save_checkpoint
from gadget.model.shipped import SHIPPED_NAME

LIMIT_BYTES = 20 * 2**20
DATA = ("varnet synth: MNI152 2009 and Colin27 anatomy, axial/coronal/sagittal, 12 training volumes x 8 slices "
        "(stages 1-2), 24 (stage 3), 36 (stage 4), "
        "8 coils, 128x128 images (k-space 256x128 with 2x readout oversampling), SNR 30 dB; random masks "
        "4x (centre fraction 0.08) and 8x (0.04); target: the noise-free image (bench/make_ship_data.sh)")
RECIPE = ["bash bench/make_ship_data.sh   # data (after ln -s <dir> data/ship)",
          "varnet train --config pipelines/train/ship-synth-brain.yaml        # stage 1: RSS output, SSIM loss",
          "varnet train --config pipelines/train/ship-synth-brain-sense.yaml  # stage 2: map-combined output, L1",
          "varnet train --config pipelines/train/ship-synth-brain-more.yaml   # stage 3: twice the volumes",
          "varnet train --config pipelines/train/ship-synth-brain-more2.yaml  # stage 4: three times",
          "python bench/ship_weights.py runs/ship-synth-brain-more2/best.pt --evaluation <results.md> ..."]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--evaluation", type=Path, nargs="+", required=True,
                        help="results.md files written by varnet compare on the held-out volumes")
    parser.add_argument("--out", type=Path, default=Path("gadget/weights") / SHIPPED_NAME)
    args = parser.parse_args()

    loaded = load_checkpoint(args.checkpoint)
    trained = dict(loaded.description)
    stages = [trained]
    while stages[0].get("init_from"):  # the fine-tuning chain, first stage first
        stages.insert(0, load_checkpoint(stages[0]["init_from"]["path"]).description)
    description = {
        **{k: v for k, v in trained.items() if k not in ("train_dirs", "val_dirs", "init_from")},
        "data": DATA,
        "recipe": RECIPE,
        "stages": [{k: s.get(k) for k in ("loss", "epochs", "steps", "optimizer", "val_metrics", "training_time_s")}
                   for s in stages],
        "training_time_s_total": round(sum(float(s.get("training_time_s") or 0) for s in stages), 1),
        "evaluation": "\n\n".join(p.read_text() for p in args.evaluation),
    }
    save_checkpoint(args.out, loaded.model, description)
    size = args.out.stat().st_size
    if size > LIMIT_BYTES:
        args.out.unlink()
        raise SystemExit(f"{args.out}: {size / 2**20:.1f} MB is over the 20 MB limit")
    print(f"wrote {args.out} ({size / 2**20:.1f} MB, {loaded.config})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
