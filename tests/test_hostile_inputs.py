"""The job over a hostile corpus (tests/hostile_corpus.py) mixed into a normal catalogue, run as MLOps
runs it (`jobs/embed_listings.main`): no crash, no lost rows, every bad row explained; and the same
corpus under a strict error-rate gate: a failed run that changes no table."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from deltalake import DeltaTable

from depop_embed import photos, pipeline, sources
from depop_embed.sample_catalogue import write_catalogue
from depop_embed.tables import IMAGE_TABLE, LISTING_TABLE, TABLES, TEXT_TABLE
from hostile_corpus import (
    MAX_BYTES, MAX_IMAGE_PIXELS, REFUSED_PHOTO, allowed_prefixes, read_jsonl, write_corpus, write_jsonl,
)

from conftest import ROOT, TINY_MODEL, job_overrides, make_config, read_delta

MAX_CHARS = 2000  # text.max_chars in conf/local.yaml
LENIENT, STRICT = 0.3, 0.05


def load_job():
    spec = importlib.util.spec_from_file_location("embed_listings", ROOT / "jobs" / "embed_listings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_args(corpus, server, out, engine: str, max_error_rate: float, *flags: str) -> list[str]:
    overrides = [
        *job_overrides(out, corpus.listings_path, corpus.images_path, engine),
        f"images.allowed_uri_prefixes={allowed_prefixes(corpus, server)}",
        "images.fetch.allow_private_networks=true",  # the remote cases' server is on 127.0.0.1
        f"encode.max_image_pixels={MAX_IMAGE_PIXELS}",
        "encode.image_batch_size=16",
        f"images.fetch.max_bytes={MAX_BYTES}",
        "images.fetch.timeout_s=0.5",
        "images.fetch.retries=2",
        "images.fetch.backoff_s=0.05",
        f"thresholds.max_error_rate={max_error_rate}",
    ]
    return ["--config", str(ROOT / "conf" / "local.yaml"), *[arg for o in overrides for arg in ("--set", o)], *flags]


def table(out, spec) -> pd.DataFrame:
    return read_delta(out / "tables" / spec.name).to_pandas()


def versions(out) -> dict[str, int]:
    return {spec.name: DeltaTable(str(out / "tables" / spec.name)).version() for spec in TABLES}


@pytest.fixture(scope="module")
def corpus_run(spark, engine, photo_server, tmp_path_factory):
    """The corpus embedded once per engine by the job, with a gate it passes; (corpus, output folder,
    engine, exit code, stdout)."""
    tmp = tmp_path_factory.mktemp(f"hostile_{engine}")
    corpus = write_corpus(tmp / "src", photo_server)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = load_job().main(job_args(corpus, photo_server, tmp / "out", engine, LENIENT))
    return corpus, tmp / "out", engine, code, stdout.getvalue()


def test_the_corpus_is_big_and_hostile_enough(corpus_run):
    corpus, *_ = corpus_run
    hostile = len(corpus.photos) + len(corpus.texts) + sum(v for k, v in corpus.counts.items() if not k.endswith("_read"))
    assert hostile >= 30 and len(corpus.good_photo_ids) >= 100 and len(corpus.good_listing_ids) >= 100
    assert {c.expected for c in corpus.photos.values()} >= {
        None, "corrupt", "empty", "unsupported_format", "too_large", "bad_aspect_ratio", "missing",
        "not_found", "http_4xx", "http_5xx", "timeout", "truncated", "not_an_image", "forbidden_uri",
    }


def test_the_run_succeeds_and_reports_what_the_sources_dropped(corpus_run):
    corpus, _, _, code, stdout = corpus_run
    assert code == 0, stdout
    assert sources.describe_counts(corpus.counts) in stdout


def test_every_photo_row_is_present_good_ones_embedded_bad_ones_explained(corpus_run):
    corpus, out, _, _, _ = corpus_run
    images = table(out, IMAGE_TABLE).set_index("image_id")
    assert sorted(images.index) == sorted(corpus.good_photo_ids + list(corpus.photos))
    for image_id in corpus.good_photo_ids:
        assert images.loc[image_id, "status"] == "ok", (image_id, images.loc[image_id, "error"])
    for image_id, case in corpus.photos.items():
        row = images.loc[image_id]
        if case.expected is None:
            assert row["status"] == "ok" and row["error"] is None, (case.name, row["error"])
        else:
            assert row["status"] == "error" and row["embedding"] is None, case.name
            assert row["error"].split(":")[0] == case.expected, (case.name, row["error"])
            assert photos.is_transient(row["error"]) == (case.expected in photos.TRANSIENT_CODES)
    ok = np.stack(images.loc[images["status"] == "ok", "embedding"].to_list())
    assert np.isfinite(ok).all()
    np.testing.assert_allclose(np.linalg.norm(ok, axis=1), 1.0, atol=1e-4)
    # The photo row whose newer version replaced a missing upload is embedded from the newer file.
    assert images.loc[corpus.good_photo_ids[0], "image_uri"].endswith(".jpg")
    assert "an_old_upload_that_is_gone" not in images.loc[corpus.good_photo_ids[0], "image_uri"]


def test_decoded_hostile_photos_embed_as_the_photo_they_show(corpus_run):
    """16-bit, 1-bit, transparent, animated, EXIF-rotated, mislabelled and remote photos: the stored
    vector is open_clip's for the upright RGB image the case defines (built without depop_embed)."""
    corpus, out, _, _, _ = corpus_run
    open_clip.add_model_config(TINY_MODEL)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("depop-tiny-clip")
    images = table(out, IMAGE_TABLE).set_index("image_id")
    checked = 0
    for image_id, case in corpus.photos.items():
        if case.upright is None:
            continue
        with torch.inference_mode():
            expected = model.eval().encode_image(preprocess(case.upright.convert("RGB")).unsqueeze(0))[0].numpy()
        stored = np.asarray(images.loc[image_id, "embedding"])
        cosine = stored @ expected / np.linalg.norm(expected)
        assert cosine >= 0.9999, (case.name, cosine)
        checked += 1
    assert checked >= 12


