"""The product other teams read: the three feature tables, their schemas and comments, and the writers.

The contract is declared once (`TableSpec`) and rendered both as Spark DDL and as an Arrow schema, so
the two Delta engines write the same tables:

* `SparkDeltaWriter`: Spark's own Delta connector (Databricks, or a session with the Delta jars).
* `DeltaRsWriter`: delta-rs (`deltalake`), for machines where the connector's jars are not available.

Each `merge` is one Delta commit per table: MERGE on the table's key, carrying the run's metadata.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import pyarrow as pa

log = logging.getLogger(__name__)

_ARROW_TYPES = {
    "string": pa.string(),
    "int": pa.int32(),
    "boolean": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "vector": pa.list_(pa.field("element", pa.float32(), nullable=True)),
}
_SPARK_TYPES = {"string": "STRING", "int": "INT", "boolean": "BOOLEAN", "timestamp": "TIMESTAMP", "vector": "ARRAY<FLOAT>"}
CDF_PROPERTY = "delta.enableChangeDataFeed"


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a key of _ARROW_TYPES
    nullable: bool
    comment: str


@dataclass(frozen=True)
class TableSpec:
    name: str
    key: tuple[str, ...]
    columns: tuple[Column, ...]
    comment: str

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([
            pa.field(c.name, _ARROW_TYPES[c.type], c.nullable, metadata={"comment": c.comment})
            for c in self.columns
        ])

    def spark_ddl(self) -> str:
        return ", ".join(
            f"`{c.name}` {_SPARK_TYPES[c.type]}{'' if c.nullable else ' NOT NULL'} COMMENT {_sql_str(c.comment)}"
            for c in self.columns
        )

    def merge_predicate(self, target: str = "t", source: str = "s") -> str:
        return " AND ".join(f"{target}.`{k}` = {source}.`{k}`" for k in self.key)


_LISTING_ID = Column("listing_id", "string", False, "Listing identifier (join key for every consumer).")
_MODEL_ID = Column("model_id", "string", False, "Exact weights that produced the vectors: architecture/pretrained tag, checkpoint digest, seed or registry version.")
_STATUS = Column("status", "string", False, "'ok' when the embedding is valid, 'error' when this row could not be encoded.")
_EMBEDDED_AT = Column("embedded_at", "timestamp", False, "When this row was encoded (UTC).")
_ERROR = Column("error", "string", True, "Why the row could not be encoded ('reason_code: message'); null when status = 'ok'.")


def _vector(name: str, what: str) -> Column:
    return Column(name, "vector", True, f"{what}: L2-normalised float32, dimension fixed per model_id; null when not available.")


IMAGE_TABLE = TableSpec(
    name="listing_image_embeddings",
    key=("listing_id", "image_id", "model_id"),
    columns=(
        _LISTING_ID,
        Column("image_id", "string", False, "Photo identifier within the listing."),
        _MODEL_ID,
        Column("position", "int", True, "Order of the photo in the listing (0 = cover)."),
        Column("image_uri", "string", True, "Where the photo was read from."),
        Column("content_hash", "string", True, "SHA-256 of the photo bytes that were embedded."),
        _vector("embedding", "Image embedding"),
        _STATUS,
        _ERROR,
        _EMBEDDED_AT,
    ),
    comment="One CLIP image embedding per listing photo and model.",
)

TEXT_TABLE = TableSpec(
    name="listing_text_embeddings",
    key=("listing_id", "model_id"),
    columns=(
        _LISTING_ID,
        _MODEL_ID,
        Column("text", "string", True, "The exact text that was embedded (rendered from the template)."),
        Column("text_hash", "string", False, "SHA-256 of the template version and the embedded text."),
        Column("template_version", "string", False, "Version of the text template that built `text`."),
        _vector("embedding", "Text embedding"),
        _STATUS,
        _ERROR,
        _EMBEDDED_AT,
    ),
    comment="One CLIP text embedding per listing and model, over the listing's templated text.",
)

LISTING_TABLE = TableSpec(
    name="listing_embeddings",
    key=("listing_id", "model_id"),
    columns=(
        _LISTING_ID,
        _MODEL_ID,
        _vector("image_embedding", "Mean of the listing's ok photo vectors, renormalised"),
        _vector("text_embedding", "The listing's text vector"),
        _vector("multimodal_embedding", "Weighted mix of image_embedding and text_embedding, renormalised"),
        Column("n_images", "int", False, "Number of photos pooled into image_embedding."),
        Column("is_active", "boolean", False, "False once the listing is sold or deleted."),
        Column("updated_at", "timestamp", False, "When this row was last written (UTC)."),
    ),
    comment="One fused embedding row per listing and model: the feature most consumers read.",
)

TABLES = (IMAGE_TABLE, TEXT_TABLE, LISTING_TABLE)


class TableWriter(Protocol):
    engine: str

    def location(self, spec: TableSpec) -> str: ...

    def version(self, spec: TableSpec) -> int | None: ...

    def merge(self, spec: TableSpec, staged_path: str, commit_info: Mapping[str, Any]) -> dict[str, Any]: ...

    def read(self, spark, spec: TableSpec): ...


class DeltaRsWriter:
    """Tables in a folder, written with delta-rs; the source rows come from the staged Parquet."""

    engine = "delta-rs"

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def location(self, spec: TableSpec) -> str:
        return f"{self.root}/{spec.name}"

    def version(self, spec: TableSpec) -> int | None:
        from deltalake import DeltaTable

        path = self.location(spec)
        return DeltaTable(path).version() if DeltaTable.is_deltatable(path) else None

    def read(self, spark, spec: TableSpec):
        """The table's current rows in Spark (its data files at the current version), or None when there are none."""
        from deltalake import DeltaTable

        path = self.location(spec)
        files = DeltaTable(path).file_uris() if DeltaTable.is_deltatable(path) else []
        return spark.read.parquet(*files) if files else None

    def ensure(self, spec: TableSpec):
        from deltalake import DeltaTable

        return DeltaTable.create(
            self.location(spec),
            spec.arrow_schema(),
            mode="ignore",
            name=spec.name,
            description=spec.comment,
            configuration={CDF_PROPERTY: "true"},
        )

    def merge(self, spec: TableSpec, staged_path: str, commit_info: Mapping[str, Any]) -> dict[str, Any]:
        import pyarrow.dataset as ds
        from deltalake import CommitProperties

        table = self.ensure(spec)
        source = (
            ds.dataset(staged_path, format="parquet")
            .to_table(columns=spec.column_names)
            .sort_by([(k, "ascending") for k in spec.key])  # keeps files ordered by listing_id
            .cast(spec.arrow_schema())
        )
        return (
            table.merge(
                source,
                spec.merge_predicate(),
                source_alias="s",
                target_alias="t",
                commit_properties=CommitProperties(custom_metadata=dict(commit_info)),
            )
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )


