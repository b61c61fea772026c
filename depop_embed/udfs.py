"""Encoding inside Spark: functions for `DataFrame.mapInPandas`.

Each Python worker builds the encoder once (`worker_encoder`) and reuses it for every batch and task it
runs. Rows are cut into model batches; a photo that cannot be read or decoded, or a text that is
empty, becomes an error row and the rest of its batch is still encoded. Counters (model loads per
worker process, batches, rows) travel back to the driver in a Spark accumulator.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
from pyspark.accumulators import AccumulatorParam

from depop_embed.config import FetchConfig, ModelConfig
from depop_embed.photos import PhotoError, is_refused, is_transient
from depop_embed.uri_rules import UriRules

IMAGE_OUTPUT_SCHEMA = (
    "listing_id string, image_id string, position int, image_uri string, content_hash string, "
    "embedding array<float>, status string, error string"
)
TEXT_OUTPUT_SCHEMA = (
    "listing_id string, text string, text_hash string, template_version string, "
    "embedding array<float>, status string, error string"
)


class CounterParam(AccumulatorParam):
    """Nested dicts of counts, summed key by key."""

    def zero(self, value):
        return {}

    def addInPlace(self, total, more):
        for key, value in more.items():
            if isinstance(value, dict):
                self.addInPlace(total.setdefault(key, {}), value)
            else:
                total[key] = total.get(key, 0) + value
        return total


@dataclass(frozen=True)
class EncodeSettings:
    """What a worker needs to know; shipped to the workers inside the UDF closure."""

    model: ModelConfig
    # Where the driver downloaded a registered model (a path every worker can read), else None.
    package_dir: str | None
    image_batch_size: int
    text_batch_size: int
    torch_threads: int
    decode_threads: int
    max_image_pixels: int
    fetch: FetchConfig
    uri_rules: UriRules  # which photo URIs may be opened (sources.photo_rules)
    jpeg_draft: bool
    device_jpeg_decode: bool


_ENCODERS: dict[tuple, Any] = {}


def worker_encoder(settings: EncodeSettings, stats) -> Any:
    """This process's encoder for the model, built on first use."""
    from depop_embed import encoders

    device = encoders.resolve_device(settings.model.device, _task_gpu())
    key = (settings.model, settings.package_dir, device)
    if key not in _ENCODERS:
        import torch

        torch.set_num_threads(settings.torch_threads)
        _ENCODERS[key] = encoders.build_encoder(settings.model, device, settings.package_dir)
        stats.add({"model_loads": 1, "model_loads_by_worker": {str(os.getpid()): 1}})
    return _ENCODERS[key]


