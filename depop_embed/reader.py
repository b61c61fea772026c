"""Reading the feature tables as a consumer: the current model's rows (or a named model's)."""

from __future__ import annotations

import pyarrow as pa

from depop_embed.tables import TABLES, DeltaRsWriter


def read_table(location: str, table: str, model_id: str | None = None) -> pa.Table:
    """A feature table from a folder of Delta tables, restricted to `model_id` (default: the current model)."""
    from deltalake import DeltaTable

    writer = DeltaRsWriter(location)
    spec = next((s for s in TABLES if s.name == table), None)
    if spec is None:
        raise ValueError(f"unknown table {table!r}; one of {', '.join(s.name for s in TABLES)}")
    model_id = model_id or writer.current_model()
    if model_id is None:
        raise LookupError(f"no current model is set under {location}")
    return DeltaTable(writer.location(spec)).to_pyarrow_table(filters=[("model_id", "=", model_id)])
