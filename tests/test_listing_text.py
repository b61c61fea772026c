import math

import numpy as np
import pandas as pd

from depop_embed.config import TextConfig
from depop_embed.listing_text import clean_field, render, render_frame, text_hash

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


def test_scripts_styles_and_comments_are_dropped_with_their_content():
    assert clean_field("<script>alert('x')</script>Nice<style>p {color: red}</style> top<!-- seo -->", 100) == "Nice top"
    assert clean_field("I <3 it, size <10", 100) == "I <3 it, size <10"  # a '<' that opens no tag is text


def test_bidi_overrides_go_and_joiners_stay():
    assert clean_field("abc\u202edef\u202c", 100) == "abc def"
    assert clean_field("👩\u200d👩\u200d👧 set", 100) == "👩\u200d👩\u200d👧 set"  # one emoji, not three
    assert clean_field("می\u200cخواهم", 100) == "می\u200cخواهم"  # Persian needs its zero-width non-joiner


def test_lone_surrogates_and_private_use_do_not_reach_the_hash():
    text = clean_field("a\ud800b\ue000c", 100)
    assert text == "a b c"
    assert len(text_hash(text, "v1")) == 64  # a lone surrogate would fail to encode as UTF-8


def test_null_likes_and_odd_types_never_fail_the_template():
    for null in (None, math.nan, pd.NA, pd.NaT, float("nan")):
        assert clean_field(null, 10) == ""
    listing = {"title": ["a", "list"], "brand": b"bytes", "size": 10.5, "description": {"k": "v"}}
    assert render(listing, CFG) == "['a', 'list']. b'bytes'. size 10.5. {'k': 'v'}"
    assert render({"title": "{brand} {0}", "brand": "}{"}, CFG) == "{brand} {0}. }{"  # braces in values are text


def test_megabyte_fields_are_cut_before_the_regexes():
    # Markup that only closes megabytes later is never scanned to its end: what is past the bound is gone.
    description = "start <b " + "x" * 5_000_000 + "> end"
    text = clean_field(description, 200)
    assert text.startswith("start <b xxx") and len(text) == 200 and "end" not in text


def test_hostile_texts_tokenize_and_encode_to_unit_vectors():
    from depop_embed.config import ModelConfig
    from depop_embed.encoders import build_encoder

    from conftest import TINY_MODEL

    encoder = build_encoder(ModelConfig(name="depop-tiny-clip", seed=0, config_path=TINY_MODEL), "cpu")
    texts = [
        clean_field("Y2K top ✨👗 👩\u200d👩\u200d👧", 2000),
        clean_field("فستان أحمر מידה M", 2000),
        clean_field("ＮＩＫＥ\x00<b>hoodie</b>", 2000),
        clean_field("word " * 1_000_000, 2000),
    ]
    tokens = encoder.tokenizer(texts)
    context = tokens.shape[1]
    assert tokens.shape[0] == 4 and (tokens[:, 0] == tokens[0, 0]).all()  # every text starts with <start>
    assert (tokens[1] != 0).sum() > 4  # the Arabic and Hebrew letters became tokens, not nothing
    assert (tokens[3] != 0).sum() == context  # the long text is truncated at the context length
    vectors = encoder.encode_texts(texts)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
