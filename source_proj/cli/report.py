"""``source-proj report``: one self-contained HTML page about a fitted store.

The page needs no server and no network (inline CSS, inline SVG, images as ``data:`` URIs), so
it can be mailed or opened from a file. It shows, for each query, its top proponents and
opponents with their scores drawn as bars; the training rows' self-influence as a histogram
with the flagged tail (the top ``flag_fraction``); the curation table of a ``source-proj
curate`` output folder when one is given; and, at the foot, the store's settings and its
content digest. Rows are shown as text where the task gives texts (for ``--run``: the tokens
decoded), as images where a row's input is a 2-D (H, W) or 3-D (C, H, W) / (H, W, C) float
tensor, else by their first values. Every piece of text is escaped (``html.escape``).
"""

from __future__ import annotations

import base64
import csv
import html
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 8px;text-align:left;vertical-align:middle}
th{background:#f0f0f0}tr:nth-child(even){background:#fafafa}
.query{border:1px solid #ddd;border-radius:6px;padding:.5em 1em;margin:1em 0}
.row{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;max-width:40em}
.score{font-family:ui-monospace,monospace;text-align:right}
img.px{image-rendering:pixelated;width:56px;height:auto;border:1px solid #ccc}
.flagged{color:#b00}footer{margin-top:3em;font-size:.85em;color:#555}
"""
_BAR_WIDTH = 120
_MAX_TEXT = 400  # characters of a row's text shown


@dataclass(frozen=True)
class RowView:
    """How one row is shown: text, or an image (a PNG data URI), and its label if any."""

    text: str | None = None
    image: str | None = None
    label: str | None = None

    def html(self) -> str:
        """The row as an HTML fragment (escaped)."""
        label = f"<b>{html.escape(self.label)}</b> " if self.label is not None else ""
        if self.image is not None:
            return f'{label}<img class="px" alt="row image" src="{self.image}">'
        text = self.text or ""
        if len(text) > _MAX_TEXT:
            text = text[:_MAX_TEXT] + "…"
        return f'{label}<span class="row">{html.escape(text)}</span>'


def png_data_uri(pixels: np.ndarray) -> str:
    """A ``data:image/png`` URI of an image (H, W) grey or (H, W, 3) colour, any float or
    integer values, scaled linearly from its minimum (black) to its maximum (white)."""
    values = np.asarray(pixels, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = np.zeros_like(values) if high == low else (values - low) / (high - low)
    image = np.ascontiguousarray(np.round(scaled * 255).astype(np.uint8))
    height, width = image.shape[:2]
    colour = 2 if image.ndim == 3 else 0

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(height))  # filter type 0 per scanline
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _as_image(row: np.ndarray) -> np.ndarray | None:
    """(H, W) or (H, W, 3) pixels of a 2-D / 3-D float row (channels first or last), else None."""
    if not np.issubdtype(row.dtype, np.floating) or row.ndim not in (2, 3):
        return None
    if row.ndim == 2:
        return row
    if row.shape[0] in (1, 3):
        row = np.moveaxis(row, 0, -1)
    if row.shape[-1] == 1:
        return row[..., 0]
    return row if row.shape[-1] == 3 else None


def row_viewer(data: Any, texts: Sequence[str] | None) -> Callable[[int], RowView]:
    """A function giving the :class:`RowView` of row i of ``data`` (any data the attributor
    takes): its text if ``texts`` are given, else its image, else its first values; with its
    label where the row has a single-number target."""
    if texts is not None:
        return lambda i: RowView(text=texts[i])
    from source_proj.gradients.data import as_examples

    examples = as_examples(data)

    def view(i: int) -> RowView:
        inputs, targets = examples.rows(i, i + 1)
        label = str(targets[0].item()) if targets[0].numel() == 1 else None
        if not isinstance(inputs, Mapping) and not isinstance(inputs, tuple):
            row = inputs[0].detach().cpu().numpy()
            image = _as_image(row)
            if image is not None:
                return RowView(image=png_data_uri(image), label=label)
            values = row.reshape(-1)
            more = " …" if values.size > 8 else ""
            return RowView(text=" ".join(f"{v:.3g}" for v in values[:8]) + more, label=label)
        first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs[0]
        return RowView(text=" ".join(str(v) for v in first[0].reshape(-1)[:16].tolist()), label=label)

    return view


def _bar(score: float, scale: float) -> str:
    width = 0 if scale == 0 else abs(score) / scale * _BAR_WIDTH
    colour = "#2a7" if score >= 0 else "#c44"
    return (f'<svg width="{_BAR_WIDTH}" height="12" role="img" aria-label="score bar">'
            f'<rect width="{width:.1f}" height="12" fill="{colour}"/></svg>')


def _results_table(kind: str, ids: np.ndarray, scores: np.ndarray, view: Callable[[int], RowView], scale: float) -> str:
    rows = "".join(
        f'<tr><td>{rank + 1}</td><td>{int(m)}</td><td class="score">{s:.4g}</td><td>{_bar(float(s), scale)}</td>'
        f"<td>{view(int(m)).html()}</td></tr>"
        for rank, (m, s) in enumerate(zip(ids, scores))
    )
    return (f"<h4>{kind}</h4><table><tr><th>rank</th><th>train id</th><th>score</th><th></th><th>training row</th></tr>"
            f"{rows}</table>")


def _histogram(values: np.ndarray, flag_fraction: float, bins: int = 30) -> str:
    """An SVG histogram of ``values`` with the top ``flag_fraction`` (the flagged tail) in red."""
    threshold = float(np.quantile(values, 1 - flag_fraction)) if flag_fraction > 0 else np.inf
    counts, edges = np.histogram(values, bins=bins)
    width, height, pad = 600, 160, 20
    step = width / bins
    tallest = max(int(counts.max()), 1)
    bars = "".join(
        f'<rect x="{i * step:.1f}" y="{height - c / tallest * height:.1f}" width="{step - 1:.1f}" '
        f'height="{c / tallest * height:.1f}" fill="{"#c44" if edges[i + 1] > threshold else "#48c"}">'
        f"<title>{edges[i]:.4g} to {edges[i + 1]:.4g}: {c} rows</title></rect>"
        for i, c in enumerate(counts)
    )
    axis = (f'<text x="0" y="{height + pad - 4}" font-size="11">{edges[0]:.4g}</text>'
            f'<text x="{width}" y="{height + pad - 4}" font-size="11" text-anchor="end">{edges[-1]:.4g}</text>')
    flagged = int((values >= threshold).sum())
    caption = (f"<p>{len(values)} training rows; the top {flag_fraction:.1%} by self-influence "
               f'(<span class="flagged">{flagged} rows, self-influence ≥ {threshold:.4g}</span>) in red.</p>')
    return (f'<svg width="{width}" height="{height + pad}" role="img" aria-label="self-influence histogram">'
            f"{bars}{axis}</svg>{caption}")


def read_curation(folder: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows by rank) of the curation table in a ``source-proj curate`` output folder."""
    from source_proj.errors import InputError

    folder = Path(folder)
    if (folder / "curation.csv").is_file():
        with open(folder / "curation.csv", newline="") as handle:
            reader = csv.DictReader(handle)
            rows, columns = list(reader), list(reader.fieldnames or [])
    elif (folder / "curation.parquet").is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(folder / "curation.parquet").to_pydict()
        columns = list(table)
        rows = [{k: str(table[k][i]) for k in columns} for i in range(len(table[columns[0]]) if columns else 0)]
    else:
        raise InputError(f"{folder} holds no curation.csv or curation.parquet (the output folder of 'source-proj curate')")
    if "rank" in columns:
        rows.sort(key=lambda r: float(r["rank"]))
    return columns, rows


def _curation_table(folder: str | Path, view: Callable[[int], RowView], limit: int) -> str:
    columns, rows = read_curation(folder)
    id_column = next((c for c in ("row", "row_id", "train_id") if c in columns), None)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns) + ("<th>training row</th>" if id_column else "")
    body = ""
    for r in rows[:limit]:
        flagged = r.get("flag", "").lower() in ("true", "1")
        cells = "".join(f"<td>{html.escape(r[c])}</td>" for c in columns)
        shown = f"<td>{view(int(r[id_column])).html()}</td>" if id_column else ""
        body += f'<tr{" class=flagged" if flagged else ""}>{cells}{shown}</tr>'
    return (f"<p>{html.escape(str(folder))}: the {min(limit, len(rows))} most suspicious of {len(rows)} rows.</p>"
            f"<table><tr>{head}</tr>{body}</table>")


def _settings_table(settings: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items())
    return f"<table>{rows}</table>"


@dataclass(frozen=True)
class ReportInputs:
    """What a report shows.

    Attributes:
        title: the page's heading (e.g. the task or run).
        results: "proponents" / "opponents" -> (ids (Q, k), scores (Q, k)).
        query_view, train_view: row i -> :class:`RowView`.
        self_influence: (N,) the training rows' self-influence.
        flag_fraction: the tail of self-influence marked as flagged.
        settings: the store's settings, shown at the foot.
        digest: the store's content digest.
        curation: a ``source-proj curate`` output folder, or None.
        curation_rows: rows of the curation table shown.
    """

    title: str
    results: Mapping[str, tuple[np.ndarray, np.ndarray]]
    query_view: Callable[[int], RowView]
    train_view: Callable[[int], RowView]
    self_influence: np.ndarray
    flag_fraction: float
    settings: Mapping[str, Any]
    digest: str
    curation: str | Path | None = None
    curation_rows: int = 50


def render_report(inputs: ReportInputs) -> str:
    """The report as one HTML document (see the module docstring)."""
    scale = max((float(np.abs(scores).max()) for _, scores in inputs.results.values() if scores.size), default=0.0)
    n_queries = next(iter(inputs.results.values()))[0].shape[0] if inputs.results else 0
    queries = "".join(
        f'<div class="query"><h3>query {q}</h3><p>{inputs.query_view(q).html()}</p>'
        + "".join(_results_table(kind, ids[q], scores[q], inputs.train_view, scale)
                  for kind, (ids, scores) in inputs.results.items())
        + "</div>"
        for q in range(n_queries)
    )
    top = np.argsort(-inputs.self_influence, kind="stable")[:10]
    top_rows = "".join(f"<tr><td>{int(m)}</td><td class=score>{inputs.self_influence[m]:.4g}</td>"
                       f"<td>{inputs.train_view(int(m)).html()}</td></tr>" for m in top)
    curation = ("" if inputs.curation is None else
                f"<h2>Curation</h2>{_curation_table(inputs.curation, inputs.train_view, inputs.curation_rows)}")
    title = html.escape(inputs.title)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>SOURCE report: {title}</title>'
        f"<style>{_STYLE}</style></head><body><h1>SOURCE attribution report: {title}</h1>"
        "<p>Proponents are the training rows whose presence raised the query's measurement most (green bars); "
        "opponents lowered it most (red bars). Bars are scaled to the largest score on the page.</p>"
        f"<h2>Queries</h2>{queries}"
        f"<h2>Self-influence</h2>{_histogram(inputs.self_influence, inputs.flag_fraction)}"
        f"<h4>highest self-influence</h4><table><tr><th>train id</th><th>self-influence</th><th>training row</th></tr>"
        f"{top_rows}</table>{curation}"
        f"<footer><h2>Settings</h2>{_settings_table(inputs.settings)}"
        f"<p>store digest: <code>{html.escape(inputs.digest)}</code></p></footer></body></html>\n"
    )
