"""Per-layer tables of the registered networks as plain data, readable without torch or tensorflow.

    from models.tables import load_table, totals
    rows = load_table("resnet50")        # list[LayerRow], last layer first (backward order)
    totals("resnet50")                   # {'params': 25557032, 'macs': 4089184256, ...}

The packaged files ``models/tables/<name>.json`` and ``<name>.csv`` hold each network at its native input
size, 1000 classes, one image; they are generated from :mod:`models.arch` by ``python -m models.tables
--write`` (or ``larscale models --regenerate``), and a test checks they are exactly what the code generates.
For other sizes or class counts call :func:`layer_table`, which computes the same rows analytically. What each
column counts is documented in :mod:`models.arch`: trainable parameters, forward conv/fc multiply-adds,
fp32 output bytes and fp32 gradient bytes, per image.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path

from models.arch import BYTES_PER_VALUE, LayerRow, architecture, layer_table

__all__ = ["COLUMNS", "DATA_DIR", "SCHEMA", "LayerRow", "csv_text", "json_text", "layer_table", "load_table",
           "read_csv", "sum_rows", "totals", "write_tables"]

DATA_DIR = Path(__file__).resolve().parent
SCHEMA = "larscale.model_table/1"
COLUMNS = ("name", "kind", "output_shape", "params", "macs", "activation_bytes", "gradient_bytes")
TOTAL_KEYS = ("params", "macs", "activation_bytes", "gradient_bytes")
NATIVE_CLASSES = 1000


def sum_rows(rows: Iterable[LayerRow]) -> dict[str, int]:
    """Column sums: params, macs, activation_bytes, gradient_bytes (per image)."""
    rows = list(rows)
    return {key: sum(getattr(row, key) for row in rows) for key in TOTAL_KEYS}


def json_text(name: str, image_size: int | None = None, num_classes: int = NATIVE_CLASSES) -> str:
    """The JSON document of ``name`` (packaged: native size, 1000 classes): metadata, totals, rows last first."""
    arch = architecture(name)
    rows = layer_table(name, image_size, num_classes)
    document = {
        "schema": SCHEMA,
        "model": name,
        "description": arch.description,
        "image_size": image_size or arch.input_size,
        "num_classes": num_classes,
        "bytes_per_value": BYTES_PER_VALUE,
        "order": "backward: the order gradients become ready, last layer first",
        "totals": sum_rows(rows),
    }
    layers = [json.dumps({**{key: getattr(row, key) for key in COLUMNS}, "output_shape": list(row.output_shape)})
              for row in rows]
    # One line per layer keeps the file short and its diffs readable.
    head = json.dumps(document, indent=1)
    return head[:-2] + ',\n "layers": [\n  ' + ",\n  ".join(layers) + "\n ]\n}\n"


def csv_text(name: str, image_size: int | None = None, num_classes: int = NATIVE_CLASSES) -> str:
    """The CSV of ``name`` (packaged: native size, 1000 classes): one row per layer, last layer first; the
    output shape is written as ``CxHxW``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in layer_table(name, image_size, num_classes):
        writer.writerow([row.name, row.kind, "x".join(map(str, row.output_shape)), row.params, row.macs,
                         row.activation_bytes, row.gradient_bytes])
    return buffer.getvalue()


def _data_path(name: str, suffix: str, directory: Path | None) -> Path:
    architecture(name)  # unknown names raise an error listing the known ones
    return (directory or DATA_DIR) / f"{name}.{suffix}"


def load_table(name: str, directory: Path | None = None) -> list[LayerRow]:
    """The packaged table of ``name`` (native input size, 1000 classes), last layer first."""
    document = json.loads(_data_path(name, "json", directory).read_text())
    if document.get("schema") != SCHEMA:
        raise ValueError(f"table of {name!r} has schema {document.get('schema')!r}, expected {SCHEMA!r}")
    return [LayerRow(**{**layer, "output_shape": tuple(layer["output_shape"])}) for layer in document["layers"]]


def read_csv(name: str, directory: Path | None = None) -> list[LayerRow]:
    """The packaged CSV table of ``name``, parsed back into rows (same content as :func:`load_table`)."""
    with _data_path(name, "csv", directory).open(newline="") as handle:
        return [LayerRow(name=r["name"], kind=r["kind"],
                         output_shape=tuple(int(n) for n in r["output_shape"].split("x")),
                         **{key: int(r[key]) for key in TOTAL_KEYS}) for r in csv.DictReader(handle)]


def totals(name: str, directory: Path | None = None) -> dict[str, int]:
    """Totals over the packaged table of ``name``: params, macs, activation_bytes, gradient_bytes (per image)."""
    return sum_rows(load_table(name, directory))


def write_tables(directory: Path | None = None, check: bool = False) -> list[Path]:
    """Regenerate every model's JSON and CSV in ``directory`` (the package by default).

    Returns the files that changed (with ``check``: that differ, leaving them untouched).
    """
    from models.arch import ARCHITECTURES

    directory = directory or DATA_DIR
    changed = []
    for name in ARCHITECTURES:
        for suffix, text in (("json", json_text(name)), ("csv", csv_text(name))):
            path = directory / f"{name}.{suffix}"
            if not path.exists() or path.read_text() != text:
                changed.append(path)
                if not check:
                    path.write_text(text)
    return changed
