"""The evaluation report: one self-contained HTML file that people look at before promoting a model.

It holds the evaluation table (candidate against baseline), a grid of sample listings with their
nearest neighbours' photos, titles and scores, and a 2-D projection (PCA) of the vectors coloured by
category. Photos are embedded as small JPEG data URIs and the projection is inline SVG, so the file
opens anywhere, offline, and can be attached to an MLflow run.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from depop_embed import photos, sources
from depop_embed.config import Config
from depop_embed.reader import EmbeddingReader, embedding_column, hash_sample
from depop_embed.tables import IMAGE_TABLE

if TYPE_CHECKING:
    from depop_embed.evaluation import ModelScores

THUMB_SIDE = 160
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_PLOT_W, _PLOT_H, _PAD = 760, 460, 24


@dataclass
class Card:
    listing_id: str
    title: str
    category: str
    brand: str
    photo: str | None  # a data: URI, or None when the listing has no readable photo
    score: float | None = None  # cosine to the listing the row is about


@dataclass
class ReportData:
    candidate: str
    baseline: str | None
    listings: int
    figures: list[dict[str, Any]]  # metric, candidate, baseline
    neighbour_column: str
    rows: list[tuple[Card, list[Card]]]
    points: pd.DataFrame  # x, y, category, listing_id, title
    explained: tuple[float, float]  # share of variance on each projection axis
    generated_at: str = field(default_factory=lambda: f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}")


def figures(candidate: ModelScores, baseline: ModelScores | None, agreement_k: int) -> list[dict[str, Any]]:
    """The evaluation figures as rows: metric, candidate, baseline (None without one)."""
    mine = candidate.metrics("", agreement_k)
    theirs = baseline.metrics("", agreement_k) if baseline else {}
    return [{"metric": name.lstrip("/"), "candidate": value, "baseline": theirs.get(name)} for name, value in mine.items()]


def gather(
    reader: EmbeddingReader, cfg: Config, candidate: ModelScores, baseline: ModelScores | None, listings: pd.DataFrame, ids: list[str]
) -> ReportData:
    """Everything the report shows, for the candidate model over the evaluated listings `ids`."""
    ev = cfg.evaluation
    vectors = reader.vectors(ev.report_by, candidate.model_id).subset(ids)
    info = listings.set_index("listing_id")
    covers = cover_photos(reader, candidate.model_id)
    thumbs: dict[str, str | None] = {}

    def card(listing_id: str, score: float | None = None) -> Card:
        if listing_id not in thumbs:
            thumbs[listing_id] = thumbnail(covers.get(listing_id), cfg)
        row = info.loc[listing_id] if listing_id in info.index else {}
        return Card(listing_id, _text(row.get("title")), _text(row.get("category")), _text(row.get("brand")), thumbs[listing_id], score)

    shown = hash_sample(list(vectors.ids), ev.report_listings)
    neighbours, scores = vectors.nearest(vectors.subset(shown).matrix, ev.report_neighbours, exclude=shown)
    rows = [
        (card(listing_id), [card(n, float(s)) for n, s in zip(neighbours[i], scores[i])])
        for i, listing_id in enumerate(shown)
    ]
    projected = vectors.subset(hash_sample(list(vectors.ids), ev.projection_points))
    xy, explained = pca_2d(projected.matrix)
    points = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "listing_id": projected.ids})
    points["category"] = [_text(info["category"].get(i)) or "(none)" for i in projected.ids]
    points["title"] = [_text(info["title"].get(i)) for i in projected.ids]
    return ReportData(
        candidate.model_id, baseline.model_id if baseline else None, candidate.listings,
        figures(candidate, baseline, ev.agreement_k), embedding_column(ev.report_by), rows, points, explained,
    )


def cover_photos(reader: EmbeddingReader, model_id: str) -> dict[str, str]:
    """listing_id -> URI of its first photo that embedded ok."""
    rows = reader.table(IMAGE_TABLE.name, model_id, ["listing_id", "position", "image_id", "image_uri", "status"]).to_pandas()
    rows = rows[rows["status"] == "ok"].sort_values(["listing_id", "position", "image_id"], na_position="last")
    return dict(rows.drop_duplicates("listing_id")[["listing_id", "image_uri"]].itertuples(index=False))


def thumbnail(uri: str | None, cfg: Config) -> str | None:
    """A photo as a small JPEG data URI, read and decoded as safely as the job reads it; None if it cannot be."""
    if not uri:
        return None
    try:
        data = photos.read_bytes(uri, cfg.images.fetch, sources.photo_rules(cfg.images))
        image = photos.decode(data, cfg.encode.max_image_pixels, THUMB_SIDE)
    except photos.PhotoError:
        return None
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def pca_2d(matrix: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """The rows projected on their first two principal axes, and the share of variance of each."""
    if len(matrix) < 2:
        return np.zeros((len(matrix), 2)), (0.0, 0.0)
    centred = matrix - matrix.mean(axis=0)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    share = variance / variance.sum() if variance.sum() else np.zeros_like(variance)
    xy = centred @ axes[:2].T
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy, (float(share[0]), float(share[1]) if len(share) > 1 else 0.0)


def write(path: str | Path, data: ReportData) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(data), encoding="utf-8")
    return path


def render(data: ReportData) -> str:
    e = html.escape
    baseline = e(data.baseline) if data.baseline else "none (no other model has been current)"
    images = sum(c.photo is not None for query, found in data.rows for c in (query, *found))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>depop-embed evaluation: {e(data.candidate)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 22px; margin-bottom: 4px; }} h2 {{ font-size: 17px; margin-top: 28px; }}
table.figures {{ border-collapse: collapse; }}
table.figures td, table.figures th {{ border: 1px solid #ccc; padding: 3px 10px; text-align: right; }}
table.figures td:first-child, table.figures th:first-child {{ text-align: left; }}
.better {{ color: #1a7f37; }} .worse {{ color: #c62828; }}
.row {{ display: flex; gap: 8px; align-items: flex-start; margin-bottom: 12px; }}
figure {{ margin: 0; width: {THUMB_SIDE}px; font-size: 11px; }}
figure.query {{ border-right: 3px solid #444; padding-right: 8px; }}
figure img, .nophoto {{ width: {THUMB_SIDE}px; height: {THUMB_SIDE}px; object-fit: contain; background: #f3f3f3; display: block; }}
.nophoto {{ display: flex; align-items: center; justify-content: center; color: #888; }}
figcaption b {{ display: block; }}
.legend span {{ display: inline-block; margin-right: 14px; }}
.legend i {{ display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 4px; }}
</style></head>
<body data-images-total="{images}">
<h1>Model evaluation: {e(data.candidate)}</h1>
<p>Baseline: {baseline}. {data.listings} active listings evaluated. Generated {e(data.generated_at)}.</p>
<h2>Figures</h2>
{_figures_table(data)}
<h2>Nearest neighbours by {e(data.neighbour_column)}</h2>
<p>Left: a sample listing; right: its nearest active listings, with cosine similarity.</p>
{''.join(_neighbour_row(query, found) for query, found in data.rows)}
<h2>2-D projection of the {e(data.neighbour_column)} vectors (PCA), coloured by category</h2>
<p>{len(data.points)} listings; the axes hold {data.explained[0]:.1%} and {data.explained[1]:.1%} of the variance.</p>
{_projection(data.points)}
<script>
window.addEventListener("load", function () {{
  var shown = Array.prototype.filter.call(document.images, function (img) {{ return img.complete && img.naturalWidth > 0; }});
  document.body.setAttribute("data-images-loaded", String(shown.length));
}});
</script>
</body></html>
"""


