"""Naming the inputs and the checkpoints of a comparison.

*Sources*: each input (a directory of fastMRI ``.h5`` files or one file) is one source, named by
its directory name or file stem, or explicitly with ``NAME=PATH``. Explicitly named inputs that
share a name are merged into one source; two unnamed inputs that would get the same name are an
error (name them). ``all`` is reserved for the pooled result.

*Checkpoints*: one unnamed checkpoint gives the method row ``varnet`` (as before); named ones
(``NAME=PATH`` or a mapping) give one row each, ``varnet:NAME``, so several models are scored on
the same masks in one run. The path ``shipped`` stands for the weights shipped in the package
(unless a file of that name exists).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

from .scoring import EvaluationError

POOLED = "all"
SHIPPED = "shipped"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

SourceInput = Union[str, Path, tuple]


@dataclass(frozen=True)
class Source:
    """One named group of input files, scored as a unit (mean over its volumes)."""

    name: str
    files: tuple[Path, ...]


def check_name(name: str, what: str) -> str:
    """``name`` when it is a usable source/model name (letters, digits, ``._+-``), else an error
    naming ``what``."""
    if not _NAME.fullmatch(name):
        raise EvaluationError(f"{what}: bad name {name!r} (use letters, digits and . _ + -, "
                              "starting with a letter or digit)")
    return name


def split_named(item: str) -> tuple[str | None, str]:
    """``"NAME=PATH"`` → ``(NAME, PATH)``; a plain path (or an existing path with ``=``) → ``(None, PATH)``."""
    if "=" in item and not Path(item).exists():
        name, path = item.split("=", 1)
        if not path:
            raise EvaluationError(f"{item!r}: no path after '='; use NAME=PATH")
        return check_name(name, repr(item)), path
    return None, item


def _files_of(path: Path, label: str) -> list[Path]:
    if path.is_dir():
        found = sorted(path.glob("*.h5"))
        if not found:
            raise EvaluationError(f"{label}: no .h5 files in {path}")
        return found
    if path.is_file():
        return [path]
    raise EvaluationError(f"{label}: input not found: {path}")


def parse_sources(inputs: Union[Mapping[str, Union[str, Path, Sequence]], Sequence[SourceInput], str, Path]
                  ) -> list[Source]:
    """Named sources, in the order first given.

    ``inputs`` is a mapping ``{name: path or [paths]}``, or a sequence whose items are paths,
    ``"NAME=PATH"`` strings or ``(name, path)`` tuples (a single path is accepted too).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if isinstance(inputs, Mapping):
        items = [(str(n), p) for n, ps in inputs.items()
                 for p in (ps if isinstance(ps, (list, tuple)) else [ps])]
        items = [(check_name(n, f"source {n!r}"), str(p)) for n, p in items]
    else:
        items = []
        for item in inputs:
            if isinstance(item, tuple):
                if len(item) != 2:
                    raise EvaluationError(f"source {item!r}: expected (name, path)")
                items.append((check_name(str(item[0]), f"source {item!r}"), str(item[1])))
            else:
                items.append(split_named(str(item)))
    if not items:
        raise EvaluationError("no input files")
    groups: dict[str, list[Path]] = {}
    explicit: dict[str, bool] = {}
    origin: dict[str, str] = {}
    for name, path_str in items:
        path = Path(path_str)
        given = name is not None
        if name is None:
            name = path.stem if path.is_file() else path.resolve().name
            name = name if _NAME.fullmatch(name) else re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip("._+-") or "input"
        label = f"{name}={path}" if given else str(path)
        if name == POOLED:
            raise EvaluationError(f"{label}: the source name '{POOLED}' is reserved for the pooled result; "
                                  "name it with NAME=PATH")
        if name in groups and not (given and explicit[name]):
            raise EvaluationError(f"inputs {origin[name]} and {path} are both named {name!r}; "
                                  "name them with NAME=PATH")
        groups.setdefault(name, []).extend(_files_of(path, label))
        explicit.setdefault(name, given)
        origin.setdefault(name, str(path))
    seen: dict[Path, str] = {}
    for name, files in groups.items():
        for f in files:
            key = f.resolve()
            if key in seen:
                where = f"twice in source {name!r}" if seen[key] == name else f"in sources {seen[key]!r} and {name!r}"
                raise EvaluationError(f"{f} is {where}; each file may be scored once")
            seen[key] = name
    return [Source(name, tuple(files)) for name, files in groups.items()]


def parse_checkpoints(checkpoint) -> list[tuple[str, object]]:
    """``[(method_row_name, checkpoint), ...]`` for E2E-VarNet.

    ``None`` → no model; a path or an ``nn.Module`` → ``[("varnet", it)]``; a mapping
    ``{name: path or module}`` → ``varnet:NAME`` rows; a sequence of strings (the CLI's repeated
    ``--checkpoint``) → one plain ``PATH``, or any number of ``NAME=PATH``. The path ``shipped``
    means the packaged weights.
    """
    if checkpoint is None:
        return []
    if isinstance(checkpoint, Mapping):
        if not checkpoint:
            raise EvaluationError("no checkpoints given")
        return [(f"varnet:{check_name(str(n), f'checkpoint {n!r}')}", _resolve(c)) for n, c in checkpoint.items()]
    if isinstance(checkpoint, (list, tuple)):
        parsed = [split_named(str(c)) for c in checkpoint]
        if not parsed:
            raise EvaluationError("no checkpoints given")
        unnamed = [p for n, p in parsed if n is None]
        if unnamed and len(parsed) > 1:
            raise EvaluationError(f"several checkpoints: name each one as NAME=PATH (unnamed: {', '.join(unnamed)})")
        if unnamed:
            return [("varnet", _resolve(unnamed[0]))]
        names = [n for n, _ in parsed]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise EvaluationError(f"checkpoint name(s) given more than once: {', '.join(dupes)}")
        return [(f"varnet:{n}", _resolve(p)) for n, p in parsed]
    return [("varnet", _resolve(checkpoint))]


def _resolve(checkpoint):
    """``shipped`` → the packaged weights; other paths must exist; modules pass through."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if str(checkpoint) == SHIPPED and not path.exists():
            from ..model.shipped import shipped_checkpoint

            return str(shipped_checkpoint())
        if not path.is_file():
            raise EvaluationError(f"checkpoint not found: {checkpoint}")
        return str(path)
    return checkpoint
