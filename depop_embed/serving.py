"""Exports for serving: an approximate nearest-neighbour index of a model's listing vectors (FAISS HNSW,
inner product = cosine on the normalised vectors), and the source table and definition of a Databricks
Vector Search Delta Sync index.

`listing_embeddings` is keyed by (listing_id, model_id), while a Delta Sync index needs a single-column
primary key, so the export keeps `listing_search_vectors`: the current model's vectors of active
listings, one row per listing_id, Change Data Feed on, synced by difference. The index definition names
that table; Vector Search follows its changes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from depop_embed import encoders, merge_source
from depop_embed.config import Config
from depop_embed.reader import EmbeddingReader, ListingVectors, embedding_column
from depop_embed.tables import LISTING_TABLE, SEARCH_VECTORS_TABLE, open_writer

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "listing_ids.json"
MANIFEST_FILE = "manifest.json"
VECTOR_SEARCH_FILE = "vector_search_index.json"


@dataclass
class AnnIndex:
    """A FAISS HNSW index over one model's vectors of one kind, with the listing id of every row."""

    index: Any  # faiss.IndexHNSWFlat
    ids: np.ndarray
    manifest: dict[str, Any]

    @classmethod
    def build(cls, vectors: ListingVectors, m: int = 32, ef_construction: int = 200, ef_search: int = 128) -> AnnIndex:
        import faiss

        dim = vectors.matrix.shape[1]
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        index.add(np.ascontiguousarray(vectors.matrix, dtype=np.float32))
        manifest = {
            "model_id": vectors.model_id,
            "embedding_column": vectors.column,
            "dimension": dim,
            "listings": len(vectors),
            "metric": "inner_product",
            "hnsw_m": m,
            "ef_construction": ef_construction,
            "ef_search": ef_search,
            "faiss_version": faiss.__version__,
        }
        return cls(index, vectors.ids, manifest)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (m, k), best first; an id is None where the index has fewer than k rows."""
        scores, rows = self.index.search(np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32), k)
        ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], None)
        return ids, scores

    def save(self, folder: str | Path) -> Path:
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        (folder / IDS_FILE).write_text(json.dumps(list(self.ids)))
        (folder / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> AnnIndex:
        import faiss

        folder = Path(folder)
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        index = faiss.read_index(str(folder / INDEX_FILE))
        index.hnsw.efSearch = manifest["ef_search"]
        return cls(index, np.asarray(json.loads((folder / IDS_FILE).read_text()), dtype=object), manifest)


def index_folder(cfg: Config, model_id: str, column: str) -> Path:
    """<serving.index_path>/<model_id as a folder name>/<column>."""
    return Path(cfg.serving.index_path) / encoders.file_name(model_id) / column


def vector_search_definition(catalog_schema: str, endpoint: str, index_name: str, dimension: int) -> dict[str, Any]:
    """The body of Databricks' create-index request for a Delta Sync index over `listing_search_vectors`
    (self-managed vectors: the index reads them, it computes none)."""
    return {
        "name": index_name or f"{catalog_schema}.listing_search_index",
        "endpoint_name": endpoint,
        "primary_key": SEARCH_VECTORS_TABLE.key[0],
        "index_type": "DELTA_SYNC",
        "delta_sync_index_spec": {
            "source_table": f"{catalog_schema}.{SEARCH_VECTORS_TABLE.name}",
            "pipeline_type": "TRIGGERED",
            "embedding_vector_columns": [{"name": "embedding", "embedding_dimension": dimension}],
            "columns_to_sync": ["listing_id", "model_id", "embedding_column", "updated_at"],
        },
    }


@dataclass(frozen=True)
class ExportResult:
    model_id: str
    index_folder: Path
    listings: int
    search_vectors: merge_source.SyncResult | None  # None when the model exported is not the current one
    vector_search_file: Path | None


def export(spark: SparkSession, cfg: Config, model_id: str | None = None) -> ExportResult:
    """Build and save the ANN index of `serving.by` vectors of a model (default: the current one); for
    the current model also sync `listing_search_vectors` and write the Vector Search index definition."""
    reader = EmbeddingReader.from_config(cfg, spark)
    current = reader.current_model()
    model_id = model_id or current
    column = embedding_column(cfg.serving.by)
    vectors = reader.vectors(cfg.serving.by, model_id)
    s = cfg.serving
    folder = AnnIndex.build(vectors, s.hnsw_m, s.ef_construction, s.ef_search).save(index_folder(cfg, model_id, column))
    log.info("ANN index of %d %s vectors of model %s -> %s", len(vectors), column, model_id, folder)
    if model_id != current:
        return ExportResult(model_id, folder, len(vectors), None, None)

    writer = open_writer(spark, cfg)
    rows = (
        writer.read(LISTING_TABLE, writer.version(LISTING_TABLE))
        .where((F.col("model_id") == model_id) & F.col("is_active") & F.col(column).isNotNull())
        .select("listing_id", "model_id", F.col(column).alias("embedding"), F.lit(column).alias("embedding_column"), "updated_at")
    )
    same = ("model_id", "embedding_column", "updated_at")  # listing_embeddings stamps updated_at on every rewrite
    synced = merge_source.sync_derived(
        spark, cfg, writer, SEARCH_VECTORS_TABLE, rows, F.lit(True), lambda new, old: _all_equal(new, old, same),
        "export_serving", model_id, {},
    )
    definition_file = None
    if cfg.output.is_catalog:
        definition = vector_search_definition(cfg.output.location, s.vector_search_endpoint, s.vector_search_index, vectors.matrix.shape[1])
        definition_file = folder / VECTOR_SEARCH_FILE
        definition_file.write_text(json.dumps(definition, indent=2))
        log.info("Vector Search Delta Sync index definition -> %s", definition_file)
    return ExportResult(model_id, folder, len(vectors), synced, definition_file)


def _all_equal(new, old, columns) -> Any:
    condition = F.lit(True)
    for column in columns:
        condition = condition & new(column).eqNullSafe(old(column))
    return condition
