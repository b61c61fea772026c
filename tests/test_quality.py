"""Vector statistics, drift and the gates that judge them, on small hand-made tables checked with numpy."""

import math

import numpy as np
import pytest

from depop_embed import quality
from depop_embed.config import ThresholdsConfig

KEY = ["listing_id", "model_id"]
ROWS = "listing_id string, model_id string, text_hash string, embedding array<float>, status string"


def test_vector_stats_count_non_finite_vectors_and_take_norms_of_the_rest(spark):
    vectors = [[3.0, 4.0], [1.0, 0.0], [0.6, 0.8], [math.nan, 0.0], [math.inf, 1.0], None]
    df = spark.createDataFrame([(str(i), v, [1.0, 0.0]) for i, v in enumerate(vectors)], "id string, embedding array<float>, other_embedding array<float>")
    stats = quality.vector_stats(df.agg(*quality.vector_aggregates(df)).first(), df.columns)
    norms = np.linalg.norm(np.array(vectors[:3]), axis=1)
    s = stats["embedding"]
    assert (s.vectors, s.non_finite) == (5, 2)
    assert (s.norm_min, s.norm_max) == pytest.approx((norms.min(), norms.max()))
    assert s.norm_mean == pytest.approx(norms.mean())
    assert stats["other_embedding"] == quality.VectorStats(6, 0, 1.0, 1.0, 1.0)
    assert quality.vector_aggregates(df.select("id")) == [] and quality.vector_stats(None, ["id"]) == {}


def test_drift_compares_only_unchanged_ok_rows_of_the_same_model(spark):
    rng = np.random.default_rng(3)
    new = {i: rng.normal(size=4) for i in range(4)}
    old = {i: new[i] + rng.normal(scale=0.5, size=4) for i in range(4)}  # stored: not normalised, and moved
    staged = spark.createDataFrame(
        [("L0", "m1", "h0", new[0].tolist(), "ok"), ("L1", "m1", "h1", new[1].tolist(), "ok"),
         ("L2", "m1", "h2-edited", new[2].tolist(), "ok"), ("L3", "m1", "h3", None, "error")],
        ROWS,
    )
    stored = spark.createDataFrame(
        [("L0", "m1", "h0", old[0].tolist(), "ok"), ("L1", "m1", "h1", old[1].tolist(), "ok"),
         ("L2", "m1", "h2", old[2].tolist(), "ok"), ("L3", "m1", "h3", old[3].tolist(), "ok"),
         ("L0", "m0", "h0", (-new[0]).tolist(), "ok")],  # another model's vector for the same listing
        ROWS,
    )

    def cos(a, b):
        a, b = np.float32(a).astype(np.float64), np.float32(b).astype(np.float64)
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    d = quality.drift(staged, stored, KEY, "text_hash")
    assert d.rows == 2  # L2's text changed, L3 failed to encode, m0 is another model
    assert d.mean_cosine == pytest.approx((cos(new[0], old[0]) + cos(new[1], old[1])) / 2, abs=1e-6)
    assert quality.drift(staged, stored.limit(0), KEY, "text_hash") == quality.Drift(0, None)
    assert quality.drift(staged, stored.where("model_id = 'm0'"), KEY, "text_hash") == quality.Drift(0, None)


def test_gates_name_the_breach_and_the_threshold():
    gates = ThresholdsConfig(min_listings=10, max_non_finite=1, min_drift_cosine=0.99)
    assert quality.source_breaches(10, gates) == []
    assert quality.source_breaches(0, gates) == ["listings: 0 rows read, fewer than thresholds.min_listings 10"]

    fine = quality.VectorStats(5, 0, 1.0, 1.0, 1.0)
    assert quality.vector_breaches({"t": {"embedding": fine}}, {"t": quality.Drift(5, 0.995), "u": quality.Drift(0, None)}, gates) == []
    stats = {"t": {"embedding": quality.VectorStats(5, 1, 1.0, 1.0, 1.0)}, "l": {"multimodal_embedding": quality.VectorStats(5, 1, 1.0, 1.0, 1.0)}}
    (non_finite,) = quality.vector_breaches(stats, {}, gates)
    assert non_finite == "2 vectors hold NaN or infinity (t.embedding: 1, l.multimodal_embedding: 1), over thresholds.max_non_finite 1"
    drifted = quality.vector_breaches({}, {"t": quality.Drift(40, 0.8), "u": quality.Drift(3, math.nan)}, gates)
    assert drifted[0] == "t: mean cosine to the stored vectors of 40 unchanged rows is 0.8000, under thresholds.min_drift_cosine 0.99"
    assert drifted[1].startswith("u: mean cosine to the stored vectors of 3 unchanged rows is nan")
