"""A report directory: one page with tables and plots, as Markdown and as self-contained HTML, plus the data.

Layout written by :class:`Report`::

    OUT/index.md          the page (plots referenced by relative path, so the directory can be moved)
    OUT/index.html        the same page in one file, every plot inlined as a data URI (a reviewer opens it as is)
    OUT/plots/*.png|svg   every figure, PNG for the page and SVG for papers
    OUT/data/*.csv        every table, and the same as Parquet
    OUT/summary.json      what a script needs (written by the caller through :meth:`Report.summary`)
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if abs(value) >= 1000 or value == int(value):
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame) -> str:
    """A pandas DataFrame as a GitHub Markdown table (numbers to 4 significant digits)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _html_table(frame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v).replace(chr(92) + '|', '|'))}</td>" for v in row)
                   + "</tr>" for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    """The Markdown a report's text uses (`code`, **bold**, *emphasis*, [link](target)) as HTML."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<em>\1</em>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', out)


def _html_text(markdown: str) -> str:
    """Paragraphs, ``` fences, "- " lists and Markdown tables of a text block as HTML."""
    parts = []
    for chunk in re.split(r"(```.*?```)", markdown, flags=re.DOTALL):
        if chunk.startswith("```"):
            parts.append(f"<pre>{html.escape(chunk.strip('`').removeprefix('text').strip(chr(10)))}</pre>")
            continue
        for para in re.split(r"\n\s*\n", chunk.strip()):
            lines = para.splitlines()
            if not lines:
                continue
            if all(line.startswith("- ") for line in lines):
                parts.append("<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>")
            elif all(line.startswith("|") for line in lines) and len(lines) >= 2:
                cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
                head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
                body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in cells[2:])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                parts.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(parts)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;line-height:1.45}"
         "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:.25em .5em;"
         "text-align:right}th{background:#f3f3f3}pre{background:#f6f6f6;padding:.8em;overflow-x:auto}"
         "img{max-width:100%}figure{margin:1.5em 0}figcaption{font-style:italic}")


@dataclass
class Report:
    out: Path
    title: str
    # (kind, payload): ("heading", text), ("text", markdown), ("table", frame), ("plot", (png, caption))
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    data_files: list[Path] = field(default_factory=list)

    def section(self, heading: str) -> None:
        self.blocks.append(("heading", heading))

    def text(self, markdown: str) -> None:
        self.blocks.append(("text", markdown))

    def table(self, frame) -> None:
        self.blocks.append(("table", frame))

    def plot(self, name: str, files: list[Path], caption: str) -> None:
        png = next((Path(f) for f in files if str(f).endswith(".png")), None)
        if png is None:
            raise ValueError(f"plot {name!r} produced no PNG (files: {files})")
        self.images.append(png)
        self.blocks.append(("plot", (png, caption)))

    def data(self, name: str, frame) -> None:
        """Write a table as data/NAME.csv and data/NAME.parquet (referenced from the page's last section)."""
        folder = self.out / "data"
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_csv(folder / f"{name}.csv", index=False)
        frame.to_parquet(folder / f"{name}.parquet", index=False)
        self.data_files += [folder / f"{name}.csv", folder / f"{name}.parquet"]

    def summary(self, values: dict[str, Any]) -> Path:
        """``summary.json``: plain numbers for scripts (NaN written as null)."""
        path = self.out / "summary.json"
        _write_atomic(path, json.dumps(_json_safe(values), indent=2, allow_nan=False) + "\n")
        return path

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def markdown(self) -> str:
        parts = [f"# {self.title}"]
        for kind, payload in self.blocks:
            if kind == "heading":
                parts.append(f"## {payload}")
            elif kind == "text":
                parts.append(payload)
            elif kind == "table":
                parts.append(markdown_table(payload))
            else:
                png, caption = payload
                parts.append(f"![{caption}]({self._relative(png)})\n\n*{caption}*")
        files = "\n".join(f"- [{self._relative(p)}]({self._relative(p)})" for p in self.data_files)
        return "\n\n".join([*parts, "## Data", files]) + "\n"

    def html(self) -> str:
        parts = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, payload in self.blocks:
            if kind == "heading":
                parts.append(f"<h2>{html.escape(payload)}</h2>")
            elif kind == "text":
                parts.append(_html_text(payload))
            elif kind == "table":
                parts.append(_html_table(payload))
            else:
                png, caption = payload
                uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
                parts.append(f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        files = "".join(f"<li>{html.escape(self._relative(p))}</li>" for p in self.data_files)
        body = "\n".join([*parts, "<h2>Data</h2>", f"<p>Beside this page:</p><ul>{files}</ul>"])
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
                f"</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")

    def write(self) -> Path:
        """index.md and index.html; returns index.md."""
        index = self.out / "index.md"
        _write_atomic(index, self.markdown())
        _write_atomic(self.out / "index.html", self.html())
        return index


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _json_safe(value: Any) -> Any:
    """numpy numbers → Python, NaN/inf → None, tuples → lists, Paths → strings."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
