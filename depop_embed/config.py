"""The one configuration object: frozen dataclasses loaded from ``conf/*.yaml`` plus ``--set`` overrides.

Every setting of a run lives here. Loading fails at once, naming the dotted key, for an unknown key, a
value of the wrong type or a value out of range, so a bad deployment dies before Spark starts.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import re
import string
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import yaml

from depop_embed import uri_rules

SOURCE_FORMATS = ("delta", "parquet", "json", "csv")
DELTA_ENGINES = ("auto", "spark", "delta-rs")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
EMBEDDINGS = ("image", "text", "multimodal")  # the listing vectors consumers search by

# The input contract: what upstream tables must provide (extra columns are ignored).
LISTING_COLUMNS = (
    "listing_id", "title", "description", "brand", "category", "size", "condition",
    "colour", "price", "currency", "status", "updated_at",
)
IMAGE_COLUMNS = ("listing_id", "image_id", "position", "uri", "updated_at")
OUTPUT_TABLES = ("listing_image_embeddings", "listing_text_embeddings", "listing_embeddings")

_UC_SCHEMA = re.compile(r"^[A-Za-z_][\w-]*\.[A-Za-z_][\w-]*$")
# conf/*.yaml ship inside the wheel as this package (pyproject.toml maps it onto conf/).
PACKAGED_CONFIGS = "depop_embed.conf"
# A registered model pinned to a version or followed through an alias (stages and 'latest' move
# under a running job, so they are refused). UC names are catalog.schema.model.
REGISTERED_MODEL = re.compile(r"^models:/(?P<name>[^/@\s]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z_][\w-]*))$")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class SourceConfig:
    path: str = ""
    format: str = "json"


@dataclass(frozen=True)
class FetchConfig:
    """How photo bytes are read: every photo is capped at `max_bytes`; http(s) photos also time out and retry."""

    timeout_s: float = 10.0  # per attempt, for connecting and for the whole body
    retries: int = 2  # extra attempts after a transient failure (timeout, connection, 5xx, 429)
    backoff_s: float = 0.5  # wait before retry n is backoff_s * 2**(n-1)
    max_bytes: int = 25_000_000  # a photo file or response larger than this is refused (too_large)
    # http(s) hosts that resolve to loopback, private, link-local, ... addresses are refused unless true.
    allow_private_networks: bool = False


@dataclass(frozen=True)
class ImageSourceConfig(SourceConfig):
    # Relative photo URIs resolve against this folder; empty means the folder that holds `path`.
    uri_root: str = ""
    # Photo URIs outside these URI prefixes and absolute folders are refused (forbidden_uri) unopened;
    # empty means the folder that holds `path` and `uri_root`.
    allowed_uri_prefixes: tuple[str, ...] = ()
    fetch: FetchConfig = field(default_factory=FetchConfig)


@dataclass(frozen=True)
class OutputConfig:
    # A folder (local tables, one sub-folder per table) or `catalog.schema` (Unity Catalog).
    location: str = ".depop_embed/tables"
    engine: str = "auto"  # auto: Spark's Delta connector when the session has it, else delta-rs
    # Encoded rows are staged here (Parquet) between encoding and the table commits; empty means
    # `<location>/_staging` for folder locations. Required for `catalog.schema` locations.
    staging_path: str = ""

    @property
    def is_catalog(self) -> bool:
        return bool(_UC_SCHEMA.match(self.location))


@dataclass(frozen=True)
class ModelConfig:
    name: str = "ViT-B-32"  # an open_clip architecture
    # Exactly one source of weights: an open_clip pretrained tag, a local checkpoint file, or a seed
    # for random weights (tests, benchmarks, machines without a model hub).
    pretrained: str | None = None
    checkpoint: str | None = None
    seed: int | None = None
    # ... or a model in the MLflow registry: models:/NAME/VERSION or models:/NAME@ALIAS (registered with
    # jobs/register_model.py); its architecture and preprocessing come with it, so `name` and
    # `config_path` are not used.
    registered: str | None = None
    # An extra open_clip model config (JSON) to register before building, for custom architectures.
    config_path: str | None = None
    device: str = "auto"
    precision: str = "auto"  # autocast dtype on CUDA; auto = bf16 where supported, else fp16


@dataclass(frozen=True)
class EncodeConfig:
    image_batch_size: int = 32
    text_batch_size: int = 128
    arrow_batch_size: int = 512  # rows per Arrow batch handed to each UDF call
    torch_threads: int = 0  # 0: one per CPU that Spark gives a task (spark.task.cpus)
    partitions: int = 0  # 0: Spark's default parallelism
    # Threads that read and decode photos, one batch ahead of the model; 0: one per CPU Spark gives a
    # task (spark.task.cpus). Reads block too: raise it for photos behind a slow network (http).
    decode_threads: int = 0
    max_image_pixels: int = 50_000_000  # decoded-size cap against decompression bombs
    # Decode JPEGs at a reduced (DCT) scale that stays >= 1.4x the model's input side before the
    # resize: about 3x cheaper decoding; vectors within 0.9999 cosine of a full decode (README).
    jpeg_draft: bool = True
    # Decode plain RGB/greyscale JPEGs on the model's device (torchvision: nvjpeg on a GPU), in
    # batches; every other photo, and any JPEG the device refuses, is decoded on the host. It frees the
    # host's cores on a GPU node; on a CPU-only run it is a full decode, slower than the draft (README).
    device_jpeg_decode: bool = False


@dataclass(frozen=True)
class TextConfig:
    template_version: str = "v1"
    # Segments over listing fields, joined by `separator`; a segment whose fields are all empty is left out.
    template: tuple[str, ...] = (
        "{title}", "{brand}", "{category}", "size {size}", "{condition}", "{colour}", "{description}",
    )
    separator: str = ". "
    max_chars: int = 2000


@dataclass(frozen=True)
class FusionConfig:
    image_weight: float = 0.5  # multimodal = normalise(w * image + (1 - w) * text)


@dataclass(frozen=True)
class ThresholdsConfig:
    """Quality gates: a breach fails the run before any table changes (vector dimensions are always checked)."""

    max_error_rate: float = 0.05  # the largest share of error rows in any table
    min_listings: int = 1  # the fewest listings the source may hold (an empty export is a broken upstream)
    max_non_finite: int = 0  # vectors holding NaN or infinity allowed across the tables
    # The lowest mean cosine between this run's vectors and the stored vectors (same model) of rows
    # whose content hash did not change; only checked when there are such rows.
    min_drift_cosine: float = 0.99


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are recorded and models registered (MLflow)."""

    tracking_uri: str = "sqlite:///.depop_embed/mlflow.db"  # `databricks` on Databricks
    registry_uri: str = ""  # empty: the tracking store; `databricks-uc` for Unity Catalog
    experiment: str = "depop-embed"  # a workspace path (/Shared/...) on Databricks
    # Artifact root of the experiment when this run creates it; empty: the store's default.
    artifact_location: str = ".depop_embed/mlartifacts"
    error_sample_rows: int = 100  # error rows per table attached to the run


