"""MkDocs hook: the configuration reference page, generated from ``ReconConfig`` at build time.

``mkdocs build`` calls :func:`on_files`, which adds ``reference/configuration.md`` to the site. Nothing is
copied by hand: the settings, their types and defaults come from the dataclass
(``gadget/recon/config.py``), the allowed values from its ``CHOICES``, who may set them from
``OPERATOR_ONLY`` and the OpenRecon UI table (``gadget/recon/ui_parameters.py``), the description of each
setting from the comment above or beside its field, and the presets from ``pipelines/*.yaml``. A field
without a comment fails the build (and ``tests/test_docs.py``).

``python docs/hooks/config_reference.py [OUT]`` prints the page (or writes it to ``OUT``) without MkDocs.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import math
import sys
import tokenize
from pathlib import Path
from typing import Any

PAGE = "reference/configuration.md"
ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "gadget" / "recon" / "config.py"


def field_comments(source: str, class_name: str = "ReconConfig") -> dict[str, str]:
    """``{field: comment}``: for each field of the class, the block of ``#`` lines directly above it
    followed by the comment at the end of its own line, joined into one paragraph ('' when neither)."""
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    out = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        block, n = [], node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            block.insert(0, comments[n])
            n -= 1
        trailing = [comments[node.lineno]] if node.lineno in comments else []
        out[node.target.id] = " ".join(block + trailing).strip()
    return out


def _value(value: Any) -> str:
    """A value as it is written in a preset YAML file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value)


def _type(annotation: Any) -> str:
    text = str(annotation)
    return "path (optional)" if text.startswith("Optional[") else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The Markdown of the configuration reference."""
    import yaml

    from gadget.recon.config import CHOICES, OPERATOR_ONLY, ReconConfig, preset_names, presets_dir
    from gadget.recon.ui_parameters import UI_PARAMETERS

    comments = field_comments(SOURCE.read_text(encoding="utf-8"))
    ui = {p.setting: p for p in UI_PARAMETERS}
    fields = dataclasses.fields(ReconConfig)
    missing = [f.name for f in fields if not comments.get(f.name)]
    if missing:
        raise ValueError(f"{SOURCE}: fields without a comment above or beside them: {', '.join(missing)}")

    def who(name: str) -> str:
        if name in OPERATOR_ONLY:
            return "operator only"
        if name in ui:
            return f"operator, client; OpenRecon `{ui[name].id}`"
        return "operator, client"

    out = [
        "# Configuration reference",
        "",
        "> Generated when the site is built, by `docs/hooks/config_reference.py`, from `ReconConfig` in",
        "> `gadget/recon/config.py` (fields, defaults, the comments beside them), its `CHOICES` and `OPERATOR_ONLY`,",
        "> the OpenRecon UI table in `gadget/recon/ui_parameters.py` and the presets in `pipelines/`. To change",
        "> this page, change those.",
        "",
        "How settings are given (presets, YAML files, Gadgetron properties, MRD JSON parameters) and in which",
        "order they apply: [Configuration](../guide/configuration.md). *Operator only*: the command line, a",
        "preset or YAML file, a Gadgetron chain; a network client asking for one gets an error. *Client*: also",
        "an MRD client's CONFIG_TEXT or JSON parameters; an OpenRecon id is the name the scanner's UI sends.",
        "",
        "| setting | type | default | choices | set by |",
        "|---|---|---|---|---|",
    ]
    for f in fields:
        choices = ", ".join(f"`{c}`" for c in CHOICES.get(f.name, ()))
        out.append(f"| [`{f.name}`](#{f.name}) | {_type(f.type)} | `{_value(f.default)}` | {choices} | "
                   f"{who(f.name)} |")
    out += ["", "## Settings", ""]
    for f in fields:
        facts = [f"type {_type(f.type)}", f"default `{_value(f.default)}`"]
        if f.name in CHOICES:
            facts.append("choices " + ", ".join(f"`{c}`" for c in CHOICES[f.name]))
        facts.append(who(f.name))
        if f.name in ui and ui[f.name].minimum is not None:
            facts.append(f"OpenRecon range {_value(ui[f.name].minimum)}–{_value(ui[f.name].maximum)}")
        out += [f"### `{f.name}` {{#{f.name}}}", "", " · ".join(facts), "", comments[f.name], ""]

    presets = {name: yaml.safe_load((presets_dir() / f"{name}.yaml").read_text(encoding="utf-8")) or {}
               for name in preset_names()}
    shown = [f.name for f in fields if any(f.name in values for values in presets.values())]
    out += ["## Presets", "",
            "The values each preset in `pipelines/` sets (a name from a network client selects one of these "
            "files and nothing else); a blank cell keeps the default.", "",
            "| setting | default | " + " | ".join(f"`{name}`" for name in presets) + " |",
            "|---|---|" + "---|" * len(presets)]
    defaults = ReconConfig()
    for name in shown:
        cells = [f"`{_value(values[name])}`" if name in values else "" for values in presets.values()]
        out.append(f"| `{name}` | `{_value(getattr(defaults, name))}` | " + " | ".join(_cell(c) for c in cells) + " |")
    out.append("")
    for name in presets:
        head = []
        for line in (presets_dir() / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            head.append(line.lstrip("#").strip())
        out.append(f"* `{name}`: {' '.join(head)}")
    out.append("")
    return "\n".join(out)


def on_files(files, config):
    """MkDocs event: add the generated page to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    text = render()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
