"""The text a listing is embedded as: a versioned template over its fields, normalised and capped.

User text is hostile (nulls, HTML, control characters, megabytes of description), so every field is
cleaned before it reaches the template and the template never fails on a missing value. The hash is
over the exact text embedded plus the template version, so a change to either is seen as a change.
"""

from __future__ import annotations

import hashlib
import html
import re
import string
import unicodedata
from typing import Any, Mapping

import pandas as pd

from depop_embed.config import TextConfig

# Script and style bodies are code, not listing text; comments and tags are markup.
_HIDDEN = re.compile(r"<(script|style)\b[^>]{0,1000}>.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"</?[A-Za-z!/][^<>]{0,1000}>")
_SPACE = re.compile(r"\s+")
# Zero-width (non-)joiners are format characters that carry meaning: emoji sequences (👩‍👧), Persian words.
_JOINERS = {"\u200c", "\u200d"}


def clean_field(value: Any, max_chars: int) -> str:
    """One field as plain single-line text: '' for null/NaN, HTML and control characters removed."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    # Bound the work on megabyte fields before the regexes: markup and NFKC change the length, so
    # keep a margin over max_chars, and cut again at the end.
    text = str(value)[: max_chars * 4]
    text = _TAG.sub(" ", _HIDDEN.sub(" ", html.unescape(text)))
    text = _SPACE.sub(" ", unicodedata.normalize("NFKC", text))
    if not text.isprintable():  # control, format (bidi overrides, zero-width), surrogate, private-use
        text = _SPACE.sub(" ", "".join(" " if _is_other(ch) else ch for ch in text))
    return text.strip()[:max_chars]


def _is_other(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "C" and ch not in _JOINERS


def render(fields: Mapping[str, Any], cfg: TextConfig) -> str:
    """Fill each template segment; leave out segments whose fields are all empty."""
    parts = []
    for segment in cfg.template:
        values = {name: clean_field(fields.get(name), cfg.max_chars) for name in _field_names(segment)}
        if any(values.values()):
            parts.append(segment.format(**values).strip())
    return cfg.separator.join(parts)[: cfg.max_chars].strip()


def text_hash(text: str, template_version: str) -> str:
    return hashlib.sha256(f"{template_version}\x00{text}".encode("utf-8")).hexdigest()


def render_frame(listings: pd.DataFrame, cfg: TextConfig) -> pd.DataFrame:
    """listing rows -> (listing_id, text, text_hash, template_version)."""
    texts = [render(row, cfg) for row in listings.to_dict("records")]
    return pd.DataFrame({
        "listing_id": listings["listing_id"].to_numpy(),
        "text": texts,
        "text_hash": [text_hash(t, cfg.template_version) for t in texts],
        "template_version": cfg.template_version,
    })


def _field_names(segment: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(segment) if name]
