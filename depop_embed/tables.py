"""The product other teams read: the three feature tables, their schemas and comments, and the writers.

The contract is declared once (`TableSpec`) and rendered both as Spark DDL and as an Arrow schema, so
the two Delta engines write the same tables:

* `SparkDeltaWriter`: Spark's own Delta connector (Databricks, or a session with the Delta jars).
* `DeltaRsWriter`: delta-rs (`deltalake`), for machines where the connector's jars are not available.

A run changes each table in one Delta commit: a MERGE on the table's key whose source rows carry an
operation (`_op`): `upsert` a whole row, `meta` update only the spec's `meta_columns` (no new vector),
or `delete`. The commit carries the run's metadata and an idempotent-write transaction id, and is refused
when another run of the same model committed to the table after this run read it.
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
    "float": pa.float32(),
    "boolean": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "vector": pa.list_(pa.field("element", pa.float32(), nullable=True)),
}
_SPARK_TYPES = {"string": "STRING", "int": "INT", "float": "FLOAT", "boolean": "BOOLEAN", "timestamp": "TIMESTAMP", "vector": "ARRAY<FLOAT>"}
CDF_PROPERTY = "delta.enableChangeDataFeed"


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a key of _ARROW_TYPES
    nullable: bool
    comment: str


OP_COLUMN = "_op"
UPSERT, META, DELETE = "upsert", "meta", "delete"


class ConcurrentRunError(RuntimeError):
    """Another run of the same model committed to a table after this run read it."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    key: tuple[str, ...]
    columns: tuple[Column, ...]
    comment: str
    meta_columns: tuple[str, ...] = ()  # updated in place by a `meta` row, without a new vector

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

    def spark_type(self, column: str) -> str:
        return next(_SPARK_TYPES[c.type] for c in self.columns if c.name == column)

    def merge_source_schema(self) -> pa.Schema:
        """The staged MERGE source: the table's columns, all but the key nullable (delete rows), plus `_op`."""
        fields = [f if f.name in self.key else f.with_nullable(True) for f in self.arrow_schema()]
        return pa.schema([*fields, pa.field(OP_COLUMN, pa.string(), False)])

    def merge_clauses(self) -> list[tuple[str, str, dict[str, str]]]:
        """(clause, condition, assignments), in order, shared by both engines."""
        every = {c: f"s.`{c}`" for c in self.column_names}
        clauses = [("matched_delete", f"s.{OP_COLUMN} = '{DELETE}'", {})]
        if self.meta_columns:
            clauses.append(("matched_update", f"s.{OP_COLUMN} = '{META}'", {c: f"s.`{c}`" for c in self.meta_columns}))
        clauses.append(("matched_update", f"s.{OP_COLUMN} = '{UPSERT}'", {c: v for c, v in every.items() if c not in self.key}))
        clauses.append(("not_matched_insert", f"s.{OP_COLUMN} = '{UPSERT}'", every))
        return clauses


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
        Column("source_fingerprint", "string", True, "URI + size + modification time (or source updated_at) of the photo when it was embedded; a change re-embeds it."),
        _vector("embedding", "Image embedding"),
        _STATUS,
        _ERROR,
        _EMBEDDED_AT,
    ),
    comment="One CLIP image embedding per listing photo and model.",
    meta_columns=("position",),
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
        Column("is_active", "boolean", False, "False once the listing is sold, deleted or gone from the source."),
        Column("inputs_hash", "string", False, "Hash of the text and photo rows this row was fused from; a change re-fuses it."),
        Column("updated_at", "timestamp", False, "When this row was last written (UTC)."),
    ),
    comment="One fused embedding row per listing and model: the feature most consumers read.",
    meta_columns=("is_active", "updated_at"),
)

TABLES = (IMAGE_TABLE, TEXT_TABLE, LISTING_TABLE)  # what the embedding job writes