@dataclass(frozen=True)
class IncrementalConfig:
    full_refresh: bool = False  # re-embed every text and photo for this model, not only what changed
    # A listing gone from the source is deactivated at once, and all its rows are deleted this many
    # days later.
    retention_days: int = 30


@dataclass(frozen=True)
class NeighboursConfig:
    """The `listing_neighbours` table: top-k nearest active listings of every active listing."""

    k: int = 20
    by: str = "multimodal"  # image | text | multimodal
    # Listings per block of the blocked matrix product: a task scores block_size x block_size pairs,
    # holding two blocks of vectors (2 x 2048 x 512 floats = 8 MB for ViT-B-32).
    block_size: int = 2048


@dataclass(frozen=True)
class ServingConfig:
    """What the serving export writes: an ANN index file and the Vector Search source table."""

    by: str = "multimodal"  # the vector the index serves
    index_path: str = ".depop_embed/serving"  # a folder: one FAISS HNSW index per model under it
    hnsw_m: int = 32  # graph degree
    ef_construction: int = 200
    ef_search: int = 128  # search breadth: recall against exact search grows with it
    vector_search_endpoint: str = "depop-embed"  # Databricks Vector Search endpoint of the Delta Sync index
    vector_search_index: str = ""  # catalog.schema.name of the index; empty: <output.location>.listing_search_index


