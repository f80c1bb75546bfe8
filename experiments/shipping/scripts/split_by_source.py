"""Symlink `varnet synth --head` files into one folder per anatomy source (leave-one-source-out runs).

    python experiments/shipping/scripts/split_by_source.py PREFIX DIR [DIR ...]
    # → PREFIX_mni/, PREFIX_colin/, ...

The source is read from each file's ``acquisition`` attribute (``SIM_<SOURCE>HEAD_<CONTRAST>``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import h5py


def source_of(path: Path) -> str:
    with h5py.File(path, "r") as f:
        tag = str(f.attrs["acquisition"])
    parts = tag.split("_")
    if len(parts) < 3 or not parts[1].endswith("HEAD"):
        raise ValueError(f"{path}: acquisition {tag!r} is not a `varnet synth --head` tag")
    return parts[1][:-len("HEAD")].lower()


def main(prefix: str, dirs: list[str]) -> None:
    for d in dirs:
        for path in sorted(Path(d).glob("*.h5")):
            out = Path(f"{prefix}_{source_of(path)}")
            out.mkdir(parents=True, exist_ok=True)
            link = out / path.name
            if not link.exists():
                link.symlink_to(path.resolve())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
