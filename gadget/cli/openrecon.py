"""``varnet openrecon label|package``: the OpenRecon label, and the package a scanner installs.

``package`` writes and validates everything it can without Docker first (label JSON, PDF manual),
then runs ``docker build --target openrecon``, ``docker save`` and zips the tar with the PDF as
``OpenRecon_<vendor>_<name>_V<version>.zip``. Without a ``docker`` command it stops with an error
(exit status 2) after the label and the manual are written.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

DEFAULT_OUT_DIR = Path("dist") / "openrecon"
LABEL_FILE = "openrecon_label.json"


def add_parser(sub) -> None:
    from . import example_epilog

    p = sub.add_parser("openrecon", help="Siemens OpenRecon: the image label and the installable package",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=example_epilog("varnet openrecon label --dockerfile Dockerfile",
                                             "varnet openrecon package --out-dir dist/openrecon"))
    which = p.add_subparsers(dest="openrecon_command", metavar="WHAT", required=True)
    lab = which.add_parser("label", help="write the label JSON; --dockerfile rewrites the openrecon stage's LABEL")
    lab.add_argument("--out", type=Path, default=None, help="write the label JSON here (default: print it)")
    lab.add_argument("--dockerfile", type=Path, default=None,
                     help="rewrite the LABEL line of this Dockerfile's openrecon stage in place")
    lab.set_defaults(run=run_label)
    pkg = which.add_parser("package", help="label, PDF manual, docker build + save, zip")
    pkg.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"default {DEFAULT_OUT_DIR}")
    pkg.add_argument("--root", type=Path, default=Path("."),
                     help="repository root: the Docker build context and where README.md is read (default .)")
    pkg.add_argument("--tag", default=None, help="image tag (default openrecon_<vendor>_<name>:v<version>, lower case)")
    pkg.set_defaults(run=run_package)


def _build():
    from ..openrecon.label import LabelError, build_label

    from . import UserError

    try:
        return build_label()
    except LabelError as exc:
        raise UserError(str(exc)) from None


def _write_json(path: Path, label: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(label, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def run_label(args) -> int:
    from ..openrecon.label import LabelError, write_dockerfile_label

    from . import UserError

    label = _build()
    if args.out:
        _write_json(args.out, label)
        print(f"varnet openrecon: label written to {args.out} (valid against OpenReconSchema_1.1.0)")
    if args.dockerfile:
        try:
            changed = write_dockerfile_label(args.dockerfile, label)
        except LabelError as exc:
            raise UserError(str(exc)) from None
        print(f"varnet openrecon: {args.dockerfile}: openrecon LABEL {'rewritten' if changed else 'already current'}")
    if not args.out and not args.dockerfile:
        print(json.dumps(label, indent=2, ensure_ascii=False))
    return 0


def _run(cmd: list[str]) -> None:
    from . import UserError

    print("+ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise UserError(f"'{' '.join(cmd[:2])}' failed with exit status {result.returncode}")


def _check_engine(docker: str) -> None:
    """The daemon must answer; published OpenRecon build scripts require Docker Engine < 25."""
    from . import UserError

    result = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True)
    version = result.stdout.strip()
    if result.returncode != 0 or not version:
        said = ((result.stderr or result.stdout).strip().splitlines() or ["nothing"])[-1]
        raise UserError(f"the Docker daemon does not answer ('docker version' says: {said})")
    major = version.split(".")[0]
    if major.isdigit() and int(major) >= 25:
        print(f"varnet openrecon: WARNING: Docker Engine {version}; published OpenRecon build scripts require "
              "an engine older than 25 (images saved by newer engines may not install on the scanner)", flush=True)


def run_package(args) -> int:
    from ..openrecon.label import LabelError, dockerfile_label, encode_label, package_stem
    from ..openrecon.manual import ManualError, write_manual

    from . import UserError

    label = _build()
    stem = package_stem(label)
    out = args.out_dir
    _write_json(out / LABEL_FILE, label)
    print(f"varnet openrecon: {out / LABEL_FILE} (valid against OpenReconSchema_1.1.0)")
    try:
        pdf = write_manual(out / f"{stem}.pdf", label, args.root)
    except ManualError as exc:
        raise UserError(str(exc)) from None
    print(f"varnet openrecon: {pdf}")
    dockerfile = args.root / "Dockerfile"
    regenerate = f"run 'varnet openrecon label --dockerfile {dockerfile}' first"
    try:
        current = dockerfile_label(dockerfile)
    except LabelError as exc:
        raise UserError(f"{exc}; {regenerate}") from None
    if current != label:
        raise UserError(f"{dockerfile}: the openrecon LABEL differs from the label built now; {regenerate}")
    docker = shutil.which("docker")
    if docker is None:
        raise UserError(f"no 'docker' command on PATH: the label and manual are in {out}, but the image "
                        "cannot be built, saved or zipped here; run this on a machine with Docker Engine < 25")
    _check_engine(docker)
    g = label["general"]
    tag = args.tag or f"openrecon_{g['vendor']}_{g['name']['en']}:v{g['version']}".lower()
    tar = out / f"{stem}.tar"
    _run([docker, "build", "--target", "openrecon", "-t", tag, str(args.root)])
    _run([docker, "save", "-o", str(tar), tag])
    archive = out / f"{stem}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(tar, tar.name)
        zf.write(pdf, pdf.name)
    print(f"varnet openrecon: {archive} ({tag}; label {len(encode_label(label))} base64 characters)")
    return 0