@dataclass(frozen=True)
class EvaluationConfig:
    """The evaluation job: retrieval and neighbour figures of a model, and the HTML report."""

    ks: tuple[int, ...] = (1, 5, 10)  # recall@k of text -> listing retrieval (each listing's title as the query)
    agreement_k: int = 10  # neighbours whose category / brand agreement is measured
    max_listings: int = 5000  # active listings evaluated (a fixed hash sample when there are more)
    report_dir: str = ".depop_embed/reports"  # a folder: evaluation-<model>.html (also logged to MLflow)
    report_listings: int = 12  # listings shown with their neighbours' photos
    report_neighbours: int = 6
    report_by: str = "image"  # image | text | multimodal: the neighbours the report shows
    projection_points: int = 2000  # listings in the 2-D projection


@dataclass(frozen=True)
class FinetuneConfig:
    """jobs/finetune_model.py: contrastive fine-tuning of `model` on the listings' own photo/text pairs."""

    run_dir: str = ".depop_embed/finetune"  # pair shards and checkpoints, one folder per run name
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20  # linear warm-up, then cosine decay to zero at the last step
    lock_image: bool = False  # LiT-style: freeze the image tower
    lock_text: bool = False
    val_percent: int = 10  # listings whose hash of listing_id mod 100 falls below this are held out
    seed: int = 0  # data order and dropout
    num_processes: int = 1  # > 1: TorchDistributor, one process per GPU
    num_workers: int = 0  # DataLoader worker processes per training process
    registered_model: str = "depop-clip"  # the best checkpoint becomes a new version of this model
    alias: str = "challenger"


@dataclass(frozen=True)
class FaultsConfig:
    # Fault injection for tests: SIGKILL the driver just before committing to this table ("" = never).
    kill_before_commit: str = ""
    # Stop a fine-tuning run with an exception after this many optimiser steps (0 = never), as a kill would.
    stop_finetune_after_step: int = 0


@dataclass(frozen=True)
class SparkConfig:
    master: str = "local[*]"  # used only when no session or spark-submit master exists
    app_name: str = "depop-embed"
    conf: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    listings: SourceConfig = field(default_factory=SourceConfig)
    images: ImageSourceConfig = field(default_factory=ImageSourceConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    neighbours: NeighboursConfig = field(default_factory=NeighboursConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)

    @property
    def staging_path(self) -> str:
        return self.output.staging_path or f"{self.output.location.rstrip('/')}/_staging"


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (optional) and apply `dotted.key=value` overrides; validate the result.

    `path` is a file, or the bare name of a config shipped in the package (`databricks` for
    conf/databricks.yaml), which is what a cluster that installed only the wheel has."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(_config_text(path)) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _config_text(path: str | Path) -> str:
    name = str(path)
    if isinstance(path, Path) or Path(name).name != name or Path(name).suffix:
        return Path(path).read_text()
    packaged = resources.files(PACKAGED_CONFIGS)
    file = packaged / f"{name}.yaml"
    if not file.is_file():
        shipped = sorted(p.name.removesuffix(".yaml") for p in packaged.iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(
            f"config {name!r}: not a packaged config (packaged: {', '.join(shipped)}); "
            "a file path needs a folder or a .yaml suffix"
        )
    return file.read_text()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The jobs' --config FILE and repeatable --set dotted.key=value."""
    parser.add_argument(
        "--config", required=True, help="a YAML file, or the name of a config shipped in the package (databricks)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set model.seed=3 (repeatable)",
    )


def from_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """Load the config `add_arguments` named; a bad one ends the job with a usage error naming the key."""
    try:
        return load(args.config, args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))


def parse_job_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, Config]:
    """A job's command line (a parser with `add_arguments`): its arguments and the config they name; a
    bad config ends the job with a usage error naming the key. The job logs at INFO."""
    import logging

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args, from_arguments(parser, args)


