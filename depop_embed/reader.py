"""The supported way to read the feature tables: one model's rows (the current model unless one is
named) as Arrow, pandas or Spark, and exact nearest-listing search by a listing or by a text query.

Folder locations are read with delta-rs, no Spark needed; a Unity Catalog location (`catalog.schema`)
is read through the Spark session. A text query is embedded by the same text tower and weights that
produced the table (`encoders.model_config_for` turns the table's `model_id` back into the model).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from depop_embed import encoders, listing_text, registry
from depop_embed.config import Config, ModelConfig, OutputConfig, TextConfig, TrackingConfig
from depop_embed.tables import (
    LISTING_TABLE, TEXT_TABLE, DeltaRsWriter, SparkDeltaWriter, TableWriter, open_writer, sql_literal, table_spec,
)

EMBEDDING_COLUMNS = {"image": "image_embedding", "text": "text_embedding", "multimodal": "multimodal_embedding"}
# Query rows x listings scored at once: 1024 x 8192 float64 scores are 64 MiB, whatever the catalogue.
_QUERY_BLOCK = 1024
_LISTING_BLOCK = 8192


def embedding_column(by: str) -> str:
    """`image` / `text` / `multimodal` -> the listing_embeddings column holding that vector."""
    if by not in EMBEDDING_COLUMNS:
        raise ValueError(f"by: {by!r} is not one of {', '.join(EMBEDDING_COLUMNS)}")
    return EMBEDDING_COLUMNS[by]


@dataclass(frozen=True)
class ListingVectors:
    """One model's vectors of one kind as a matrix, with exact (brute-force) cosine search over them."""

    model_id: str
    column: str  # the listing_embeddings column they came from
    ids: np.ndarray  # (n,) listing ids
    matrix: np.ndarray  # (n, dim) float32, rows L2-normalised
    _row: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    _ordinals: np.ndarray = field(default=None, repr=False, compare=False)  # each row's place in listing_id order

    def __post_init__(self):
        self._row.update({listing_id: i for i, listing_id in enumerate(self.ids)})
        object.__setattr__(self, "_ordinals", np.argsort(np.argsort(self.ids, kind="stable"), kind="stable"))

    def __len__(self) -> int:
        return len(self.ids)

    def vector(self, listing_id: str) -> np.ndarray:
        if listing_id not in self._row:
            raise KeyError(f"listing {listing_id} has no {self.column} for model {self.model_id} (inactive, or not embedded)")
        return self.matrix[self._row[listing_id]]

    def nearest(self, queries: np.ndarray, k: int, exclude: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best listings per query row: (ids, scores), each (m, k), best first; equal scores in
        listing_id order. `exclude[i]` (a listing id, or None) is left out of row i's answers."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        excluded = np.array([self._row.get(e, -1) if e is not None else -1 for e in exclude]) if exclude is not None else None
        k = max(0, min(k, len(self) - (1 if excluded is not None and (excluded >= 0).any() else 0)))
        ids = np.empty((len(queries), k), dtype=object)
        scores = np.empty((len(queries), k), dtype=np.float32)
        for start in range(0, len(queries), _QUERY_BLOCK):
            block = queries[start : start + _QUERY_BLOCK]
            best = RunningTopK(len(block), k, np.int64)
            for first in range(0, len(self), _LISTING_BLOCK):
                last = min(first + _LISTING_BLOCK, len(self))
                block_scores = cosine_scores(block, self.matrix[first:last])
                if excluded is not None:
                    mine = excluded[start : start + len(block)]
                    hit = np.nonzero((mine >= first) & (mine < last))[0]
                    block_scores[hit, mine[hit] - first] = -np.inf
                best.add(block_scores, self._ordinals[first:last], np.arange(first, last))
            ids[start : start + len(block)] = self.ids[best.values]
            scores[start : start + len(block)] = best.scores
        return ids, scores

    def subset(self, ids: Sequence[str]) -> ListingVectors:
        """The vectors of those `ids` that are here, in the order of `ids`."""
        rows = [self._row[i] for i in ids if i in self._row]
        return ListingVectors(self.model_id, self.column, self.ids[rows], self.matrix[rows])

    def similar(self, listing_id: str, k: int = 10) -> pd.DataFrame:
        """The k nearest other listings to `listing_id`: rank, listing_id, score."""
        ids, scores = self.nearest(self.vector(listing_id), k, exclude=[listing_id])
        return _ranked(ids[0], scores[0])

    def search(self, query: np.ndarray, k: int = 10) -> pd.DataFrame:
        ids, scores = self.nearest(query, k)
        return _ranked(ids[0], scores[0])


def cosine_scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(m, n) float32 scores of unit vectors, summed in float64.

    A float32 matrix product rounds each score by a path that depends on where its row sits (BLAS
    kernels, block edges), so two listings with the same vector could score an ulp apart, and rank by
    that ulp instead of by listing_id, differently in each block layout. Products of float32 values are
    exact in float64, so rounding the float64 sum to float32 gives one score per pair wherever it is
    computed."""
    return (np.asarray(queries, np.float64) @ np.asarray(vectors, np.float64).T).astype(np.float32)


class RunningTopK:
    """The k best candidates so far of each of `n` query rows, over candidates offered in chunks;
    equal scores rank by the lower ordinal. `values` holds what the caller keeps of each choice."""

    def __init__(self, n: int, k: int, dtype):
        self.k = k
        self.scores = np.empty((n, 0), np.float32)
        self.ordinals = np.empty((n, 0), np.int64)
        self.values = np.empty((n, 0), dtype)

    def add(self, scores: np.ndarray, ordinals: np.ndarray, values: np.ndarray) -> None:
        """`scores` (n, m) of m candidates, whose `ordinals` and `values` are (m,)."""
        shape = scores.shape
        merged = [
            np.concatenate([mine, np.broadcast_to(theirs, shape)], axis=1)
            for mine, theirs in ((self.scores, scores), (self.ordinals, ordinals), (self.values, values))
        ]
        chosen = top_k_columns(merged[0], merged[1], self.k)
        self.scores, self.ordinals, self.values = (np.take_along_axis(m, chosen, axis=1) for m in merged)


def top_k_columns(scores: np.ndarray, ordinals: np.ndarray, k: int) -> np.ndarray:
    """Per row, the column indices of the k highest scores, best first; equal scores by lower ordinal."""
    k = min(k, scores.shape[1])
    if k <= 0:
        return np.empty((len(scores), 0), dtype=np.int64)
    if k < scores.shape[1]:
        chosen = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, chosen, axis=1).min(axis=1, keepdims=True)
        # argpartition picks arbitrarily among scores equal to the k-th: settle those rows exactly.
        tied = (scores == kth).sum(axis=1) > (np.take_along_axis(scores, chosen, axis=1) == kth).sum(axis=1)
        for row in np.nonzero(tied)[0]:
            chosen[row] = np.lexsort((ordinals[row], -scores[row]))[:k]
    else:
        chosen = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    order = np.lexsort((np.take_along_axis(ordinals, chosen, axis=1), -np.take_along_axis(scores, chosen, axis=1)), axis=1)
    return np.take_along_axis(chosen, order, axis=1)


def vectors_from_arrow(table: pa.Table, column: str, model_id: str) -> ListingVectors:
    """Rows (listing_id, `column`) -> ListingVectors; rows without a vector are left out."""
    table = table.filter(pa.compute.is_valid(table[column]))
    values = table[column].combine_chunks()
    n = len(values)
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if n and flat.size % n:
        raise ValueError(f"{column}: vectors of different lengths for model {model_id}")
    matrix = flat.reshape(n, flat.size // n if n else 0)
    return ListingVectors(model_id, column, np.asarray(table["listing_id"].to_pylist(), dtype=object), matrix)


class EmbeddingReader:
    """The tables under one location: a folder of Delta tables, or a Unity Catalog `catalog.schema`."""

    def __init__(
        self, location: str, spark=None, model: ModelConfig | None = None, tracking: TrackingConfig | None = None,
        writer: TableWriter | None = None,
    ):
        self.location = location
        self.spark = spark
        self.model = model or ModelConfig()  # for rebuilding a query encoder; see encoders.model_config_for
        self.tracking = tracking or TrackingConfig()
        if writer is None and OutputConfig(location=location).is_catalog:
            if spark is None:
                raise ValueError(f"{location} is a Unity Catalog schema: reading it needs a Spark session")
            writer = SparkDeltaWriter(spark, location, is_catalog=True)
        self.writer = writer or DeltaRsWriter(location, spark)
        self._encoders: dict[str, encoders.Encoder] = {}
        self._vectors: dict[tuple, ListingVectors] = {}

    @classmethod
    def from_config(cls, cfg: Config, spark=None) -> EmbeddingReader:
        """The tables `cfg.output` names, read through the engine the session offers (delta-rs without one)."""
        writer = open_writer(spark, cfg) if spark is not None else None
        return cls(cfg.output.location, spark, cfg.model, cfg.tracking, writer)

    def current_model(self) -> str:
        model_id = self.writer.current_model()
        if model_id is None:
            raise LookupError(f"no current model is set under {self.location}: run the embedding job first")
        return model_id

    def table(self, name: str, model_id: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """A table's rows for `model_id` (default: the current model) as Arrow."""
        spec = table_spec(name)
        model_id = model_id or self.current_model()
        if isinstance(self.writer, DeltaRsWriter):
            return self.writer.rows(spec, columns, predicate=f"model_id = {sql_literal(model_id)}")
        return self.spark_table(name, model_id).select(*(columns or spec.column_names)).toArrow()

    def spark_table(self, name: str, model_id: str | None = None):
        """A table's rows for `model_id` (default: the current model) as a Spark DataFrame."""
        if self.spark is None:
            raise ValueError("spark_table needs a Spark session: EmbeddingReader(location, spark=...)")
        from pyspark.sql import functions as F

        spec = table_spec(name)
        model_id = model_id or self.current_model()
        return self.writer.read(spec, self.writer.version(spec)).where(F.col("model_id") == model_id)

    def vectors(self, by: str = "multimodal", model_id: str | None = None, active_only: bool = True) -> ListingVectors:
        """One kind of listing vector of one model (default: the current one), active listings only by default."""
        column = embedding_column(by)
        model_id = model_id or self.current_model()
        # Kept per table version: a long-lived reader sees each new commit, and reads each version once.
        key = (column, model_id, active_only, self.writer.version(LISTING_TABLE))
        if key not in self._vectors:
            rows = self.table(LISTING_TABLE.name, model_id, ["listing_id", column, "is_active"])
            if active_only:
                rows = rows.filter(pa.compute.equal(rows["is_active"], True))
            vectors = vectors_from_arrow(rows.sort_by("listing_id"), column, model_id)
            if not len(vectors):
                raise LookupError(
                    f"model {model_id} has no {'active ' if active_only else ''}listings with {column} under {self.location}"
                )
            self._vectors = {k: v for k, v in self._vectors.items() if k[3] == key[3]}  # drop older versions
            self._vectors[key] = vectors
        return self._vectors[key]

    def similar_listings(self, listing_id: str, k: int = 10, by: str = "multimodal", model_id: str | None = None) -> pd.DataFrame:
        """The k active listings nearest to `listing_id` by its `by` vector: rank, listing_id, score."""
        return self.vectors(by, model_id).similar(listing_id, k)

    def search(self, query_text: str, k: int = 10, by: str = "multimodal", model_id: str | None = None) -> pd.DataFrame:
        """The k active listings nearest to a text query, embedded by the text tower of the table's model."""
        vectors = self.vectors(by, model_id)
        return vectors.search(self.embed_queries([query_text], vectors.model_id)[0], k)

    def embed_queries(self, texts: Sequence[str], model_id: str | None = None) -> np.ndarray:
        """Texts -> (n, dim) vectors from the text tower of `model_id` (cleaned like listing text)."""
        model_id = model_id or self.current_model()
        cleaned = [listing_text.clean_field(t, TextConfig.max_chars) for t in texts]
        return self.query_encoder(model_id).encode_texts(cleaned)

    def query_encoder(self, model_id: str) -> encoders.Encoder:
        if model_id not in self._encoders:
            model = encoders.model_config_for(model_id, registry.pin(self.model, self.tracking))
            with tempfile.TemporaryDirectory(prefix="depop-embed-query-model-") as tmp:
                package_dir = registry.download(model, self.tracking, tmp)
                self._encoders[model_id] = encoders.build_encoder(model, package_dir=package_dir)
        return self._encoders[model_id]

    def texts(self, model_id: str | None = None) -> dict[str, str]:
        """listing_id -> the text its text vector was embedded from (for showing results to people)."""
        rows = self.table(TEXT_TABLE.name, model_id, ["listing_id", "text"])
        return dict(zip(rows["listing_id"].to_pylist(), rows["text"].to_pylist()))


def hash_sample(ids: Sequence[str], limit: int) -> list[str]:
    """At most `limit` of `ids`, sorted; the same ones for any model or run: lowest sha256 first."""
    if len(ids) <= limit:
        return sorted(ids)
    return sorted(sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:limit])


def read_table(location: str, table: str, model_id: str | None = None, spark=None) -> pa.Table:
    """A feature table's rows for `model_id` (default: the current model) as Arrow."""
    return EmbeddingReader(location, spark).table(table, model_id)


def _ranked(ids: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"rank": np.arange(1, len(ids) + 1), "listing_id": list(ids), "score": scores.astype(float)})

