"""The batching and per-row error handling of the encoder UDFs, with tiny numpy 'models'."""

import numpy as np
import pandas as pd

from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from conftest import TINY_MODEL
from depop_embed.config import FetchConfig, ModelConfig
from depop_embed.photos import decode_pixels
from depop_embed.uri_rules import build_rules
from depop_embed.udfs import (
    CounterParam, EncodeSettings, _batches, _encode_image_batch, _encode_rows, _encode_text_batch, _one_ahead,
    _start_loading, encode_images,
)


def settings(**changes) -> EncodeSettings:
    """What a worker gets, for the tiny model on the CPU."""
    base = dict(
        model=ModelConfig(name="depop-tiny-clip", seed=0, config_path=TINY_MODEL), package_dir=None, image_batch_size=4,
        text_batch_size=4, torch_threads=2, decode_threads=2, max_image_pixels=50_000_000,
        fetch=FetchConfig(timeout_s=2, retries=0, backoff_s=0), uri_rules=in_folder("/nowhere"), jpeg_draft=True,
        device_jpeg_decode=False,
    )
    return EncodeSettings(**{**base, **changes})


def fake_model(bad_rows=(), nan_rows=()):
    """Encodes row i as a unit vector; fails any batch holding a bad row; NaN for nan rows."""

    def encode(rows):
        if any(i in bad_rows for i in rows):
            raise RuntimeError("CUDA out of memory")
        out = np.zeros((len(rows), 4), dtype=np.float32)
        for j, i in enumerate(rows):
            out[j, i % 4] = np.nan if i in nan_rows else 1.0
        return out

    return encode


def test_a_failing_batch_is_retried_row_by_row_so_only_the_bad_row_fails():
    vectors, errors = _encode_rows(fake_model(bad_rows={2}, nan_rows={3}), [0, 1, 2, 3, 5], n=6)
    assert errors[2].startswith("encode_failed: RuntimeError: CUDA out of memory")
    assert errors[3].startswith("non_finite") and vectors[3] is None
    assert vectors[4] is None and errors[4] is None  # not asked for (e.g. a photo that did not decode)
    for i in (0, 1, 5):
        assert errors[i] is None and vectors[i][i % 4] == 1.0


def test_nothing_to_encode():
    assert _encode_rows(fake_model(), [], n=2) == ([None, None], [None, None])


