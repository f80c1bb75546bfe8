"""The PDF manual of the OpenRecon package, from the README's OpenRecon section.

The section is read from ``README.md`` (the heading :data:`SECTION_TITLE` down to the next heading
of the same or a higher level); where README.md does not have it yet, from
``docs/readme-parts/openrecon.md``. A small Markdown subset is laid out: headings, paragraphs,
bullet lists, fenced code and tables (as monospace text). A table of the label's UI parameters is
appended. Fonts: DejaVu, shipped with matplotlib (a dependency), so any Unicode in the README prints.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator

SECTION_TITLE = "Scanner deployment: Siemens OpenRecon / FIRE"
README = "README.md"
FALLBACK = Path("docs") / "readme-parts" / "openrecon.md"


class ManualError(ValueError):
    """The manual's source text is missing or the PDF cannot be written."""


def read_section(root: Path) -> tuple[str, Path]:
    """``(markdown of the section, file it came from)``; raises :class:`ManualError` when neither
    README.md nor the fallback file holds a heading named :data:`SECTION_TITLE`."""
    tried = []
    for path in (Path(root) / README, Path(root) / FALLBACK):
        tried.append(str(path))
        if path.is_file():
            section = _section(path.read_text(encoding="utf-8"), SECTION_TITLE)
            if section:
                return section, path
    raise ManualError(f"no section '## {SECTION_TITLE}' in {' or '.join(tried)}")


def _section(text: str, title: str) -> str:
    lines = text.splitlines()
    for n, line in enumerate(lines):
        m = re.match(r"^(#+)\s+(.*?)\s*$", line)
        if m and m.group(2) == title:
            level, out = len(m.group(1)), [line]
            for rest in lines[n + 1:]:
                h = re.match(r"^(#+)\s", rest)
                if h and len(h.group(1)) <= level:
                    break
                out.append(rest)
            return "\n".join(out).strip() + "\n"
    return ""


def _blocks(markdown: str) -> Iterator[tuple[str, str]]:
    """``(kind, text)``: heading1..6, paragraph, bullet, code, table."""
    lines = markdown.splitlines()
    n, para = 0, []

    def flush():
        if para:
            text = " ".join(s.strip() for s in para)
            para.clear()
            return ("paragraph", text)
        return None

    while n < len(lines):
        line = lines[n]
        if line.startswith("```"):
            if (p := flush()):
                yield p
            body = []
            n += 1
            while n < len(lines) and not lines[n].startswith("```"):
                body.append(lines[n])
                n += 1
            yield ("code", "\n".join(body))
        elif (h := re.match(r"^(#{1,6})\s+(.*)$", line)):
            if (p := flush()):
                yield p
            yield (f"heading{len(h.group(1))}", h.group(2))
        elif line.lstrip().startswith("|"):
            if (p := flush()):
                yield p
            rows = []
            while n < len(lines) and lines[n].lstrip().startswith("|"):
                if not re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[n]):
                    rows.append(" | ".join(c.strip() for c in lines[n].strip().strip("|").split("|")))
                n += 1
            yield ("table", "\n".join(rows))
            continue
        elif re.match(r"^\s*[-*]\s+", line):
            if (p := flush()):
                yield p
            item = [re.sub(r"^\s*[-*]\s+", "", line)]
            while n + 1 < len(lines) and re.match(r"^\s{2,}\S", lines[n + 1]):
                n += 1
                item.append(lines[n].strip())
            yield ("bullet", " ".join(item))
        elif not line.strip():
            if (p := flush()):
                yield p
        else:
            para.append(line)
        n += 1
    if (p := flush()):
        yield p


def _inline(text: str) -> str:
    """Plain text: links as ``text (url)``, emphasis and code markers removed."""
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"[figure: \1]", text)
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1 (\2)", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    return text.replace("`", "")


def _fonts_dir() -> Path:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    if not (path / "DejaVuSans.ttf").is_file():
        raise ManualError(f"DejaVu fonts not found in {path} (they ship with matplotlib)")
    return path


def _parameter_rows(label: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for p in label["parameters"]:
        if p["type"] == "choice":
            allowed = ", ".join(v["id"] for v in p["values"])
        elif p["type"] in ("int", "double"):
            allowed = f"{p['minimum']} to {p['maximum']}"
        else:
            allowed = p["type"]
        rows.append((p["id"], str(p.get("default", "")), allowed, p.get("information", {}).get("en", "")))
    return rows


def write_manual(path: Path, label: dict, root: Path) -> Path:
    """Write the PDF manual for ``label`` (see :mod:`.label`) from the section under ``root``."""
    try:
        from fpdf import FPDF
    except ImportError:
        raise ManualError("writing the PDF manual needs fpdf2: pip install 'varnet-gadget[openrecon]'") from None
    markdown, source = read_section(root)
    fonts = _fonts_dir()
    pdf = FPDF(format="A4")
    pdf.set_margins(18, 18, 18)
    pdf.set_auto_page_break(True, margin=18)
    pdf.add_font("Sans", "", str(fonts / "DejaVuSans.ttf"))
    pdf.add_font("Sans", "B", str(fonts / "DejaVuSans-Bold.ttf"))
    pdf.add_font("Mono", "", str(fonts / "DejaVuSansMono.ttf"))
    g = label["general"]
    pdf.set_title(f"{g['name']['en']} {g['version']}")
    pdf.set_author(g["vendor"])
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin

    def text(font: str, style: str, size: float, body: str, gap: float = 2.0, indent: float = 0.0):
        pdf.set_font(font, style, size)
        pdf.set_x(pdf.l_margin + indent)
        pdf.multi_cell(width - indent, size * 0.5, body, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(gap)

    text("Sans", "B", 18, f"{g['name']['en']} {g['version']}", 1)
    text("Sans", "", 10, f"Vendor: {g['vendor']}   Package: OpenRecon_{g['vendor']}_{g['name']['en']}_V{g['version']}")
    text("Sans", "", 10, g["information"]["en"], 4)
    for kind, body in _blocks(markdown):
        if kind.startswith("heading"):
            level = int(kind[-1])
            text("Sans", "B", {1: 16, 2: 14, 3: 12}.get(level, 11), _inline(body), 1.5)
        elif kind == "paragraph":
            text("Sans", "", 10, _inline(body))
        elif kind == "bullet":
            text("Sans", "", 10, "\u2022 " + _inline(body), 1, indent=4)
        else:  # code, table
            text("Mono", "", 8, body, 3, indent=4)
    text("Sans", "B", 14, "UI parameters", 1.5)
    text("Sans", "", 10, "Shown on the scanner per scan; sent to the server as JSON after the header.")
    for pid, default, allowed, info in _parameter_rows(label):
        text("Sans", "B", 10, f"{pid}  (default {default}; {allowed})", 0.5)
        text("Sans", "", 9, info, 2, indent=4)
    text("Sans", "", 8, f"Generated from {source.name}.", 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # its font subsetting logs every glyph at INFO
    pdf.output(str(path))
    return path