def _figures_table(data: ReportData) -> str:
    rows = []
    for f in data.figures:
        delta = ""
        if f["baseline"] is not None and not f["metric"].endswith("listings"):
            change = f["candidate"] - f["baseline"]
            delta = f'<span class="{"better" if change > 0 else "worse" if change < 0 else ""}">{change:+.3f}</span>'
        rows.append(
            f"<tr><td>{html.escape(f['metric'])}</td><td>{_number(f['candidate'])}</td>"
            f"<td>{_number(f['baseline'])}</td><td>{delta}</td></tr>"
        )
    return (
        '<table class="figures"><tr><th>metric</th><th>candidate</th><th>baseline</th><th>change</th></tr>'
        + "".join(rows) + "</table>"
    )


def _neighbour_row(query: Card, found: list[Card]) -> str:
    return '<div class="row">' + _figure(query, "query") + "".join(_figure(c, "") for c in found) + "</div>\n"


def _figure(card: Card, css: str) -> str:
    e = html.escape
    picture = f'<img src="{card.photo}" alt="{e(card.title)}">' if card.photo else '<div class="nophoto">no photo</div>'
    score = f"cosine {card.score:.3f}<br>" if card.score is not None else ""
    details = " · ".join(e(x) for x in (card.category, card.brand) if x)
    return (
        f'<figure class="{css}">{picture}<figcaption><b>{e(card.title) or e(card.listing_id)}</b>'
        f"{score}{details}<br>{e(card.listing_id)}</figcaption></figure>"
    )


def _projection(points: pd.DataFrame) -> str:
    if points.empty:
        return "<p>No vectors to project.</p>"
    categories = list(points["category"].value_counts().index)
    colour = {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(categories)}
    span_x = np.ptp(points["x"]) or 1.0
    span_y = np.ptp(points["y"]) or 1.0
    x = _PAD + (points["x"] - points["x"].min()) / span_x * (_PLOT_W - 2 * _PAD)
    y = _PAD + (points["y"].max() - points["y"]) / span_y * (_PLOT_H - 2 * _PAD)
    dots = "".join(
        f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{colour[c]}" fill-opacity="0.75">'
        f"<title>{html.escape(t or i)} ({html.escape(c)})</title></circle>"
        for cx, cy, c, t, i in zip(x, y, points["category"], points["title"], points["listing_id"])
    )
    legend = "".join(f'<span><i style="background:{colour[c]}"></i>{html.escape(c)}</span>' for c in categories)
    return (
        f'<svg width="{_PLOT_W}" height="{_PLOT_H}" viewBox="0 0 {_PLOT_W} {_PLOT_H}" role="img" '
        f'style="border:1px solid #ddd;background:#fff">{dots}</svg><div class="legend">{legend}</div>'
    )


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}" if float(value).is_integer() and value > 1 else f"{value:.3f}"


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
