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
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

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
        Column("previous_model_id", "string", True, "The model_id the pointer named before it was last switched (null before any switch): what a new model is compared with."),
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



@dataclass(frozen=True)
class Commit:
    """What a run stamps on its commits: metadata, and an idempotent-write id for this model's runs."""

    info: Mapping[str, Any]  # commit metadata (run id, model id, source snapshot...)
    model_id: str

    @property
    def app_id(self) -> str:
        return f"depop_embed/{self.model_id}"

    @staticmethod
    def txn_version(read_version: int | None) -> int:
        """The transaction version of work computed against `read_version` of a table: the same work
        retried gets the same id and is applied once. It grows from commit to commit of the model
        (each run reads at least the version its previous commit made), whatever the clocks say."""
        return 0 if read_version is None else read_version + 1


def new_run_id(now) -> str:
    """A run's id: its start (UTC) and a random suffix."""
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def commit_metadata(text: str | None) -> dict[str, Any]:
    """A commit's `userMetadata` as a dict: both engines write ours as JSON; another writer's may be any text."""
    if not text:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def commit_info(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Our metadata of a commit as delta-rs's history lists it: the `userMetadata` JSON, or the flat
    `depop_embed.*` keys that older delta-rs commits of ours carried."""
    legacy = {k: v for k, v in entry.items() if k.startswith("depop_embed.")}
    return {**legacy, **commit_metadata(entry.get("userMetadata"))}


class TableWriter(Protocol):
    engine: str

    def location(self, spec: TableSpec) -> str: ...

    def check_location(self) -> None: ...  # fails at once when the tables' place cannot hold them

    def version(self, spec: TableSpec) -> int | None: ...

    def ensure(self, spec: TableSpec) -> Any: ...

    def read(self, spec: TableSpec, version: int | None): ...  # a Spark DataFrame of the table at `version`

    def merge(self, spec: TableSpec, staged_path: str, read_version: int | None, commit: Commit) -> int | None: ...

    def current_model(self) -> str | None: ...

    def model_history(self) -> list[str]: ...

    def set_current_model(self, model_id: str, set_by: str, replace: bool = True) -> None: ...


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


def pointer_models(row: Mapping[str, Any] | None) -> list[str]:
    """The pointer row's model_ids, the current one first, then the one before it."""
    if row is None:
        return []
    return list(dict.fromkeys(m for m in (row.get("model_id"), row.get("previous_model_id")) if m))


# The pointer's MERGE: `previous_model_id` keeps the model that was current before a switch (setting the
# same model again keeps it as it was). Both engines take these SQL expressions.
_POINTER_UPDATE = {
    "model_id": "s.model_id",
    "set_at": "s.set_at",
    "set_by": "s.set_by",
    "previous_model_id": "CASE WHEN t.model_id = s.model_id THEN t.previous_model_id ELSE t.model_id END",
}
_MODEL_KEYED = tuple(s for s in ALL_TABLES if "model_id" in s.key)  # what a `<table>_current` view filters


class DeltaRsWriter:
    """Tables in a folder, written with delta-rs; the source rows come from the staged Parquet."""

    engine = "delta-rs"
    attempts = 3

    def __init__(self, root: str, spark=None):
        self.root = root.rstrip("/")
        self.spark = spark

    def location(self, spec: TableSpec) -> str:
        return f"{self.root}/{spec.name}"

    def check_location(self) -> None:
        """A folder of tables is created with its first table."""

    def _table(self, spec: TableSpec, version: int | None = None):
        from deltalake import DeltaTable

        path = self.location(spec)
        if not DeltaTable.is_deltatable(path):
            return None
        return DeltaTable(path, version=version)

    def version(self, spec: TableSpec) -> int | None:
        table = self._table(spec)
        return None if table is None else table.version()

    def ensure(self, spec: TableSpec):
        from deltalake import DeltaTable

        try:
            table = DeltaTable.create(
                self.location(spec),
                spec.arrow_schema(),
                mode="ignore",
                name=spec.name,
                description=spec.comment,
                configuration={CDF_PROPERTY: "true"},
            )
        except Exception:  # two first runs at once: the other one created the table between check and commit
            table = self._table(spec)
            if table is None:
                raise
        missing = [f for f in spec.arrow_schema() if f.name not in table.schema().to_arrow().names]
        if missing:  # the contract gained a column since the table was created
            from deltalake.schema import Field

            table.alter.add_columns([Field.from_arrow(f) for f in missing])
            log.info("%s: added column(s) %s", spec.name, ", ".join(f.name for f in missing))
        return table

    def read(self, spec: TableSpec, version: int | None):
        """The table's rows at `version` as a Spark DataFrame (deletion vectors applied)."""
        table = self._table(spec, version) if version is not None else None
        if table is None:
            return self.spark.createDataFrame([], _spark_schema(spec))
        return delta_rs_frame(self.spark, table, _spark_schema(spec)).select(*spec.column_names)

    def rows(self, spec: TableSpec, columns: Sequence[str] | None = None, predicate: str | None = None) -> pa.Table:
        """The table's current rows as Arrow, read by delta-rs without Spark (deletion vectors applied)."""
        table = self._table(spec)
        names = list(columns or spec.column_names)
        if table is None:
            return spec.arrow_schema().empty_table().select(names)
        schema = spec.arrow_schema()
        # DataFusion's scan gives string/binary *view* arrays: cast to the contract's types.
        return pa.table(table.scan(columns=names, predicate=predicate)).select(names).cast(pa.schema([schema.field(n) for n in names]))

    def history_since(self, spec: TableSpec, version: int | None) -> list[dict[str, Any]]:
        table = self._table(spec)
        if version is None or table is None:
            return []
        return [{**commit_info(h), "version": h["version"]} for h in table.history() if h.get("version", -1) > version]

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
        txn_version = Commit.txn_version(read_version)
        properties = CommitProperties(
            custom_metadata={"userMetadata": json.dumps(dict(commit.info), sort_keys=True)},
            app_transactions=[Transaction(commit.app_id, txn_version)],
        )
        for attempt in range(self.attempts):
            check_no_concurrent_run(spec, self.history_since(spec, read_version), commit, read_version)
            table = self.ensure(spec)
            applied = table.transaction_version(commit.app_id)
            if applied is not None and applied >= txn_version:
                log.info("%s: this work is already in the table (version %d)", spec.name, table.version())
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

    def _pointer(self) -> dict[str, Any] | None:
        rows = self.rows(CURRENT_MODEL_TABLE, predicate=f"name = {sql_literal(DEFAULT_POINTER)}").to_pylist()
        return rows[0] if rows else None

    def current_model(self) -> str | None:
        row = self._pointer()
        return row["model_id"] if row else None

    def model_history(self) -> list[str]:
        """The current model_id, then the one before it."""
        return pointer_models(self._pointer())

    def set_current_model(self, model_id: str, set_by: str, replace: bool = True) -> None:
        """Upsert the pointer (`replace=False`: only where none is set yet)."""
        from deltalake.exceptions import CommitFailedError

        row = pa.Table.from_pylist(
            [{"name": DEFAULT_POINTER, "model_id": model_id, "set_at": _now(), "set_by": set_by, "previous_model_id": None}],
            schema=CURRENT_MODEL_TABLE.arrow_schema(),
        )
        for attempt in range(self.attempts):
            merger = self.ensure(CURRENT_MODEL_TABLE).merge(row, CURRENT_MODEL_TABLE.merge_predicate(), source_alias="s", target_alias="t")
            if replace:
                merger = merger.when_matched_update(_POINTER_UPDATE)
            try:
                merger.when_not_matched_insert_all().execute()
                return
            except CommitFailedError:  # another run set it meanwhile: merge again over what it wrote
                if attempt == self.attempts - 1:
                    raise


# Reader features whose tables are read correctly from their Parquet files once deletion vectors are
# applied; any other (column mapping renames the Parquet columns) is refused rather than misread.
_FILE_READABLE_FEATURES = {"deletionVectors", "timestampNtz", "v2Checkpoint", "vacuumProtocolCheck"}


def delta_rs_frame(spark, table, schema: str | None = None):
    """A Delta table version listed by delta-rs, as a Spark DataFrame over its Parquet files: the files
    are read by the executors, and the rows that deletion vectors (Spark/Databricks) delete are taken
    out by file and row index, so deleted rows never come back."""
    import posixpath
    from urllib.parse import urlparse

    from pyspark.sql import functions as F

    protocol = table.protocol()
    unreadable = set(protocol.reader_features or ()) - _FILE_READABLE_FEATURES
    if unreadable:
        raise ValueError(f"{table.table_uri}: reader feature(s) {', '.join(sorted(unreadable))} are not supported here")
    files = table.file_uris()
    reader = spark.read.schema(schema) if schema else spark.read.option("mergeSchema", "true")
    if not files:
        return spark.createDataFrame([], schema) if schema else spark.createDataFrame([], "_empty string")
    frame = reader.parquet(*files)
    deleted = [
        (posixpath.basename(urlparse(path).path), row)
        for path, keep in zip(*pa.table(table.deletion_vectors()).to_pydict().values())
        for row, kept in enumerate(keep)
        if not kept
    ] if "deletionVectors" in (protocol.reader_features or ()) else []
    if not deleted:
        return frame
    columns = frame.columns
    located = frame.select(
        "*",
        F.element_at(F.split(F.col("_metadata.file_path"), "/"), -1).alias("_dv_file"),
        F.col("_metadata.row_index").alias("_dv_row"),
    )
    gone = spark.createDataFrame(deleted, "_dv_file string, _dv_row long")
    return located.join(F.broadcast(gone), ["_dv_file", "_dv_row"], "left_anti").select(*columns)


# Delta's commit conflicts (another transaction committed what this one read or wrote): the Java
# classes live in io.delta.exceptions; their error conditions start with these.
_CONFLICT_CONDITIONS = ("DELTA_CONCURRENT_", "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED")


def is_commit_conflict(exc: BaseException) -> bool:
    """Whether a Spark Delta error is a commit conflict (ConcurrentAppendException and friends), which a
    retry against the new table version may resolve."""
    text = str(exc)
    return "io.delta.exceptions." in text or any(f"[{c}" in text for c in _CONFLICT_CONDITIONS)


class SparkDeltaWriter:
    """Tables written by Spark's Delta connector: a folder of path tables, or a Unity Catalog schema."""

    engine = "spark"
    attempts = 3

    def __init__(self, spark, location: str, is_catalog: bool):
        self.spark = spark
        self.is_catalog = is_catalog
        # Delta takes `delta.`<path>`` as a path only when the path is absolute.
        self.root = location.rstrip("/") if is_catalog else absolute_location(location)

    def location(self, spec: TableSpec) -> str:
        return f"{self.root}.{spec.name}" if self.is_catalog else f"{self.root}/{spec.name}"

    def ident(self, spec: TableSpec, suffix: str = "") -> str:
        """The table as a Spark SQL identifier (catalog names quoted part by part: they may hold hyphens)."""
        if self.is_catalog:
            return quote_name(self.location(spec) + suffix)
        return "delta.`" + self.location(spec).replace("`", "``") + "`"

    def check_location(self) -> None:
        """A Unity Catalog schema must exist before the run encodes anything (the jobs create tables, not schemas)."""
        if self.is_catalog and not self.spark.catalog.databaseExists(quote_name(self.root)):
            raise ValueError(
                f"output.location: schema {self.root} does not exist; create it first (CREATE SCHEMA {quote_name(self.root)})"
            )

    def exists(self, spec: TableSpec) -> bool:
        if self.is_catalog:
            return self.spark.catalog.tableExists(self.ident(spec))
        from delta.tables import DeltaTable

        return DeltaTable.isDeltaTable(self.spark, self.location(spec))

    def version(self, spec: TableSpec) -> int | None:
        if not self.exists(spec):
            return None
        return int(self.spark.sql(f"DESCRIBE HISTORY {self.ident(spec)} LIMIT 1").first()["version"])

    def ensure(self, spec: TableSpec) -> None:
        # Liquid clustering in Unity Catalog; a folder's tables stay writable by delta-rs, which cannot
        # write clustered tables.
        clustering = f"CLUSTER BY ({spec.key[0]}) " if self.is_catalog else ""
        for attempt in range(1, 11):
            try:
                self.spark.sql(
                    f"CREATE TABLE IF NOT EXISTS {self.ident(spec)} ({spec.spark_ddl()}) USING DELTA "
                    f"{clustering}COMMENT {_sql_str(spec.comment)} TBLPROPERTIES ('{CDF_PROPERTY}' = 'true')"
                )
                break
            except Exception as exc:  # two first runs at once: the other one is creating it too
                if self.exists(spec):
                    break
                # The other run's log folder is there but its first commit is not yet: wait for it.
                if "DELTA_CREATE_TABLE_WITH_NON_EMPTY_LOCATION" not in str(exc) or attempt == 10:
                    raise
                time.sleep(0.2 * attempt)
        present = set(self.spark.table(self.ident(spec)).columns)
        missing = [c for c in spec.columns if c.name not in present]
        if missing:  # the contract gained a column since the table was created
            added = ", ".join(f"`{c.name}` {_SPARK_TYPES[c.type]} COMMENT {_sql_str(c.comment)}" for c in missing)
            self.spark.sql(f"ALTER TABLE {self.ident(spec)} ADD COLUMNS ({added})")
        if self.is_catalog and spec in _MODEL_KEYED and self.exists(CURRENT_MODEL_TABLE):
            self._create_current_view(spec)

    def read(self, spec: TableSpec, version: int | None):
        if version is None:
            return self.spark.createDataFrame([], _spark_schema(spec))
        return self.spark.sql(f"SELECT * FROM {self.ident(spec)} VERSION AS OF {int(version)}").select(*spec.column_names)

    def history_since(self, spec: TableSpec, version: int | None) -> list[dict[str, Any]]:
        if version is None or not self.exists(spec):
            return []
        rows = self.spark.sql(f"DESCRIBE HISTORY {self.ident(spec)}").where(f"version > {int(version)}").collect()
        return [{**commit_metadata(row["userMetadata"]), "version": int(row["version"])} for row in rows]

    def merge(self, spec: TableSpec, staged_path: str, read_version: int | None, commit: Commit) -> int | None:
        """One MERGE INTO, retried on a commit conflict with a run of another model; Delta skips it when
        this (app id, transaction version) is already in the table. Returns the new version."""
        settings = {
            "spark.databricks.delta.commitInfo.userMetadata": json.dumps(dict(commit.info), sort_keys=True),
            "spark.databricks.delta.write.txnAppId": commit.app_id,
            "spark.databricks.delta.write.txnVersion": str(Commit.txn_version(read_version)),
        }
        for attempt in range(self.attempts):
            check_no_concurrent_run(spec, self.history_since(spec, read_version), commit, read_version)
            self.ensure(spec)
            try:
                self._merge_once(spec, self.merge_source(spec, staged_path), settings)
                return self.version(spec)
            except Exception as exc:
                if not is_commit_conflict(exc):
                    raise
                log.warning("%s: commit attempt %d conflicted (%s); checking who committed", spec.name, attempt + 1, str(exc)[:300])
        raise ConcurrentRunError(f"{spec.name}: could not commit after {self.attempts} attempts: the table keeps changing")

    def merge_source(self, spec: TableSpec, staged_path: str):
        """The staged MERGE source rows (a seam: tests hold a MERGE here to race a concurrent commit)."""
        return self.spark.read.parquet(staged_path).select(*spec.column_names, OP_COLUMN)

    def _merge_once(self, spec: TableSpec, source, settings: Mapping[str, str]) -> None:
        view = f"depop_embed_stage_{spec.name}_{uuid.uuid4().hex[:8]}"
        source.createOrReplaceTempView(view)
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
        for key, value in settings.items():
            self.spark.conf.set(key, value)
        try:
            self.spark.sql(
                f"MERGE INTO {self.ident(spec)} t USING {view} s ON {spec.merge_predicate()} " + " ".join(clauses)
            ).collect()
        finally:
            for key in settings:
                self.spark.conf.unset(key)
            self.spark.catalog.dropTempView(view)

    def _pointer(self) -> dict[str, Any] | None:
        if not self.exists(CURRENT_MODEL_TABLE):
            return None
        row = self.spark.table(self.ident(CURRENT_MODEL_TABLE)).where(f"name = {_sql_str(DEFAULT_POINTER)}").first()
        return row.asDict() if row else None

    def current_model(self) -> str | None:
        row = self._pointer()
        return row["model_id"] if row else None

    def model_history(self) -> list[str]:
        """The current model_id, then the one before it."""
        return pointer_models(self._pointer())

    def set_current_model(self, model_id: str, set_by: str, replace: bool = True) -> None:
        """Upsert the pointer (`replace=False`: only where none is set yet); in Unity Catalog also
        (re)create the `<table>_current` views that follow it, for the tables that exist."""
        self.ensure(CURRENT_MODEL_TABLE)
        update = ", ".join(f"t.`{c}` = {v}" for c, v in _POINTER_UPDATE.items())
        matched = f"WHEN MATCHED THEN UPDATE SET {update} " if replace else ""
        for attempt in range(self.attempts):
            try:
                self.spark.sql(
                    f"MERGE INTO {self.ident(CURRENT_MODEL_TABLE)} t USING (SELECT {_sql_str(DEFAULT_POINTER)} AS name, "
                    f"{_sql_str(model_id)} AS model_id, current_timestamp() AS set_at, {_sql_str(set_by)} AS set_by, "
                    f"CAST(NULL AS STRING) AS previous_model_id) s ON {CURRENT_MODEL_TABLE.merge_predicate()} "
                    f"{matched}WHEN NOT MATCHED THEN INSERT *"
                ).collect()
                break
            except Exception as exc:  # another run set it meanwhile: merge again over what it wrote
                if not is_commit_conflict(exc) or attempt == self.attempts - 1:
                    raise
        if self.is_catalog:
            for spec in _MODEL_KEYED:
                if self.exists(spec):
                    self._create_current_view(spec)

    def _create_current_view(self, spec: TableSpec) -> None:
        self.spark.sql(
            f"CREATE OR REPLACE VIEW {self.ident(spec, '_current')} AS SELECT * FROM {self.ident(spec)} "
            f"WHERE model_id = (SELECT model_id FROM {self.ident(CURRENT_MODEL_TABLE)} WHERE name = {_sql_str(DEFAULT_POINTER)})"
        )


def quote_name(name: str) -> str:
    """catalog.schema[.table] as a Spark SQL identifier, each part quoted."""
    return ".".join("`" + part.replace("`", "``") + "`" for part in name.split("."))


def absolute_location(location: str) -> str:
    """A folder of tables as an absolute path or URI: relative local paths are made absolute."""
    from urllib.parse import urlparse

    location = location.rstrip("/")
    if len(urlparse(location).scheme) > 1:  # s3://, abfss://, dbfs:/, file:/ (one letter: a Windows drive)
        return location
    return os.path.abspath(location)


def _spark_schema(spec: TableSpec) -> str:
    return ", ".join(f"`{c.name}` {spec.spark_type(c.name)}" for c in spec.columns)


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def _sql_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_literal(text: str) -> str:
    """A string literal for delta-rs's SQL predicates (DataFusion: quotes doubled, no backslash escapes)."""
    return "'" + text.replace("'", "''") + "'"
