"""The typed-config mechanism shared by the serving config (:mod:`gadget.recon.config`) and the training
config (:mod:`gadget.train.config`), in the manner of DIRECT's typed dataclasses:

- :func:`choice` declares a field's allowed values in the field's metadata, beside the field;
  :func:`choices_of` reads them back per class;
- :func:`convert` turns a raw value (a YAML scalar or list, a string from the command line, a Gadgetron
  property or JSON) into the field's annotated type and checks its declared choices; :func:`convert_field`
  does that for a named field of a dataclass;
- :func:`load_yaml_mapping` reads a YAML file or text whose top level must be a mapping;
- :func:`presets_folder` and :func:`yaml_stems` find the YAML presets shipped in ``gadget.pipelines``.

Every error is raised as the caller's error class, its message naming the source and the field.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

_CHOICES = "choices"  # metadata keys
_JOINED = "joined"

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
NONE_WORDS = ("none", "null", "")


def choice(default: Any, choices: Sequence[Any], *, joined: Optional[str] = None, **kwargs: Any) -> Any:
    """A :func:`dataclasses.field` with ``default`` whose allowed values are ``choices``, kept in the
    field's metadata. With ``joined`` (e.g. ``","``) a value may also be several choices joined by that
    separator. Other keyword arguments go to :func:`dataclasses.field`."""
    choices = tuple(choices)
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata[_CHOICES] = choices
    if joined:
        metadata[_JOINED] = joined
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def choices_of(cls: Any) -> dict[str, tuple]:
    """``{field name: allowed values}`` for the fields of the dataclass ``cls`` (or an instance) declared
    with :func:`choice`, in field order."""
    return {f.name: f.metadata[_CHOICES] for f in dataclasses.fields(cls) if _CHOICES in f.metadata}


def joined_by(cls: Any, name: str) -> Optional[str]:
    """The separator that lets field ``name`` of ``cls`` hold several choices (None: one value only)."""
    return _fields(cls if isinstance(cls, type) else type(cls))[name].metadata.get(_JOINED)


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of the dataclass ``cls`` (string annotations evaluated), cached."""
    return typing.get_type_hints(cls)


def check_choice(value: Any, choices: Sequence[Any], *, name: str, source: str, error: type[Exception] = ValueError,
                 joined: Optional[str] = None) -> Any:
    """``value`` if it is one of ``choices`` (with ``joined``: each part of it split at that separator);
    else ``error("{source}: setting '{name}' = {value!r} must be one of a, b, ...")``."""
    parts = [p.strip() for p in str(value).split(joined)] if joined and isinstance(value, str) else [value]
    if all(p in choices for p in parts):
        return value
    several = f", or several joined by {'commas' if joined == ',' else repr(joined)}" if joined else ""
    raise error(f"{source}: setting '{name}' = {value!r} must be one of {', '.join(map(str, choices))}{several}")


def convert(value: Any, annotation: Any, *, name: str, source: str, error: type[Exception] = ValueError,
            choices: Sequence[Any] = (), joined: Optional[str] = None) -> Any:
    """``value`` converted to the type ``annotation``: bool (true/false, 1/0, yes/no, on/off, any case),
    int (no bools, no non-integral floats), float (no bools), str, ``Optional[X]`` (None or the strings
    none/null/empty give None) and ``list[X]`` (a list, a comma-separated string, or one value); then
    checked against ``choices`` when given (see :func:`check_choice`; for a list, each item). A value that
    does not convert raises ``error("{source}: setting '{name}' = {value!r} is not a valid {type}")``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        items = [_scalar(v, args[0] if args else str, name, source, error) for v in value]
        for item in items if choices else ():
            check_choice(item, choices, name=name, source=source, error=error, joined=joined)
        return items
    out = _scalar(value, annotation, name, source, error)
    if choices:
        check_choice(out, choices, name=name, source=source, error=error, joined=joined)
    return out


def _scalar(value: Any, kind: Any, name: str, source: str, error: type[Exception]) -> Any:
    """One value as ``kind`` (bool, int, float or str; any other annotation is treated as str)."""
    kind_name = getattr(kind, "__name__", str(kind))
    bad = error(f"{source}: setting '{name}' = {value!r} is not a valid {kind_name}")
    if isinstance(value, (list, tuple, dict)) or value is None:
        raise bad
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE_WORDS:
            return True
        if text in FALSE_WORDS:
            return False
        raise bad
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value.strip()) if isinstance(value, str) else int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
    except (TypeError, ValueError):
        raise bad from None
    return str(value)


def convert_field(cls: Any, attr: str, value: Any, *, source: str, error: type[Exception] = ValueError,
                  name: Optional[str] = None) -> Any:
    """``value`` converted (:func:`convert`) to the type of field ``attr`` of the dataclass ``cls`` and
    checked against the choices declared beside it; ``name`` (default ``attr``) is how errors name it."""
    cls = cls if isinstance(cls, type) else type(cls)
    meta = _fields(cls)[attr].metadata
    return convert(value, type_hints(cls)[attr], name=name or attr, source=source, error=error,
                   choices=meta.get(_CHOICES, ()), joined=meta.get(_JOINED))


def load_yaml_mapping(path_or_text: Union[str, Path], source: Optional[str] = None, *,
                      error: type[Exception] = ValueError, what: str = "settings") -> dict[str, Any]:
    """The mapping in a YAML file (``path_or_text`` a :class:`~pathlib.Path`) or YAML text (a ``str``);
    empty or null gives ``{}``. ``source`` names it in errors (default: the path, else "YAML text"):
    ``error("cannot read {source}: ...")`` for an unreadable file, ``error("{source}: not valid YAML
    (...)")``, and ``error("{source}: expected a mapping of {what}, got {type}")`` for another top level."""
    if isinstance(path_or_text, Path):
        source = source or str(path_or_text)
        try:
            text = path_or_text.read_text()
        except OSError as exc:
            raise error(f"cannot read {source}: {exc.strerror or exc}") from None
    else:
        source = source or "YAML text"
        text = path_or_text
    try:
        data = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise error(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{source}: expected a mapping of {what}, got {type(data).__name__}")
    return data


def presets_folder(*parts: str) -> Path:
    """The folder of the YAML presets shipped as package data ``gadget.pipelines`` (``parts``: a
    subfolder of it, e.g. ``"train"``)."""
    from gadget import pipelines

    return Path(pipelines.__file__).resolve().parent.joinpath(*parts)


def yaml_stems(folder: Path) -> list[str]:
    """The names (without ``.yaml``) of the YAML files in ``folder``, sorted."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


__all__ = ["choice", "choices_of", "joined_by", "type_hints", "check_choice", "convert", "convert_field",
           "load_yaml_mapping", "presets_folder", "yaml_stems", "TRUE_WORDS", "FALSE_WORDS", "NONE_WORDS"]