def test_every_listing_has_a_text_row_hostile_text_normalised_or_explained(corpus_run):
    corpus, out, _, _, _ = corpus_run
    texts = table(out, TEXT_TABLE).set_index("listing_id")
    photo_listings = {image_id.rsplit("-", 1)[0] for image_id in corpus.photos}
    assert sorted(texts.index) == sorted(corpus.good_listing_ids + list(corpus.texts) + list(photo_listings))
    for listing_id, case in corpus.texts.items():
        row = texts.loc[listing_id]
        if case.expected is None:
            assert row["status"] == "ok" and np.isfinite(row["embedding"]).all(), case.name
            assert len(row["text"]) <= MAX_CHARS
            if case.text is not None:
                assert row["text"] == case.text, case.name
        else:
            assert row["status"] == "error" and row["error"].startswith(f"{case.expected}:"), case.name
    assert texts.loc["HT-megabyte_description", "text"].startswith("Coat. warm wool warm wool")
    for listing_id, title in corpus.latest_title.items():
        assert texts.loc[listing_id, "text"].startswith(title)


def test_listings_with_only_bad_photos_fall_back_to_their_text(corpus_run):
    corpus, out, _, _, _ = corpus_run
    fused = table(out, LISTING_TABLE).set_index("listing_id")
    texts = table(out, TEXT_TABLE).set_index("listing_id")
    for image_id, case in corpus.photos.items():
        listing_id = image_id.rsplit("-", 1)[0]
        row = fused.loc[listing_id]
        if case.expected is None:
            assert row["n_images"] == 1
        else:
            assert row["n_images"] == 0 and row["image_embedding"] is None
            np.testing.assert_allclose(row["multimodal_embedding"], texts.loc[listing_id, "embedding"], atol=1e-6)