def encode_images(settings: EncodeSettings, stats) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas function: (listing_id, image_id, position, uri) -> IMAGE_OUTPUT_SCHEMA rows.

    Photos are read and decoded (the host's half, `Encoder.load_photo`) in a thread pool one batch
    ahead: the next batch decodes while the model encodes this one (Pillow and torch both release the
    GIL). The rest, resize to normalise, runs as a batch on the model's device (`Encoder.photo_input`).
    """

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        encoder = None  # fetched on the first batch, so an empty partition builds nothing
        with ThreadPoolExecutor(settings.decode_threads) as pool:

            def start_loading(batch: pd.DataFrame) -> list[Future]:
                nonlocal encoder
                encoder = encoder or worker_encoder(settings, stats)
                return _start_loading(batch, encoder, pool, settings)

            batches = (batch for frame in frames for batch in _batches(frame, settings.image_batch_size))
            for batch, loading in _one_ahead(batches, start_loading):
                out = _encode_image_batch(batch, encoder, loading)
                stats.add({
                    "image_batches": 1,
                    "images": len(out),
                    "image_errors": int((out["status"] == "error").sum()),
                    "image_errors_transient": sum(map(is_transient, out["error"])),
                    "images_refused": sum(map(is_refused, out["error"])),
                })
                yield out

    return run


def encode_texts(settings: EncodeSettings, stats) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas function: (listing_id, text, text_hash, template_version) -> TEXT_OUTPUT_SCHEMA rows."""

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        encoder = None
        for frame in frames:
            for batch in _batches(frame, settings.text_batch_size):
                encoder = encoder or worker_encoder(settings, stats)
                out = _encode_text_batch(batch, encoder)
                stats.add({"text_batches": 1, "texts": len(out), "text_errors": int((out["status"] == "error").sum())})
                yield out

    return run


def _start_loading(batch: pd.DataFrame, encoder, pool: ThreadPoolExecutor, settings: EncodeSettings) -> list[Future]:
    # Reading and decoding run in threads: Pillow releases the GIL while it decodes, sockets while they wait.
    return [pool.submit(_load_photo, uri, encoder, settings) for uri in batch["uri"]]


def _encode_image_batch(batch: pd.DataFrame, encoder, loading: list[Future]) -> pd.DataFrame:
    loaded = [future.result() for future in loading]
    decoded = [i for i, (_, pixels, _) in enumerate(loaded) if pixels is not None]
    vectors, errors = _encode_rows(
        lambda rows: encoder.encode_images(encoder.photo_input([loaded[i][1] for i in rows])), decoded, len(batch)
    )
    errors = [encode_error or load_error for encode_error, (_, _, load_error) in zip(errors, loaded)]
    return _output(batch[["listing_id", "image_id", "position"]], vectors, errors).assign(
        image_uri=batch["uri"].to_numpy(),
        content_hash=[digest for digest, _, _ in loaded],
    )


def _encode_text_batch(batch: pd.DataFrame, encoder) -> pd.DataFrame:
    texts = batch["text"].fillna("").tolist()
    non_empty = [i for i, text in enumerate(texts) if text]
    vectors, errors = _encode_rows(lambda rows: encoder.encode_texts([texts[i] for i in rows]), non_empty, len(batch))
    errors = [error if text else "empty_text: no listing field has text" for error, text in zip(errors, texts)]
    return _output(batch[["listing_id", "text", "text_hash", "template_version"]], vectors, errors)


def _batches(frame: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for start in range(0, len(frame), size):
        yield frame.iloc[start : start + size].reset_index(drop=True)


def _one_ahead(items: Iterator[Any], start: Callable[[Any], Any]) -> Iterator[tuple[Any, Any]]:
    """(item, start(item)) pairs, each handed out only once the next item's `start` has been called,
    so whatever `start` sets going for the next item runs while the caller works on this one."""
    pending = None
    for item in items:
        started = (item, start(item))
        if pending is not None:
            yield pending
        pending = started
    if pending is not None:
        yield pending


def _load_photo(uri: str, encoder, settings: EncodeSettings) -> tuple[str | None, Any, str | None]:
    """uri -> (content hash, `Encoder.load_photo`'s pixels or JPEG, None) or (hash or None, None, error)."""
    from depop_embed import photos

    digest = None
    try:
        data = photos.read_bytes(uri, settings.fetch, settings.uri_rules)
        digest = photos.content_hash(data)
        pixels = encoder.load_photo(data, settings.max_image_pixels, settings.jpeg_draft, settings.device_jpeg_decode)
        return digest, pixels, None
    except PhotoError as exc:
        return digest, None, str(exc)
    except Exception as exc:  # a failure past decoding (a colour conversion) must not take the batch down
        return digest, None, f"preprocess_failed: {type(exc).__name__}: {exc}"


def _encode_rows(encode: Callable[[list[int]], np.ndarray], rows: list[int], n: int) -> tuple[list, list]:
    """Encode `rows` of a batch of `n`; on a failed batch, retry one by one so only bad rows fail."""
    vectors: list = [None] * n
    errors: list = [None] * n
    if not rows:
        return vectors, errors
    try:
        groups = [(rows, encode(rows))]
    except Exception:
        groups = []
        for i in rows:
            try:
                groups.append(([i], encode([i])))
            except PhotoError as exc:  # a JPEG the device decoder refused, and the host found corrupt
                errors[i] = str(exc)
            except Exception as exc:
                errors[i] = f"encode_failed: {type(exc).__name__}: {exc}"
    for idx, matrix in groups:
        for i, vector in zip(idx, matrix):
            if np.isfinite(vector).all():
                vectors[i] = vector
            else:
                errors[i] = "non_finite: the model returned NaN or infinity"
    return vectors, errors


def _output(keys: pd.DataFrame, vectors: list, errors: list) -> pd.DataFrame:
    return keys.assign(
        embedding=pd.Series(vectors, dtype=object).to_numpy(),
        status=["error" if e else "ok" for e in errors],
        error=errors,
    )


def _task_gpu() -> str | None:
    """The GPU Spark assigned to this task (GPU-aware scheduling), if any."""
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context else None
    return gpus.addresses[0] if gpus and gpus.addresses else None