CURRENT_MODEL_TABLE = TableSpec(
    name="current_model",
    key=("name",),
    columns=(
        Column("name", "string", False, "Pointer name; consumers read 'default'."),
        _MODEL_ID,
        Column("set_at", "timestamp", False, "When the pointer was last set (UTC)."),
        Column("set_by", "string", True, "The run or command that set it."),
    ),
    comment="Which model_id consumers read from the embedding tables: switching models is one row update.",
)
DEFAULT_POINTER = "default"

# Derived tables, recomputed from `listing_embeddings` by the consumer jobs (neighbours, serving).
NEIGHBOURS_TABLE = TableSpec(
    name="listing_neighbours",
    key=("listing_id", "model_id", "embedding_column", "rank"),
    columns=(
        _LISTING_ID,
        _MODEL_ID,
        Column("embedding_column", "string", False, "Which listing_embeddings vector the neighbours were found by: image_embedding, text_embedding or multimodal_embedding."),
        Column("rank", "int", False, "1 = the nearest neighbour."),
        Column("neighbour_id", "string", False, "listing_id of the neighbour (an active listing, never the listing itself)."),
        Column("score", "float", False, "Cosine similarity of the two vectors."),
        Column("computed_at", "timestamp", False, "When this neighbour row was last written (UTC)."),
    ),
    comment="Top-k nearest active listings of every active listing, per model and vector: candidates for 'more like this'.",
)

SEARCH_VECTORS_TABLE = TableSpec(
    name="listing_search_vectors",
    key=("listing_id",),
    columns=(
        _LISTING_ID,
        _MODEL_ID,
        _vector("embedding", "The current model's listing vector that the search index serves"),
        Column("embedding_column", "string", False, "Which listing_embeddings vector `embedding` is."),
        Column("updated_at", "timestamp", False, "updated_at of the listing_embeddings row it was copied from (UTC)."),
    ),
    comment=(
        "The current model's vectors of active listings, one row per listing_id: the source of the "
        "Databricks Vector Search Delta Sync index, which needs a single-column primary key."
    ),
)
DERIVED_TABLES = (NEIGHBOURS_TABLE, SEARCH_VECTORS_TABLE)
ALL_TABLES = (*TABLES, CURRENT_MODEL_TABLE, *DERIVED_TABLES)


def table_spec(name: str) -> TableSpec:
    spec = next((s for s in ALL_TABLES if s.name == name), None)
    if spec is None:
        raise ValueError(f"unknown table {name!r}; one of {', '.join(s.name for s in ALL_TABLES)}")
    return spec


def pointer_history(changes: list[Mapping[str, Any]]) -> list[str]:
    """The model_ids the `default` pointer has named, newest first, from its Change Data Feed rows."""
    named = [
        r for r in changes
        if r["name"] == DEFAULT_POINTER and r["_change_type"] in ("insert", "update_postimage")
    ]
    history: list[str] = []
    for row in sorted(named, key=lambda r: r["_commit_version"], reverse=True):
        if not history or history[-1] != row["model_id"]:
            history.append(row["model_id"])
    return history


@dataclass(frozen=True)
class Commit:
    """What a run stamps on its commits: metadata, and an idempotent-write id for this model's runs."""

    info: Mapping[str, Any]  # commit metadata (run id, model id, source snapshot...)
    model_id: str
    run_seq: int  # increases from run to run (the run's start, epoch ms): the transaction version

    @property
    def app_id(self) -> str:
        return f"depop_embed/{self.model_id}"


def new_run_id(now) -> str:
    """A run's id: its start (UTC) and a random suffix."""
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


class TableWriter(Protocol):
    engine: str

    def location(self, spec: TableSpec) -> str: ...

    def version(self, spec: TableSpec) -> int | None: ...

    def ensure(self, spec: TableSpec) -> Any: ...

    def read(self, spec: TableSpec, version: int | None): ...  # a Spark DataFrame of the table at `version`

    def merge(self, spec: TableSpec, staged_path: str, read_version: int | None, commit: Commit) -> int | None: ...

    def current_model(self) -> str | None: ...

    def model_history(self) -> list[str]: ...

    def set_current_model(self, model_id: str, set_by: str) -> None: ...


