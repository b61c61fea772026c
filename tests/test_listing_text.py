import math

from depop_embed.config import TextConfig
from depop_embed.listing_text import clean_field, render, render_frame, text_hash

import pandas as pd

CFG = TextConfig(template=("{title}", "{brand}", "size {size}", "{description}"), separator=". ", max_chars=200)


def test_segments_with_only_empty_fields_are_left_out():
    listing = {"title": "Nike hoodie", "brand": None, "size": float("nan"), "description": "  Cosy,\n\twarm  "}
    assert render(listing, CFG) == "Nike hoodie. Cosy, warm"


def test_all_fields_present():
    listing = {"title": "Levi's 501", "brand": "Levi's", "size": 32.0, "description": "Classic"}
    assert render(listing, CFG) == "Levi's 501. Levi's. size 32. Classic"


def test_html_entities_control_characters_and_width_forms_are_normalised():
    assert clean_field("<b>Bold</b>&amp;<br/>new\x00line\u200b", 100) == "Bold & new line"
    assert clean_field("ＮＩＫＥ", 100) == "NIKE"  # NFKC folds full-width letters
    assert clean_field("مرحبا 👗", 100) == "مرحبا 👗"  # right-to-left text and emoji survive


def test_nulls_never_fail():
    assert clean_field(None, 10) == "" and clean_field(math.nan, 10) == "" and clean_field(pd.NaT, 10) == ""
    assert render({}, CFG) == ""


def test_long_text_is_capped():
    listing = {"title": "T", "description": "word " * 1_000_000}
    text = render(listing, CFG)
    assert len(text) <= CFG.max_chars and text.startswith("T. word word")


def test_hash_covers_text_and_template_version():
    assert text_hash("a", "v1") == text_hash("a", "v1")
    assert text_hash("a", "v1") != text_hash("a", "v2")
    assert text_hash("a", "v1") != text_hash("b", "v1")


def test_render_frame():
    frame = pd.DataFrame({"listing_id": ["1", "2"], "title": ["A", None], "brand": [None, "B"], "size": [None, None], "description": [None, None]})
    out = render_frame(frame, CFG)
    assert out["text"].tolist() == ["A", "B"]
    assert out["text_hash"].tolist() == [text_hash("A", "v1"), text_hash("B", "v1")]
    assert (out["template_version"] == "v1").all()