def as_dict(cfg: Config) -> dict[str, Any]:
    """The configuration as plain YAML types: `load` reads it back to an equal Config."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set raw[a][b][c] for "a.b.c"; below a mapping field (spark.conf) the rest is one map key."""
    node, cls = raw, Config
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        hint = typing.get_type_hints(cls).get(part) if cls is not None else None
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is not a section")
        if hint is not None and not dataclasses.is_dataclass(hint):
            child[".".join(parts[i + 1 :])] = value
            return
        node, cls = child, hint if dataclasses.is_dataclass(hint) else None
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        dotted = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, raw[f.name], dotted + ".")
        else:
            values[f.name] = _coerce(raw[f.name], hint, dotted)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads `template_version: 2` as an int; a name is still a name
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def validate(cfg: Config) -> None:
    """Cross-field and range checks; each message names the offending key."""
    for name in ("listings", "images"):
        src: SourceConfig = getattr(cfg, name)
        if not src.path:
            raise ConfigError(f"{name}.path: required")
        _one_of(f"{name}.format", src.format, SOURCE_FORMATS)
    f = cfg.images.fetch
    if not f.timeout_s > 0:
        raise ConfigError(f"images.fetch.timeout_s: must be > 0, got {f.timeout_s}")
    if f.retries < 0:
        raise ConfigError(f"images.fetch.retries: must be >= 0, got {f.retries}")
    if not f.backoff_s >= 0:
        raise ConfigError(f"images.fetch.backoff_s: must be >= 0, got {f.backoff_s}")
    if f.max_bytes < 1:
        raise ConfigError(f"images.fetch.max_bytes: must be >= 1, got {f.max_bytes}")
    for i, entry in enumerate(cfg.images.allowed_uri_prefixes):
        if (problem := uri_rules.entry_error(entry)) is not None:
            raise ConfigError(f"images.allowed_uri_prefixes[{i}]: {problem}")
    _one_of("output.engine", cfg.output.engine, DELTA_ENGINES)
    if not cfg.output.location:
        raise ConfigError("output.location: required")
    if cfg.output.is_catalog and cfg.output.engine == "delta-rs":
        raise ConfigError("output.engine: delta-rs cannot write Unity Catalog tables; use spark")
    if cfg.output.is_catalog and not cfg.output.staging_path:
        raise ConfigError("output.staging_path: required when output.location is catalog.schema")

    m = cfg.model
    if not m.name:
        raise ConfigError("model.name: required")
    sources = [k for k in ("pretrained", "checkpoint", "seed", "registered") if getattr(m, k) is not None]
    if len(sources) != 1:
        raise ConfigError(
            "model.pretrained / model.checkpoint / model.seed / model.registered: set exactly one "
            f"(set now: {', '.join(sources) or 'none'}; clear one with e.g. --set model.seed=null)"
        )
    if m.registered is not None:
        if not REGISTERED_MODEL.match(m.registered):
            raise ConfigError(
                f"model.registered: {m.registered!r} must be models:/NAME/VERSION or models:/NAME@ALIAS"
            )
        if len(urlparse(cfg.staging_path).scheme) > 1:  # one letter is a Windows drive
            raise ConfigError(
                f"output.staging_path: {cfg.staging_path} is not a filesystem path; a registered model is "
                "downloaded there for the workers (use a local, /Volumes/... or /dbfs/... path)"
            )
    _one_of("model.device", m.device, DEVICES)
    _one_of("model.precision", m.precision, PRECISIONS)

    e = cfg.encode
    for key in ("image_batch_size", "text_batch_size", "arrow_batch_size", "max_image_pixels"):
        if getattr(e, key) < 1:
            raise ConfigError(f"encode.{key}: must be >= 1, got {getattr(e, key)}")
    for key in ("torch_threads", "partitions", "decode_threads"):
        if getattr(e, key) < 0:
            raise ConfigError(f"encode.{key}: must be >= 0, got {getattr(e, key)}")

    t = cfg.text
    if not t.template_version:
        raise ConfigError("text.template_version: required")
    if not t.template:
        raise ConfigError("text.template: needs at least one segment")
    for i, segment in enumerate(t.template):
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(segment) if f is not None]
        except ValueError as exc:
            raise ConfigError(f"text.template[{i}]: {exc}") from exc
        unknown = [n for n in names if n not in LISTING_COLUMNS]
        if unknown or not names:
            raise ConfigError(
                f"text.template[{i}]: {segment!r} must name listing fields in braces; "
                f"unknown: {unknown or 'none named'}; known: {', '.join(LISTING_COLUMNS)}"
            )
    if t.max_chars < 1:
        raise ConfigError(f"text.max_chars: must be >= 1, got {t.max_chars}")

    _unit_interval("fusion.image_weight", cfg.fusion.image_weight)
    g = cfg.thresholds
    _unit_interval("thresholds.max_error_rate", g.max_error_rate)
    for key in ("min_listings", "max_non_finite"):
        if getattr(g, key) < 0:
            raise ConfigError(f"thresholds.{key}: must be >= 0, got {getattr(g, key)}")
    if not -1.0 <= g.min_drift_cosine <= 1.0:
        raise ConfigError(f"thresholds.min_drift_cosine: must be between -1 and 1, got {g.min_drift_cosine}")

    tr = cfg.tracking
    for key in ("tracking_uri", "experiment"):
        if not getattr(tr, key):
            raise ConfigError(f"tracking.{key}: required")
    if tr.error_sample_rows < 0:
        raise ConfigError(f"tracking.error_sample_rows: must be >= 0, got {tr.error_sample_rows}")
    if cfg.incremental.retention_days < 0:
        raise ConfigError(f"incremental.retention_days: must be >= 0, got {cfg.incremental.retention_days}")
    n = cfg.neighbours
    _one_of("neighbours.by", n.by, EMBEDDINGS)
    for key in ("k", "block_size"):
        _at_least(f"neighbours.{key}", getattr(n, key), 1)
    sv = cfg.serving
    _one_of("serving.by", sv.by, EMBEDDINGS)
    if not sv.index_path:
        raise ConfigError("serving.index_path: required")
    for key in ("hnsw_m", "ef_construction", "ef_search"):
        _at_least(f"serving.{key}", getattr(sv, key), 1)
    if sv.vector_search_index and len(sv.vector_search_index.split(".")) != 3:
        raise ConfigError(f"serving.vector_search_index: {sv.vector_search_index!r} must be catalog.schema.name")
    ev = cfg.evaluation
    if not ev.ks:
        raise ConfigError("evaluation.ks: needs at least one k")
    for i, k in enumerate(ev.ks):
        _at_least(f"evaluation.ks[{i}]", k, 1)
    for key in ("agreement_k", "max_listings", "report_neighbours", "projection_points"):
        _at_least(f"evaluation.{key}", getattr(ev, key), 1)
    _at_least("evaluation.report_listings", ev.report_listings, 0)
    _one_of("evaluation.report_by", ev.report_by, EMBEDDINGS)
    if not ev.report_dir:
        raise ConfigError("evaluation.report_dir: required")
    ft = cfg.finetune
    for key in ("epochs", "batch_size", "num_processes"):
        _at_least(f"finetune.{key}", getattr(ft, key), 1)
    for key in ("warmup_steps", "num_workers", "seed"):
        _at_least(f"finetune.{key}", getattr(ft, key), 0)
    if ft.batch_size < 2:
        raise ConfigError("finetune.batch_size: a contrastive batch needs at least 2 pairs")
    if not 0 < ft.val_percent < 100:
        raise ConfigError(f"finetune.val_percent: must be between 1 and 99, got {ft.val_percent}")
    if ft.learning_rate <= 0 or ft.weight_decay < 0:
        raise ConfigError("finetune.learning_rate must be > 0 and finetune.weight_decay >= 0")
    for key in ("run_dir", "registered_model"):
        if not getattr(ft, key):
            raise ConfigError(f"finetune.{key}: required")
    _at_least("faults.stop_finetune_after_step", cfg.faults.stop_finetune_after_step, 0)
    if cfg.faults.kill_before_commit:
        _one_of("faults.kill_before_commit", cfg.faults.kill_before_commit, OUTPUT_TABLES)


def _one_of(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _at_least(key: str, value: int, lowest: int) -> None:
    if value < lowest:
        raise ConfigError(f"{key}: must be >= {lowest}, got {value}")


def _unit_interval(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}: must be between 0 and 1, got {value}")