def open_writer(spark, cfg, engine: str | None = None) -> TableWriter:
    """The writer of `cfg.output`'s tables through `engine` (default: what the session offers, see `session`)."""
    from depop_embed.session import resolve_engine

    engine = engine or resolve_engine(spark, cfg)
    if engine == "spark":
        return SparkDeltaWriter(spark, cfg.output.location, cfg.output.is_catalog)
    return DeltaRsWriter(cfg.output.location, spark)


def check_no_concurrent_run(spec: TableSpec, history_since_read: list[Mapping[str, Any]], commit: Commit, read_version) -> None:
    """Runs of other models may commit meanwhile (their rows are disjoint); a run of ours may not."""
    for entry in history_since_read:
        if entry.get("depop_embed.model_id") == commit.model_id:
            raise ConcurrentRunError(
                f"{spec.name}: run {entry.get('depop_embed.run_id')} of model {commit.model_id} committed version "
                f"{entry.get('version')} after this run read version {read_version}; nothing of this run was committed "
                "to it. Run the job again: it will pick up from the new state."
            )


class DeltaRsWriter:
    """Tables in a folder, written with delta-rs; the source rows come from the staged Parquet."""

    engine = "delta-rs"
    attempts = 3

    def __init__(self, root: str, spark=None):
        self.root = root.rstrip("/")
        self.spark = spark

    def location(self, spec: TableSpec) -> str:
        return f"{self.root}/{spec.name}"

    def version(self, spec: TableSpec) -> int | None:
        from deltalake import DeltaTable

        path = self.location(spec)
        return DeltaTable(path).version() if DeltaTable.is_deltatable(path) else None

    def ensure(self, spec: TableSpec):
        from deltalake import DeltaTable

        try:
            return DeltaTable.create(
                self.location(spec),
                spec.arrow_schema(),
                mode="ignore",
                name=spec.name,
                description=spec.comment,
                configuration={CDF_PROPERTY: "true"},
            )
        except Exception:  # two first runs at once: the other one created the table between check and commit
            if DeltaTable.is_deltatable(self.location(spec)):
                return DeltaTable(self.location(spec))
            raise

    def read(self, spec: TableSpec, version: int | None):
        """The table's rows at `version` as a Spark DataFrame over its Parquet files (delta-rs writes no deletion vectors)."""
        from deltalake import DeltaTable

        files = DeltaTable(self.location(spec), version=version).file_uris() if version is not None else []
        if not files:
            return self.spark.createDataFrame([], _spark_schema(spec))
        return self.spark.read.parquet(*files).select(*spec.column_names)

    def history_since(self, spec: TableSpec, version: int | None) -> list[dict[str, Any]]:
        from deltalake import DeltaTable

        if version is None or not DeltaTable.is_deltatable(self.location(spec)):
            return []
        return [h for h in DeltaTable(self.location(spec)).history() if h.get("version", -1) > version]

    def merge(self, spec: TableSpec, staged_path: str, read_version: int | None, commit: Commit) -> int | None:
        """One MERGE commit; retried when a run of another model committed in between. Returns the new version."""
        import pyarrow.dataset as ds
        from deltalake import CommitProperties
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import Transaction

        source = (
            ds.dataset(staged_path, format="parquet")
            .to_table(columns=[*spec.column_names, OP_COLUMN])
            .sort_by([(k, "ascending") for k in spec.key])  # keeps files ordered by the key
            .cast(spec.merge_source_schema())
        )
        properties = CommitProperties(
            custom_metadata={k: str(v) for k, v in commit.info.items()},
            app_transactions=[Transaction(commit.app_id, commit.run_seq)],
        )
        for attempt in range(self.attempts):
            check_no_concurrent_run(spec, self.history_since(spec, read_version), commit, read_version)
            table = self.ensure(spec)
            if (table.transaction_version(commit.app_id) or -1) >= commit.run_seq:
                log.info("%s: this run's commit is already in the table (version %d)", spec.name, table.version())
                return table.version()
            merger = table.merge(source, spec.merge_predicate(), source_alias="s", target_alias="t", commit_properties=properties)
            for clause, condition, assignments in spec.merge_clauses():
                if clause == "matched_delete":
                    merger = merger.when_matched_delete(predicate=condition)
                elif clause == "matched_update":
                    merger = merger.when_matched_update(assignments, predicate=condition)
                else:
                    merger = merger.when_not_matched_insert(assignments, predicate=condition)
            try:
                merger.execute()
                return self.version(spec)
            except CommitFailedError as exc:  # someone committed between our load and our commit
                log.warning("%s: commit attempt %d failed (%s); checking who committed", spec.name, attempt + 1, exc)
        raise ConcurrentRunError(f"{spec.name}: could not commit after {self.attempts} attempts: the table keeps changing")

    def current_model(self) -> str | None:
        from deltalake import DeltaTable

        path = self.location(CURRENT_MODEL_TABLE)
        if not DeltaTable.is_deltatable(path):
            return None
        rows = DeltaTable(path).to_pyarrow_table(filters=[("name", "=", DEFAULT_POINTER)]).to_pylist()
        return rows[0]["model_id"] if rows else None

    def model_history(self) -> list[str]:
        """Every model_id the pointer has named, the current one first."""
        from deltalake import DeltaTable

        path = self.location(CURRENT_MODEL_TABLE)
        if not DeltaTable.is_deltatable(path):
            return []
        return pointer_history(pa.table(DeltaTable(path).load_cdf(starting_version=0)).to_pylist())

    def set_current_model(self, model_id: str, set_by: str) -> None:
        import pyarrow as pa

        row = pa.Table.from_pylist(
            [{"name": DEFAULT_POINTER, "model_id": model_id, "set_at": _now(), "set_by": set_by}],
            schema=CURRENT_MODEL_TABLE.arrow_schema(),
        )
        (
            self.ensure(CURRENT_MODEL_TABLE)
            .merge(row, CURRENT_MODEL_TABLE.merge_predicate(), source_alias="s", target_alias="t")
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

    def _ident(self, spec: TableSpec, suffix: str = "") -> str:
        if self.is_catalog:
            return ".".join(f"`{p}`" for p in (self.location(spec) + suffix).split("."))
        return f"delta.`{self.location(spec)}`"

    def _history(self, spec: TableSpec, limit: str = "") -> list:
        try:
            return self.spark.sql(f"DESCRIBE HISTORY {self._ident(spec)} {limit}").collect()
        except Exception:  # AnalysisException: the table does not exist yet
            return []

    def version(self, spec: TableSpec) -> int | None:
        rows = self._history(spec, "LIMIT 1")
        return int(rows[0]["version"]) if rows else None

    def ensure(self, spec: TableSpec) -> None:
        self.spark.sql(
            f"CREATE TABLE IF NOT EXISTS {self._ident(spec)} ({spec.spark_ddl()}) USING DELTA "
            f"CLUSTER BY ({spec.key[0]}) COMMENT {_sql_str(spec.comment)} "
            f"TBLPROPERTIES ('{CDF_PROPERTY}' = 'true')"
        )

    def read(self, spec: TableSpec, version: int | None):
        if version is None:
            return self.spark.createDataFrame([], _spark_schema(spec))
        return self.spark.sql(f"SELECT * FROM {self._ident(spec)} VERSION AS OF {int(version)}").select(*spec.column_names)

    def history_since(self, spec: TableSpec, version: int | None) -> list[dict[str, Any]]:
        if version is None:
            return []
        entries = []
        for row in self._history(spec):
            if int(row["version"]) > version:
                info = json.loads(row["userMetadata"]) if row["userMetadata"] else {}
                entries.append({**info, "version": int(row["version"])})
        return entries

    def merge(self, spec: TableSpec, staged_path: str, read_version: int | None, commit: Commit) -> int | None:
        """One MERGE INTO; Delta skips it when this (app id, run) transaction is already in the table."""
        check_no_concurrent_run(spec, self.history_since(spec, read_version), commit, read_version)
        self.ensure(spec)
        view = f"depop_embed_stage_{spec.name}_{uuid.uuid4().hex[:8]}"
        self.spark.read.parquet(staged_path).select(*spec.column_names, OP_COLUMN).createOrReplaceTempView(view)
        clauses = []
        for clause, condition, assignments in spec.merge_clauses():
            if clause == "matched_delete":
                clauses.append(f"WHEN MATCHED AND {condition} THEN DELETE")
            elif clause == "matched_update":
                sets = ", ".join(f"t.`{c}` = {v}" for c, v in assignments.items())
                clauses.append(f"WHEN MATCHED AND {condition} THEN UPDATE SET {sets}")
            else:
                clauses.append(
                    f"WHEN NOT MATCHED AND {condition} THEN INSERT ({', '.join(f'`{c}`' for c in assignments)}) "
                    f"VALUES ({', '.join(assignments.values())})"
                )
        run_conf = {
            "spark.databricks.delta.commitInfo.userMetadata": json.dumps(dict(commit.info), sort_keys=True),
            "spark.databricks.delta.write.txnAppId": commit.app_id,
            "spark.databricks.delta.write.txnVersion": str(commit.run_seq),
        }
        for key, value in run_conf.items():
            self.spark.conf.set(key, value)
        try:
            self.spark.sql(
                f"MERGE INTO {self._ident(spec)} t USING {view} s ON {spec.merge_predicate()} " + " ".join(clauses)
            ).collect()
        finally:
            for key in run_conf:
                self.spark.conf.unset(key)
            self.spark.catalog.dropTempView(view)
        return self.version(spec)

    def current_model(self) -> str | None:
        if not self._history(CURRENT_MODEL_TABLE, "LIMIT 1"):
            return None
        row = self.spark.sql(
            f"SELECT model_id FROM {self._ident(CURRENT_MODEL_TABLE)} WHERE name = '{DEFAULT_POINTER}'"
        ).first()
        return row["model_id"] if row else None

    def model_history(self) -> list[str]:
        """Every model_id the pointer has named, the current one first."""
        if not self._history(CURRENT_MODEL_TABLE, "LIMIT 1"):
            return []
        reader = self.spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", 0)
        ident = self.location(CURRENT_MODEL_TABLE)
        changes = reader.table(ident) if self.is_catalog else reader.load(ident)
        return pointer_history([r.asDict() for r in changes.collect()])

    def set_current_model(self, model_id: str, set_by: str) -> None:
        """Upsert the pointer; in Unity Catalog also (re)create `<table>_current` views that follow it."""
        self.ensure(CURRENT_MODEL_TABLE)
        self.spark.sql(
            f"MERGE INTO {self._ident(CURRENT_MODEL_TABLE)} t USING (SELECT '{DEFAULT_POINTER}' AS name, "
            f"{_sql_str(model_id)} AS model_id, current_timestamp() AS set_at, {_sql_str(set_by)} AS set_by) s "
            f"ON {CURRENT_MODEL_TABLE.merge_predicate()} WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *"
        )
        if self.is_catalog:
            for spec in (*TABLES, NEIGHBOURS_TABLE):
                self.spark.sql(
                    f"CREATE OR REPLACE VIEW {self._ident(spec, '_current')} AS SELECT * FROM {self._ident(spec)} "
                    f"WHERE model_id = (SELECT model_id FROM {self._ident(CURRENT_MODEL_TABLE)} WHERE name = '{DEFAULT_POINTER}')"
                )


def _spark_schema(spec: TableSpec) -> str:
    return ", ".join(f"`{c.name}` {spec.spark_type(c.name)}" for c in spec.columns)


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def _sql_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
