from pathlib import Path

import pytest
import yaml

from depop_embed import config
from depop_embed.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "conf" / "local.yaml"


def test_local_yaml_loads_with_typed_values():
    cfg = config.load(LOCAL)
    assert cfg.listings.format == "json"
    assert cfg.model.name == "ViT-B-32" and cfg.model.seed == 0 and cfg.model.pretrained is None
    assert isinstance(cfg.text.template, tuple) and cfg.text.template[0] == "{title}"
    assert cfg.staging_path == ".depop_embed/tables/_staging"
    assert not cfg.output.is_catalog


def test_overrides_are_typed_and_reach_nested_and_mapping_fields():
    cfg = config.load(LOCAL, [
        "model.seed=3",
        "encode.image_batch_size=16",
        "fusion.image_weight=1",  # an int where a float is expected is fine
        "text.template_version=2",  # YAML reads 2 as an int; a version is a name
        "spark.conf.spark.sql.shuffle.partitions=4",  # a dotted key inside a mapping
        'text.template=["{title}", "by {brand}"]',
    ])
    assert cfg.model.seed == 3 and cfg.encode.image_batch_size == 16
    assert cfg.fusion.image_weight == 1.0 and isinstance(cfg.fusion.image_weight, float)
    assert cfg.text.template_version == "2"
    assert cfg.spark.conf["spark.sql.shuffle.partitions"] == "4"
    assert cfg.text.template == ("{title}", "by {brand}")


def test_fetch_settings_load_from_yaml_and_overrides():
    cfg = config.load(LOCAL, ["images.fetch.retries=0", "images.fetch.timeout_s=3"])
    assert cfg.images.fetch == config.FetchConfig(timeout_s=3.0, retries=0, backoff_s=0.5, max_bytes=25_000_000)
    assert isinstance(cfg.images.fetch.timeout_s, float)


def test_switching_weights_source_from_the_command_line():
    cfg = config.load(LOCAL, ["model.seed=null", "model.pretrained=laion2b_s34b_b79k"])
    assert cfg.model.pretrained == "laion2b_s34b_b79k" and cfg.model.seed is None


def test_a_registered_model_is_a_version_or_an_alias_and_replaces_the_other_sources():
    for spec in ("models:/depop-clip/3", "models:/depop-clip@champion", "models:/main.features.clip@prod"):
        assert config.load(LOCAL, ["model.seed=null", f"model.registered={spec}"]).model.registered == spec
    for spec in ("models:/depop-clip/latest", "models:/depop-clip/Production", "runs:/abc/model", "models:/a@", "depop-clip"):
        with pytest.raises(ConfigError, match="model.registered: .* must be models:/NAME/VERSION or models:/NAME@ALIAS"):
            config.load(LOCAL, ["model.seed=null", f"model.registered={spec}"])
    # The workers build the model from a download in the staging folder: it must be a filesystem path.
    with pytest.raises(ConfigError, match="output.staging_path: s3://bucket/staging is not a filesystem path"):
        config.load(LOCAL, ["model.seed=null", "model.registered=models:/c/1", "output.staging_path=s3://bucket/staging"])


def test_as_dict_reads_back_to_the_same_config(tmp_path):
    cfg = config.load(LOCAL, ["model.seed=3", "spark.conf.spark.sql.shuffle.partitions=4", 'text.template=["{title}"]'])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(config.as_dict(cfg)))
    assert config.load(path) == cfg


def test_catalog_location_needs_spark_and_staging():
    cfg = config.load(LOCAL, ["output.location=main.features", "output.staging_path=/Volumes/main/features/staging"])
    assert cfg.output.is_catalog and cfg.staging_path == "/Volumes/main/features/staging"
    with pytest.raises(ConfigError, match="output.staging_path"):
        config.load(LOCAL, ["output.location=main.features"])
    with pytest.raises(ConfigError, match="output.engine"):
        config.load(LOCAL, ["output.location=main.features", "output.staging_path=/x", "output.engine=delta-rs"])