class SparkDeltaWriter:
    """Tables written by Spark's Delta connector: a folder of path tables, or a Unity Catalog schema."""

    engine = "spark"

    def __init__(self, spark, location: str, is_catalog: bool):
        self.spark = spark
        self.root = location.rstrip("/")
        self.is_catalog = is_catalog

    def location(self, spec: TableSpec) -> str:
        return f"{self.root}.{spec.name}" if self.is_catalog else f"{self.root}/{spec.name}"

    def _ident(self, spec: TableSpec) -> str:
        if self.is_catalog:
            return ".".join(f"`{p}`" for p in self.location(spec).split("."))
        return f"delta.`{self.location(spec)}`"

    def version(self, spec: TableSpec) -> int | None:
        try:
            row = self.spark.sql(f"DESCRIBE HISTORY {self._ident(spec)} LIMIT 1").first()
        except Exception:  # AnalysisException: the table does not exist yet
            return None
        return int(row["version"]) if row else None

    def read(self, spark, spec: TableSpec):
        """The table's current rows, or None when it does not exist yet."""
        try:
            return self.spark.table(self.location(spec)) if self.is_catalog else self.spark.read.format("delta").load(self.location(spec))
        except Exception:  # AnalysisException: the table does not exist yet
            return None

    def ensure(self, spec: TableSpec) -> None:
        self.spark.sql(
            f"CREATE TABLE IF NOT EXISTS {self._ident(spec)} ({spec.spark_ddl()}) USING DELTA "
            f"CLUSTER BY (listing_id) COMMENT {_sql_str(spec.comment)} "
            f"TBLPROPERTIES ('{CDF_PROPERTY}' = 'true')"
        )

    def merge(self, spec: TableSpec, staged_path: str, commit_info: Mapping[str, Any]) -> dict[str, Any]:
        self.ensure(spec)
        view = f"depop_embed_stage_{spec.name}_{uuid.uuid4().hex[:8]}"
        self.spark.read.parquet(staged_path).select(*spec.column_names).createOrReplaceTempView(view)
        conf_key = "spark.databricks.delta.commitInfo.userMetadata"
        self.spark.conf.set(conf_key, json.dumps(dict(commit_info), sort_keys=True))
        try:
            metrics = self.spark.sql(
                f"MERGE INTO {self._ident(spec)} t USING {view} s ON {spec.merge_predicate()} "
                "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *"
            ).first()
        finally:
            self.spark.conf.unset(conf_key)
            self.spark.catalog.dropTempView(view)
        return metrics.asDict() if metrics else {}


def _sql_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