def test_batches_cover_every_row_once_in_order():
    frame = pd.DataFrame({"x": range(10)}, index=range(100, 110))
    batches = list(_batches(frame, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert pd.concat(batches)["x"].tolist() == list(range(10))
    assert batches[1].index.tolist() == [0, 1, 2, 3]


def test_the_next_item_is_started_before_this_one_is_handed_out():
    events = []

    def start(item):
        events.append(f"start {item}")
        return item * 10

    for item, started in _one_ahead(iter([1, 2, 3]), start):
        events.append(f"use {item}:{started}")
    assert events == ["start 1", "start 2", "use 1:10", "start 3", "use 2:20", "use 3:30"]
    assert list(_one_ahead(iter([]), start)) == []


def test_counters_merge_nested_dicts():
    param = CounterParam()
    total = param.zero({})
    param.addInPlace(total, {"model_loads": 1, "model_loads_by_worker": {"11": 1}})
    param.addInPlace(total, {"model_loads": 1, "model_loads_by_worker": {"12": 1}, "images": 8})
    assert total == {"model_loads": 2, "model_loads_by_worker": {"11": 1, "12": 1}, "images": 8}


class FakeEncoder:
    """The Encoder interface over numpy: a photo's vector is its mean colour, a text's its length."""

    def load_photo(self, data, max_pixels, draft=True, device_jpeg=False):
        return decode_pixels(data, max_pixels)

    def photo_input(self, images):
        return torch.tensor(np.stack([image.mean(axis=(0, 1), dtype=np.float32) for image in images]))

    def encode_images(self, pixels):
        return torch.nn.functional.normalize(pixels, dim=-1).numpy()

    def encode_texts(self, texts):
        return np.array([[1.0, len(t)] for t in texts], dtype=np.float32) / np.hypot(1.0, [len(t) for t in texts])[:, None]


def in_folder(*folders):
    return build_rules(tuple(str(f) for f in folders), allow_private_networks=False)


def test_image_batch_keeps_good_rows_and_explains_bad_ones(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.jpg", quality=100)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    uris = [str(tmp_path / "red.jpg"), str(tmp_path / "missing.jpg"), str(tmp_path / "broken.jpg")]
    batch = pd.DataFrame({"listing_id": ["A", "B", "C"], "image_id": ["a", "b", "c"], "position": [0, 0, 1], "uri": uris})
    encoder = FakeEncoder()
    with ThreadPoolExecutor(2) as pool:
        out = _encode_image_batch(
            batch, encoder, _start_loading(batch, encoder, pool, settings(max_image_pixels=10_000, uri_rules=in_folder(tmp_path)))
        )
    assert out["status"].tolist() == ["ok", "error", "error"]
    assert out["error"][0] is None and out["error"][1].startswith("missing:") and out["error"][2].startswith("corrupt:")
    np.testing.assert_allclose(out["embedding"][0], [1.0, 0.0, 0.0], atol=0.01)
    assert out["embedding"][1] is None and out["embedding"][2] is None
    assert len(out["content_hash"][0]) == 64 and out["content_hash"][1] is None and len(out["content_hash"][2]) == 64
    assert out["image_uri"].tolist() == uris


def test_text_batch_marks_empty_texts_and_encodes_the_rest():
    batch = pd.DataFrame({"listing_id": ["A", "B", "C"], "text": ["abc", "", None], "text_hash": ["h1", "h2", "h3"], "template_version": "v1"})
    out = _encode_text_batch(batch, FakeEncoder())
    assert out["status"].tolist() == ["ok", "error", "error"]
    assert out["error"][1] == out["error"][2] == "empty_text: no listing field has text"
    np.testing.assert_allclose(out["embedding"][0], np.array([1.0, 3.0]) / np.hypot(1, 3), rtol=1e-6)
    assert out["text_hash"].tolist() == ["h1", "h2", "h3"]


def test_image_errors_and_transient_ones_are_counted(spark, photo_server, tmp_path):
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "green.png")
    photo_server.add("green.png", (tmp_path / "green.png").read_bytes(), "image/png")
    uris = [
        str(tmp_path / "green.png"),
        photo_server.url("/photo/green.png"),
        photo_server.url("/status/503/green.png"),  # transient
        photo_server.url("/status/404/green.png"),
        str(tmp_path / "missing.png"),
        photo_server.url("/notype/green.png"),  # outside the allow-list: refused unrequested
    ]
    frame = pd.DataFrame({"listing_id": list("ABCDEF"), "image_id": list("abcdef"), "position": 0, "uri": uris})
    rules = build_rules((str(tmp_path), photo_server.url("/photo/"), photo_server.url("/status/")), True)
    stats = spark.sparkContext.accumulator({}, CounterParam())
    out = pd.concat(encode_images(settings(max_image_pixels=10_000, uri_rules=rules), stats)(iter([frame])))
    assert out["status"].tolist() == ["ok", "ok", "error", "error", "error", "error"]
    assert [e.split(":")[0] for e in out["error"][2:]] == ["http_5xx", "not_found", "missing", "forbidden_uri"]
    assert stats.value["images"] == 6 and stats.value["image_batches"] == 2
    assert stats.value["image_errors"] == 4 and stats.value["image_errors_transient"] == 1
    assert stats.value["images_refused"] == 1 and photo_server.hits["/notype/green.png"] == 0


def test_device_jpeg_decode_gives_the_host_paths_rows(spark, tmp_path):
    from hostile_corpus import encoded

    from conftest import SAMPLE

    good = sorted((SAMPLE / "photos").glob("*.jpg"))[:6] + sorted((SAMPLE / "photos").glob("*.png"))[:2]
    jpeg = good[0].read_bytes()
    # Header and end marker intact, garbage between: it reaches the device decoder, then Pillow says 'corrupt'.
    (tmp_path / "garbage.jpg").write_bytes(jpeg[:600] + bytes(range(256)) * 8 + b"\xff\xd9")
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "cmyk.jpg").write_bytes(encoded(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG"))
    uris = [str(p) for p in good] + [str(tmp_path / n) for n in ("garbage.jpg", "cut.jpg", "cmyk.jpg")]
    frame = pd.DataFrame({"listing_id": "A", "image_id": [str(i) for i in range(len(uris))], "position": 0, "uri": uris})
    stats = spark.sparkContext.accumulator({}, CounterParam())
    host, device = (
        pd.concat(encode_images(settings(image_batch_size=16, device_jpeg_decode=on, uri_rules=in_folder(tmp_path, SAMPLE)), stats)(iter([frame])))
        for on in (False, True)
    )
    assert host["status"].tolist() == device["status"].tolist() == ["ok"] * 8 + ["error", "error", "ok"]
    assert [e.split(":")[0] for e in device["error"][8:10]] == ["corrupt", "corrupt"]
    for a, b in zip(host["embedding"][host["status"] == "ok"], device["embedding"][device["status"] == "ok"]):
        assert float(np.dot(a, b)) >= 0.9999


def test_decode_and_torch_threads_default_to_the_cpus_of_a_task(spark, tmp_path):
    from conftest import make_config
    from depop_embed.pipeline import _encode_settings

    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    cfg = make_config(tmp_path, "encode.decode_threads=0", "encode.torch_threads=0")
    resolved = _encode_settings(spark, cfg, cfg.model, None)
    assert resolved.decode_threads == resolved.torch_threads == task_cpus
    cfg = make_config(tmp_path, "encode.decode_threads=6", "encode.device_jpeg_decode=true")
    resolved = _encode_settings(spark, cfg, cfg.model, None)
    assert resolved.decode_threads == 6 and resolved.device_jpeg_decode
