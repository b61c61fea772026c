"""The batching and per-row error handling of the encoder UDFs, with tiny numpy 'models'."""

import numpy as np
import pandas as pd

from depop_embed.udfs import CounterParam, _batches, _encode_rows


def fake_model(bad_rows=(), nan_rows=()):
    """Encodes row i as a unit vector; fails any batch holding a bad row; NaN for nan rows."""

    def encode(rows):
        if any(i in bad_rows for i in rows):
            raise RuntimeError("CUDA out of memory")
        out = np.zeros((len(rows), 4), dtype=np.float32)
        for j, i in enumerate(rows):
            out[j, i % 4] = np.nan if i in nan_rows else 1.0
        return out

    return encode


def test_a_failing_batch_is_retried_row_by_row_so_only_the_bad_row_fails():
    vectors, errors = _encode_rows(fake_model(bad_rows={2}, nan_rows={3}), [0, 1, 2, 3, 5], n=6)
    assert errors[2].startswith("encode_failed: RuntimeError: CUDA out of memory")
    assert errors[3].startswith("non_finite") and vectors[3] is None
    assert vectors[4] is None and errors[4] is None  # not asked for (e.g. a photo that did not decode)
    for i in (0, 1, 5):
        assert errors[i] is None and vectors[i][i % 4] == 1.0


def test_nothing_to_encode():
    assert _encode_rows(fake_model(), [], n=2) == ([None, None], [None, None])


def test_batches_cover_every_row_once_in_order():
    frame = pd.DataFrame({"x": range(10)}, index=range(100, 110))
    batches = list(_batches(frame, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert pd.concat(batches)["x"].tolist() == list(range(10))
    assert batches[1].index.tolist() == [0, 1, 2, 3]


def test_counters_merge_nested_dicts():
    param = CounterParam()
    total = param.zero({})
    param.addInPlace(total, {"model_loads": 1, "model_loads_by_worker": {"11": 1}})
    param.addInPlace(total, {"model_loads": 1, "model_loads_by_worker": {"12": 1}, "images": 8})
    assert total == {"model_loads": 2, "model_loads_by_worker": {"11": 1, "12": 1}, "images": 8}
