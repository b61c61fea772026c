"""The table contract is declared once and rendered for both Delta engines; they must agree."""

from dataclasses import replace

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from depop_embed.config import OUTPUT_TABLES, load
from depop_embed.session import resolve_engine
from depop_embed.tables import ALL_TABLES, CURRENT_MODEL_TABLE, TABLES, open_writer

from conftest import ROOT, read_delta


@pytest.mark.parametrize("spec", ALL_TABLES, ids=lambda s: s.name)
def test_spark_ddl_and_arrow_schema_describe_the_same_table(spark, tmp_path, spec):
    # Spark parses the DDL the Spark Delta writer uses (as a Parquet table here: no Delta jars).
    spark.sql(f"CREATE TABLE contract_{spec.name} ({spec.spark_ddl()}) USING parquet LOCATION '{tmp_path}'")
    try:
        spark_schema = spark.table(f"contract_{spec.name}").schema
    finally:
        spark.sql(f"DROP TABLE contract_{spec.name}")
    arrow = spec.arrow_schema()
    assert spark_schema.fieldNames() == arrow.names == spec.column_names
    expected = {
        "string": "string", "int": "int", "float": "float", "boolean": "boolean", "timestamp": "timestamp",
        "vector": "array<float>",
    }
    for column, field in zip(spec.columns, spark_schema.fields):
        assert field.dataType.simpleString() == expected[column.type]
        assert field.metadata.get("comment") == column.comment
        assert arrow.field(column.name).metadata[b"comment"].decode() == column.comment
        assert arrow.field(column.name).nullable == column.nullable
    assert set(spec.key) <= set(spec.column_names)
    assert spec.key[0] == ("name" if spec is CURRENT_MODEL_TABLE else "listing_id")
    assert set(spec.meta_columns) <= set(spec.column_names) - set(spec.key)


def test_the_config_names_the_same_tables():
    assert OUTPUT_TABLES == tuple(spec.name for spec in TABLES)


def test_vectors_are_float32_lists_and_times_are_utc():
    for spec in ALL_TABLES:
        schema = spec.arrow_schema()
        for column in spec.columns:
            t = schema.field(column.name).type
            if column.type == "vector":
                assert pa.types.is_list(t) and t.value_type == pa.float32()
            if column.type == "timestamp":
                assert t == pa.timestamp("us", tz="UTC")


@pytest.mark.parametrize("spec", ALL_TABLES, ids=lambda s: s.name)
def test_each_engine_creates_empty_tables_with_cdf_and_the_contract_schema(spark, engine, tmp_path, spec):
    writer = open_writer(spark, load(ROOT / "conf" / "local.yaml", [f"output.location={tmp_path}", f"output.engine={engine}"]))
    assert writer.engine == engine
    assert writer.version(spec) is None
    writer.ensure(spec)
    assert writer.version(spec) == 0
    table = DeltaTable(writer.location(spec))
    assert table.metadata().configuration["delta.enableChangeDataFeed"] == "true"
    assert table.metadata().description == spec.comment
    assert pa.schema(table.schema().to_arrow()).names == spec.column_names
    assert read_delta(writer.location(spec)).num_rows == 0
    assert writer.read(spec, 0).count() == 0 and writer.read(spec, 0).columns == spec.column_names


def test_a_table_made_before_the_contract_gained_a_column_gets_it(spark, engine, tmp_path):
    writer = open_writer(spark, load(ROOT / "conf" / "local.yaml", [f"output.location={tmp_path}", f"output.engine={engine}"]))
    older = replace(CURRENT_MODEL_TABLE, columns=CURRENT_MODEL_TABLE.columns[:-1])
    writer.ensure(older)
    writer.set_current_model("model-a", "test")
    assert writer.model_history() == ["model-a"]
    names = pa.schema(DeltaTable(writer.location(CURRENT_MODEL_TABLE)).schema().to_arrow()).names
    assert names == CURRENT_MODEL_TABLE.column_names


def test_engine_resolution_follows_what_the_session_loads(spark):
    local = ROOT / "conf" / "local.yaml"
    assert resolve_engine(spark, load(local)) == "spark"  # this session has Delta's connector
    assert resolve_engine(spark, load(local, ["output.engine=delta-rs"])) == "delta-rs"
    assert resolve_engine(spark, load(local, ["output.location=main.features", "output.staging_path=/tmp/x"])) == "spark"
