"""Is a model's vector space any good? Figures to read before a model becomes `current`.

* text -> listing retrieval: each listing's own title, embedded by the model's text tower, is a query
  over the listings' image (and multimodal) vectors; recall@k is the share of listings found among
  the first k;
* neighbour agreement: the share of a listing's k nearest listings with the same category, and with
  the same brand (over listings that have one), by each kind of vector.

The same listings (a fixed hash sample of the active ones when there are more than
`evaluation.max_listings`) are evaluated for the candidate and for the baseline: the model consumers
read now, or, when the candidate is that one, the model they read before it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from depop_embed import encoders, report, sources, tracking
from depop_embed.config import Config, EvaluationConfig
from depop_embed.reader import EMBEDDING_COLUMNS, EmbeddingReader, ListingVectors, hash_sample
from depop_embed.session import resolve_engine

log = logging.getLogger(__name__)

RECALL_BY = ("image", "multimodal")  # what a title query searches (the text vector holds the title itself)
LISTING_FIELDS = ["listing_id", "title", "category", "brand"]


@dataclass
class ModelScores:
    model_id: str
    listings: int  # listings evaluated
    recall: dict[str, dict[int, float]] = field(default_factory=dict)  # by -> k -> recall@k
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)  # by -> category / brand -> share

    def metrics(self, prefix: str, agreement_k: int) -> dict[str, float]:
        out = {f"{prefix}/listings": float(self.listings)}
        for by, recalls in self.recall.items():
            out.update({f"{prefix}/recall_at_{k}/{by}": value for k, value in recalls.items()})
        for by, shares in self.agreement.items():
            out.update({f"{prefix}/{what}_agreement_at_{agreement_k}/{by}": v for what, v in shares.items()})
        return out


@dataclass
class Evaluation:
    candidate: ModelScores
    baseline: ModelScores | None
    report_path: Path
    mlflow_run_id: str


def recall_at(vectors: ListingVectors, queries: np.ndarray, query_ids: list[str], ks: tuple[int, ...]) -> dict[int, float]:
    """Share of queries whose own listing is among the first k answers, per k."""
    found, _ = vectors.nearest(queries, max(ks))
    own = np.asarray(query_ids, dtype=object)[:, None]
    return {k: float((found[:, :k] == own).any(axis=1).mean()) for k in ks}


def agreement_at(vectors: ListingVectors, listings: pd.DataFrame, k: int) -> dict[str, float]:
    """Share of each listing's k nearest others with its category; and its brand, over listings with one."""
    neighbours, _ = vectors.nearest(vectors.matrix, k, exclude=list(vectors.ids))
    fields = listings.set_index("listing_id").reindex(vectors.ids)
    shares = {}
    for what in ("category", "brand"):
        own = fields[what].to_numpy(dtype=object)
        theirs = fields[what].reindex(neighbours.ravel()).to_numpy(dtype=object).reshape(neighbours.shape)
        has = pd.notna(own) & (own != "")
        shares[what] = float((theirs[has] == own[has, None]).mean()) if has.any() and neighbours.shape[1] else float("nan")
    return shares


def score_model(reader: EmbeddingReader, model_id: str, listings: pd.DataFrame, ids: list[str], cfg: EvaluationConfig) -> ModelScores:
    """Recall and agreement of one model over the listings `ids`."""
    listings = listings[listings["listing_id"].isin(ids)]
    scores = ModelScores(model_id, len(listings))
    titled = listings[listings["title"].fillna("").str.strip() != ""]
    queries = reader.embed_queries(titled["title"].tolist(), model_id)
    query_row = dict(zip(titled["listing_id"], range(len(titled))))
    for by in EMBEDDING_COLUMNS:
        vectors = reader.vectors(by, model_id).subset(ids)
        if not len(vectors):
            continue
        scores.agreement[by] = agreement_at(vectors, listings, cfg.agreement_k)
        if by in RECALL_BY:
            asked = [i for i in vectors.ids if i in query_row]
            scores.recall[by] = recall_at(vectors, queries[[query_row[i] for i in asked]], asked, cfg.ks)
    return scores


def baseline_model(reader: EmbeddingReader, candidate: str) -> str | None:
    """The model to compare with: the current one, or the one before it when the candidate is current."""
    history = reader.writer.model_history()
    if history and history[0] != candidate:
        return history[0]
    return next((m for m in history[1:] if m != candidate), None)


def evaluate(spark: SparkSession, cfg: Config, model_id: str | None = None, baseline: str | None = None) -> Evaluation:
    """Score a model (default: the current one) and its baseline, write the HTML report, and record both
    in an MLflow run."""
    reader = EmbeddingReader.from_config(cfg, spark)
    candidate = model_id or reader.current_model()
    baseline = baseline or baseline_model(reader, candidate)
    src = sources.read(spark, cfg, resolve_engine(spark, cfg))
    try:
        listings = src.listings.select(*LISTING_FIELDS).toPandas()
    finally:
        src.unpersist()
    ev = cfg.evaluation
    active = set(reader.vectors("multimodal", candidate).ids)
    if baseline:
        active &= set(reader.vectors("multimodal", baseline).ids)
    ids = hash_sample(sorted(active & set(listings["listing_id"])), ev.max_listings)
    if not ids:
        raise LookupError(f"model {candidate}: no active listings to evaluate under {cfg.output.location}")
    with tracking.tracked_run(cfg, f"evaluate {candidate}") as tracker:
        tracker.client.set_tag(tracker.run_id, "depop_embed.job", "evaluate")
        tracker.log_params({"evaluation.candidate": candidate, "evaluation.baseline": baseline or "", "evaluation.listings": len(ids)})
        scored = {"candidate": score_model(reader, candidate, listings, ids, ev)}
        if baseline:
            scored["baseline"] = score_model(reader, baseline, listings, ids, ev)
        for role, scores in scored.items():
            tracker.log_metrics(scores.metrics(role, ev.agreement_k))
        path = Path(ev.report_dir) / f"evaluation-{encoders.file_name(candidate)}.html"
        report.write(path, report.gather(reader, cfg, scored["candidate"], scored.get("baseline"), listings, ids))
        tracker.client.log_artifact(tracker.run_id, str(path), "report")
        tracker.client.log_text(tracker.run_id, json.dumps({r: asdict(s) for r, s in scored.items()}, indent=2), "evaluation.json")
        log.info("evaluation of %s (baseline %s) over %d listings -> %s", candidate, baseline, len(ids), path)
    return Evaluation(scored["candidate"], scored.get("baseline"), path, tracker.run_id)

