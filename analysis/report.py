"""A report directory: one Markdown page with tables and embedded plots, plus the data behind them.

Layout written by :class:`Report`::

    OUT/index.md          the page (plots referenced by relative path, so the directory can be moved)
    OUT/plots/*.png|svg   every figure, PNG for the page and SVG for papers
    OUT/data/*.csv        every table, and the same as Parquet
"""

from __future__ import annotations

import math
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


@dataclass
class Report:
    out: Path
    title: str
    blocks: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    data_files: list[Path] = field(default_factory=list)

    def section(self, heading: str) -> None:
        self.blocks.append(f"## {heading}")

    def text(self, markdown: str) -> None:
        self.blocks.append(markdown)

    def table(self, frame) -> None:
        self.blocks.append(markdown_table(frame))

    def plot(self, name: str, files: list[Path], caption: str) -> None:
        png = next((Path(f) for f in files if str(f).endswith(".png")), None)
        if png is None:
            raise ValueError(f"plot {name!r} produced no PNG (files: {files})")
        self.images.append(png)
        self.blocks.append(f"![{caption}]({png.relative_to(self.out).as_posix()})\n\n*{caption}*")

    def data(self, name: str, frame) -> None:
        """Write a table as data/NAME.csv and data/NAME.parquet (referenced from the page's last section)."""
        folder = self.out / "data"
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_csv(folder / f"{name}.csv", index=False)
        frame.to_parquet(folder / f"{name}.parquet", index=False)
        self.data_files += [folder / f"{name}.csv", folder / f"{name}.parquet"]

    def write(self) -> Path:
        files = "\n".join(f"- [{p.relative_to(self.out).as_posix()}]({p.relative_to(self.out).as_posix()})"
                          for p in self.data_files)
        page = "\n\n".join([f"# {self.title}", *self.blocks, "## Data", files]) + "\n"
        index = self.out / "index.md"
        tmp = index.with_suffix(".md.tmp")
        tmp.write_text(page)
        tmp.replace(index)
        return index