@pytest.mark.parametrize(
    "override, names",
    [
        ("nope.x=1", "nope: unknown key"),
        ("model.colour=red", "model.colour: unknown key"),
        ("listings.uri_root=/photos", "listings.uri_root: unknown key"),  # only photos have URIs
        ("model.seed=abc", "model.seed: expected int"),
        ("encode.image_batch_size=true", "encode.image_batch_size: expected int"),
        ("encode.image_batch_size=0", "encode.image_batch_size: must be >= 1"),
        ("encode.decode_threads=-1", "encode.decode_threads: must be >= 0"),
        ("encode.device_jpeg_decode=maybe", "encode.device_jpeg_decode: expected bool"),
        ("output.engine=duckdb", "output.engine: 'duckdb' is not one of"),
        ("listings.format=xml", "listings.format: 'xml' is not one of"),
        ("images.path=", "images.path: expected str, got None"),
        ('images.path=""', "images.path: required"),
        ('text.template=["{titel}"]', r"text.template\[0\]"),
        ('text.template=["no fields"]', r"text.template\[0\]"),
        ("model.pretrained=openai", "model.pretrained / model.checkpoint / model.seed / model.registered: set exactly one"),
        ("model.registered=models:/clip/1", "set exactly one .set now: seed, registered"),
        ("thresholds.min_listings=-1", "thresholds.min_listings: must be >= 0"),
        ("thresholds.max_non_finite=-1", "thresholds.max_non_finite: must be >= 0"),
        ("thresholds.min_drift_cosine=1.5", "thresholds.min_drift_cosine: must be between -1 and 1"),
        ('tracking.experiment=""', "tracking.experiment: required"),
        ("tracking.artifacts=/x", "tracking.artifacts: unknown key"),
        ("fusion.image_weight=2", "fusion.image_weight: must be between 0 and 1"),
        ("thresholds.max_error_rate=-0.1", "thresholds.max_error_rate"),
        ("model=3", "model: expected a section"),
        ("spark.conf=[1]", "spark.conf: expected a mapping"),
        ("no_equals_sign", "must look like dotted.key=value"),
        ("images.fetch.timeout_s=0", "images.fetch.timeout_s: must be > 0"),
        ("images.fetch.timeout_s=.nan", "images.fetch.timeout_s: must be > 0"),
        ("images.fetch.retries=-1", "images.fetch.retries: must be >= 0"),
        ("images.fetch.retries=1.5", "images.fetch.retries: expected int"),
        ("images.fetch.backoff_s=-0.5", "images.fetch.backoff_s: must be >= 0"),
        ("images.fetch.max_bytes=0", "images.fetch.max_bytes: must be >= 1"),
        ("images.fetch.proxy=x", "images.fetch.proxy: unknown key"),
        ("listings.fetch.retries=1", "listings.fetch: unknown key"),  # only photos are fetched
        ("images.allowed_uri_prefixes=[photos]", r"images.allowed_uri_prefixes\[0\]: 'photos' is neither"),
        ('images.allowed_uri_prefixes=["/ok", "https:/no-host"]', r"images.allowed_uri_prefixes\[1\]: .*needs a host"),
        ("images.allowed_uri_prefixes=[https://u:p@cdn.example.com/]", r"images.allowed_uri_prefixes\[0\]: .*takes no user info"),
        ("images.allowed_uri_prefixes=[file:photos]", r"images.allowed_uri_prefixes\[0\]: .*absolute path"),
        ('images.allowed_uri_prefixes=[""]', r"images.allowed_uri_prefixes\[0\]: an empty entry"),
        ("images.allowed_uri_prefixes=/Volumes/x", "images.allowed_uri_prefixes: expected a list"),
        ("images.fetch.allow_private_networks=1", "images.fetch.allow_private_networks: expected bool"),
    ],
)
def test_bad_values_fail_naming_the_key(override, names):
    with pytest.raises(ConfigError, match=names):
        config.load(LOCAL, [override])


def test_unreadable_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        config.load(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = config.load(path)
    assert cfg.model.name


@pytest.mark.parametrize("override, message", [
    ("neighbours.by=colour", "neighbours.by: 'colour' is not one of image, text, multimodal"),
    ("neighbours.k=0", "neighbours.k: must be >= 1"),
    ("neighbours.block_size=-5", "neighbours.block_size: must be >= 1"),
    ("serving.ef_search=0", "serving.ef_search: must be >= 1"),
    ("serving.index_path=''", "serving.index_path: required"),
    ("serving.vector_search_index=my_index", "serving.vector_search_index: 'my_index' must be catalog.schema.name"),
    ("evaluation.ks=[]", "evaluation.ks: needs at least one k"),
    ("evaluation.ks=[1, 0]", r"evaluation.ks\[1\]: must be >= 1"),
    ("evaluation.report_by=price", "evaluation.report_by: 'price' is not one of"),
    ("evaluation.max_listings=ten", "evaluation.max_listings: expected int"),
])
def test_consumer_settings_are_checked_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(LOCAL, [override])


def test_consumer_settings_load_with_their_types():
    cfg = config.load(LOCAL, ["evaluation.ks=[1, 20]", "neighbours.by=image"])
    assert cfg.evaluation.ks == (1, 20) and cfg.neighbours.by == "image" and cfg.serving.by == "multimodal"
