"""Package a trained checkpoint as the shipped weights, with its recipe and evaluation table.

    python experiments/shipping/scripts/ship_weights.py runs/head-rss-v3b/best.pt \
        --evaluation results/generalisation_v3/matrix.md

Reads the checkpoint (our format), keeps its training description, adds the human-readable data
sentence, the exact recipe and the evaluation tables (``varnet compare`` results.md or the
generalisation matrix), and writes ``gadget/weights/<SHIPPED_NAME>`` (refusing anything over 20 MB).
Earlier stages (``init_from``) are followed while their files exist; a stage that was itself shipped
brings its own recorded stages.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from gadget.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gadget.model.shipped import SHIPPED_NAME
from gadget.train.trainer import read_training_state, training_state_description

LIMIT_BYTES = 20 * 2**20
DATA = ("varnet synth --head: domain-randomised whole heads from MNI152 (derived scalp, fat, skull) and Colin27 "
        "(real head), 560 volumes x 4 slices: 160 with matrices 96-224, 8-16 coils, SNR 15-40 dB "
        "(experiments/shipping/scripts/make_head_data.sh), 300 with matrices 96-320, 8-24 coils, SNR 15-70 dB "
        "and 100 of those skull-stripped (the brain alone in the head's field of view; "
        "experiments/shipping/scripts/make_head_data_v3.sh); "
        "T1w/T2w/PDw/FLAIR-like or random contrasts, deformations, bias, texture; "
        "phase FOV 0.8-1.15 x the head (folding), odd/even matrices with and without 2x readout oversampling; "
        "head-hugging loops; random and equispaced-fraction masks at 4x/8x (fastMRI centre fractions) and 2x/3x; "
        "target: RSS of the noisy, fully sampled k-space. INIA19 held out. Initialised from varnet_head_v2 "
        "(160 volumes, SNR 15-40 dB), itself from varnet_synth_brain_v1 (their stages below).")
RECIPE = ["bash experiments/shipping/scripts/make_head_data.sh "
          "&& bash experiments/shipping/scripts/make_head_data_v3.sh   # data",
          "varnet train --config experiments/shipping/configs/head-rss-v3.yaml          # from varnet_head_v2, stopped at step 2800",
          "varnet train --config experiments/shipping/configs/head-rss-v3b.yaml         # + skull-stripped volumes, 1 epoch",
          "python experiments/generalisation/scripts/make_ood_data.py data/ood   # held-out brain and phantom test sets",
          "python experiments/generalisation/scripts/generalisation_matrix.py "
          "experiments/generalisation/configs/generalisation_matrix.v3.yaml --out results/generalisation_v3",
          "python experiments/shipping/scripts/ship_weights.py runs/head-rss-v3b/best.pt "
          "--evaluation results/generalisation_v3/matrix.md"]


def stage_record(path: str) -> dict:
    """The training record of an earlier stage: a checkpoint's description, or that of a run's
    resume state (``last.pt``) when the next stage started from a run stopped part-way."""
    try:
        return load_checkpoint(path).description
    except CheckpointError:
        return training_state_description(read_training_state(path, "init_from"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--evaluation", type=Path, nargs="+", required=True,
                        help="results.md files written by varnet compare on the held-out volumes")
    parser.add_argument("--refine", choices=("pi", "none"), default="pi",
                        help="the refine the evaluation was run with (default pi, generalisation_matrix.py's), "
                             "recorded as the refine every door applies to these weights when none is given")
    parser.add_argument("--out", type=Path, default=Path("gadget/weights") / SHIPPED_NAME)
    args = parser.parse_args()

    loaded = load_checkpoint(args.checkpoint)
    trained = dict(loaded.description)
    stages = [trained]
    while stages[0].get("init_from") and Path(stages[0]["init_from"]["path"]).is_file():  # first stage first
        earlier = stage_record(stages[0]["init_from"]["path"])
        if earlier.get("stages"):  # a shipped checkpoint: its chain is recorded already
            stages[:0] = earlier["stages"]
            break
        stages.insert(0, earlier)
    description = {
        **{k: v for k, v in trained.items() if k not in ("train_dirs", "val_dirs", "init_from")},
        "data": DATA,
        "recipe": RECIPE,
        "stages": [{k: s.get(k) for k in ("loss", "epochs", "steps", "optimizer", "val_metrics", "training_time_s")}
                   for s in stages],
        "training_time_s_total": round(sum(float(s.get("training_time_s") or 0) for s in stages), 1),
        "evaluation": "\n\n".join(p.read_text() for p in args.evaluation),
        "refine": args.refine,  # gadget.model.checkpoint.default_refine
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