def test_refused_uris_are_error_rows_never_opened_and_counted(corpus_run, photo_server):
    corpus, out, _, code, stdout = corpus_run
    images = table(out, IMAGE_TABLE).set_index("image_id")
    refused = [image_id for image_id, case in corpus.photos.items() if case.expected == "forbidden_uri"]
    assert len(refused) == 8 and code == 0
    assert (images.loc[refused, "status"] == "error").all() and images.loc[refused, "content_hash"].isna().all()
    # Only the redirect's first hop, on the allowed host, reached the server; its target never did.
    asked = {path: n for path, n in photo_server.hits.items() if REFUSED_PHOTO in path}
    assert list(asked) == [f"/redirect/{photo_server.url(f'/photo/{REFUSED_PHOTO}', 'localhost')}"], asked
    assert f"refused {len(refused)} photo URIs unopened (forbidden_uri)" in stdout


def test_a_strict_gate_fails_the_run_with_rate_reasons_and_examples_and_changes_no_table(corpus_run, photo_server, caplog):
    corpus, out, engine, _, _ = corpus_run
    before = versions(out)
    with caplog.at_level(logging.ERROR):  # a full refresh: the gate judges the rows a run encodes
        code = load_job().main(job_args(corpus, photo_server, out, engine, STRICT, "--full-refresh"))
    assert code == 1
    message = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    n_photos = len(corpus.good_photo_ids) + len(corpus.photos)
    bad = [(image_id, c.expected) for image_id, c in corpus.photos.items() if c.expected]
    rate = len(bad) / n_photos
    assert f"listing_image_embeddings: error rate {rate:.1%} ({len(bad)} of {n_photos} rows)" in message
    assert f"is over thresholds.max_error_rate {STRICT:.1%}" in message
    by_reason = pd.Series([code for _, code in bad]).value_counts()
    top = by_reason.sort_index().sort_values(ascending=False, kind="stable").index[0]
    examples = sorted(f"{i.rsplit('-', 1)[0]}/{i}" for i, code in bad if code == top)[:3]
    assert f"{top} x{by_reason[top]} (e.g. {', '.join(examples)})" in message
    assert versions(out) == before


def test_a_photo_that_times_out_on_a_rerun_keeps_its_good_vector(spark, engine, photo_server, tmp_path):
    catalogue = write_catalogue(tmp_path / "src", n_listings=3, seed=4, max_photos=1, photo_size=(64, 80))
    rows = read_jsonl(catalogue.images_path)
    remote = rows[0]
    photo_server.add("rerun.png", (tmp_path / "src" / remote["uri"]).read_bytes(), "image/png")
    remote["uri"] = photo_server.url("/photo/rerun.png")
    write_jsonl(catalogue.images_path, rows)
    # The rerun encodes this one photo: its timeout is 100% of the rows the gate judges.
    cfg = make_config(
        tmp_path, "images.fetch.timeout_s=0.3", "images.fetch.retries=1", "images.fetch.backoff_s=0.01",
        f'images.allowed_uri_prefixes=["{tmp_path / "src"}", "{photo_server.url("/")}"]',
        "images.fetch.allow_private_networks=true",
        "thresholds.max_error_rate=1", listings=catalogue.listings_path, images=catalogue.images_path, engine=engine,
    )
    pipeline.run(spark, cfg)
    key = (remote["listing_id"], remote["image_id"])
    before = table(tmp_path, IMAGE_TABLE).set_index(["listing_id", "image_id"]).loc[key]
    assert before["status"] == "ok"

    # The row changes upstream (so the photo is selected again) while its host is down.
    remote["updated_at"] = "2030-01-01T00:00:00+00:00"
    write_jsonl(catalogue.images_path, rows)
    photo_server.outages["rerun.png"] = 2.0
    try:
        summary = pipeline.run(spark, cfg)
    finally:
        del photo_server.outages["rerun.png"]
    assert summary.stats["image_errors_transient"] == 1  # it was encoded, and timed out
    assert summary.stats["images_kept_after_transient_error"] == 1
    after = table(tmp_path, IMAGE_TABLE).set_index(["listing_id", "image_id"]).loc[key]
    assert after["status"] == "ok" and after["error"] is None
    np.testing.assert_array_equal(after["embedding"], before["embedding"])
    assert after["embedded_at"] == before["embedded_at"]
