"""Fine-tuning the configured model on the catalogue's own photo/text pairs, with open_clip's contrastive loss.

1. Spark builds the pairs from the sources: one row per readable photo with its listing's rendered text
   (`listing_text`, the embed job's template), split by a hash of `listing_id` (a listing is on one
   side only), and writes them as Parquet shards under the run folder. Nothing catalogue-sized comes
   to the driver.
2. Torch reads the shards one row group at a time (`PairShards`), decoding and preprocessing each photo
   exactly as the embed job does (`photos.decode`, the encoder's own transform), and trains with
   `open_clip.loss.ClipLoss` and the model's learnable temperature. Several GPUs: `TorchDistributor`.
3. Every epoch ends with a checkpoint (model, optimiser, schedule, step, RNG) and a validation of
   text -> listing recall@k and MRR on the held-out listings; a run started again resumes from the last
   checkpoint and, the data order being a function of (seed, epoch), ends where an unbroken run would.
4. The best epoch's weights are registered as a new model version (the `register_model` package) and
   the alias (`challenger`) is pointed at it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from depop_embed import encoders, listing_text, photos, registry, sources, tracking
from depop_embed.config import Config, ModelConfig
from depop_embed.session import resolve_engine

log = logging.getLogger(__name__)

PAIR_SCHEMA = "listing_id string, image_id string, text string, photo binary"
_ROW_GROUP_BYTES = 8 << 20  # what one read holds in memory, whatever the catalogue's size
LAST_CHECKPOINT = "last.pt"
BEST_WEIGHTS = "best.safetensors"


class StopRequested(RuntimeError):
    """`faults.stop_finetune_after_step`: the run stops as a killed one would, after its last checkpoint."""


@dataclass(frozen=True)
class TrainPlan:
    """Everything a training process needs (picklable, for TorchDistributor)."""

    cfg: Config
    run_dir: str
    train_dir: str
    val_dir: str
    model: ModelConfig  # the starting model, registered models pinned
    package_dir: str | None  # a registered starting model, downloaded
    mlflow_run_id: str


@dataclass
class FinetuneResult:
    run_id: str
    registered: str  # models:/NAME/VERSION of the best checkpoint
    steps: int
    train_pairs: int
    val_pairs: int
    val_listings: int
    best: dict[str, float]  # the best epoch's validation figures
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss and validation
    seconds: float = 0.0


def is_held_out(listing_id, val_percent: int):
    """The split, one rule for Spark and Python readers: a listing's hash bucket (0-99) below val_percent."""
    return F.pmod(F.xxhash64(listing_id), F.lit(100)) < val_percent


def training_pairs(spark: SparkSession, cfg: Config) -> tuple[DataFrame, dict[str, str]]:
    """(listing_id, image_id, text, photo bytes) per photo that reads and decodes, and the source snapshot."""
    src = sources.read(spark, cfg, resolve_engine(spark, cfg))
    text_cfg = cfg.text
    texts = src.listings.mapInPandas(
        lambda frames: (listing_text.render_frame(f, text_cfg)[["listing_id", "text"]] for f in frames),
        "listing_id string, text string",
    ).where(F.col("text") != "")
    fetch, max_pixels, rules = cfg.images.fetch, cfg.encode.max_image_pixels, sources.photo_rules(cfg.images)

    def readable(frames):
        for frame in frames:
            keep, data = [], []
            for uri in frame["uri"]:
                try:
                    raw = photos.read_bytes(uri, fetch, rules)
                    photos.decode(raw, max_pixels)  # only `ok` photos train; the embed job marks the rest
                except photos.PhotoError:
                    raw = None
                keep.append(raw is not None)
                data.append(raw)
            frame = frame.assign(photo=data)[keep]
            yield frame[["listing_id", "image_id", "text", "photo"]]

    pairs = src.images.select("listing_id", "image_id", "uri").join(texts, "listing_id").mapInPandas(readable, PAIR_SCHEMA)
    return pairs, src.snapshot


def write_pairs(spark: SparkSession, cfg: Config, run_dir: str) -> tuple[str, str, dict[str, str]]:
    """Write the train and validation shards under `run_dir`; returns their folders and the snapshot."""
    pairs, snapshot = training_pairs(spark, cfg)
    held_out = is_held_out(F.col("listing_id"), cfg.finetune.val_percent)
    folders = (os.path.join(run_dir, "pairs", "train"), os.path.join(run_dir, "pairs", "val"))
    writer_conf = {"parquet.block.size": str(_ROW_GROUP_BYTES)}
    for folder, side in zip(folders, (~held_out, held_out)):
        pairs.where(side).sortWithinPartitions("listing_id", "image_id").write.options(**writer_conf).mode("overwrite").parquet(folder)
    return folders[0], folders[1], snapshot


class PairShards:
    """Pairs from Parquet shards, a row group at a time, as (pixels, tokens) batches.

    The order is a function of (seed, epoch): the row groups are shuffled, then the rows inside each.
    Process `rank` of `world` reads every world-th row group. Only full batches are given (a contrastive
    batch of one pair teaches nothing), `steps` of them, the same count on every process.
    """

    def __init__(self, folder: str, encoder: encoders.Encoder, batch_size: int, seed: int, max_pixels: int,
                 draft: bool, rank: int = 0, world: int = 1):
        import pyarrow.parquet as pq

        self.encoder, self.batch_size, self.seed, self.max_pixels, self.draft = encoder, batch_size, seed, max_pixels, draft
        self.units = []  # (file, row group, rows)
        for path in sorted(Path(folder).glob("*.parquet")):
            meta = pq.ParquetFile(path).metadata
            self.units += [(str(path), g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        self.rank, self.world = rank, world
        per_rank = [sum(u[2] for i, u in enumerate(self.units) if i % world == r) for r in range(world)]
        self.rows = sum(per_rank)
        self.steps = min(per_rank) // batch_size

    def batches(self, epoch: int) -> Iterator[tuple[Any, Any, list[str]]]:
        import pyarrow.parquet as pq
        import torch

        rng = random.Random(f"{self.seed}/{epoch}")
        units = [u for i, u in enumerate(self.units) if i % self.world == self.rank]
        rng.shuffle(units)
        pixels, texts, ids, given = [], [], [], 0
        for path, group, _ in units:
            table = pq.ParquetFile(path).read_row_group(group, columns=["listing_id", "text", "photo"])
            order = list(range(table.num_rows))
            rng.shuffle(order)
            rows = table.to_pydict()
            for i in order:
                try:
                    # The embed job's own host half; `photo_input` below is its device half.
                    pixels.append(self.encoder.load_photo(rows["photo"][i], self.max_pixels, self.draft))
                except photos.PhotoError:  # write_pairs kept decodable photos only; a changed file is skipped
                    continue
                texts.append(rows["text"][i])
                ids.append(rows["listing_id"][i])
                if len(pixels) == self.batch_size:
                    yield self.encoder.photo_input(pixels), self.encoder.tokenizer(texts), ids
                    pixels, texts, ids, given = [], [], [], given + 1
                    if given == self.steps:
                        return


def held_out_vectors(encoder: encoders.Encoder, folder: str, max_pixels: int, draft: bool,
                     batch_size: int = 64) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(listing ids, photo vectors (a listing's photos averaged), text vectors) of the pairs in `folder`."""
    import pyarrow.parquet as pq
    import torch

    was_training = encoder.model.training
    encoder.model.eval()
    sums: dict[str, np.ndarray] = {}
    text_of: dict[str, str] = {}
    try:
        for path in sorted(Path(folder).glob("*.parquet")):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["listing_id", "text", "photo"]):
                rows = batch.to_pydict()
                pixels, owners = [], []
                for lid, text, data in zip(rows["listing_id"], rows["text"], rows["photo"]):
                    try:
                        pixels.append(encoder.load_photo(data, max_pixels, draft))
                    except photos.PhotoError:
                        continue
                    owners.append(lid)
                    text_of[lid] = text
                if pixels:
                    for lid, vector in zip(owners, encoder.encode_images(encoder.photo_input(pixels))):
                        sums[lid] = sums.get(lid, 0) + vector
        ids = sorted(sums)
        if not ids:
            return [], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        listings = np.stack([sums[i] for i in ids])
        listings /= np.linalg.norm(listings, axis=1, keepdims=True)
        queries = np.concatenate([encoder.encode_texts([text_of[i] for i in ids[s : s + batch_size]])
                                  for s in range(0, len(ids), batch_size)])
    finally:
        encoder.model.train(was_training)
    return ids, listings, queries


def retrieval_scores(listings: np.ndarray, queries: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Query i's own listing is listing i: recall@k and mean reciprocal rank of text -> listing search."""
    if not len(listings):
        return {}
    scores = queries @ listings.T
    own = scores[np.arange(len(listings)), np.arange(len(listings))]
    rank = (scores > own[:, None]).sum(axis=1)  # 0 = first
    out = {f"recall_at_{k}": float((rank < k).mean()) for k in ks}
    out["mrr"] = float((1.0 / (rank + 1)).mean())
    out["listings"] = float(len(listings))
    return out


def validation_scores(encoder: encoders.Encoder, folder: str, ks: tuple[int, ...], max_pixels: int, draft: bool) -> dict[str, float]:
    """Text -> listing retrieval over the held-out listings: each listing's text a query over the
    listings' photo vectors."""
    _, listings, queries = held_out_vectors(encoder, folder, max_pixels, draft)
    return retrieval_scores(listings, queries, ks)


def _schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(plan: TrainPlan) -> dict[str, Any] | None:
    """One training process: all epochs from the last checkpoint on. Rank 0 returns the figures."""
    import torch
    from open_clip.loss import ClipLoss

    cfg, ft = plan.cfg, plan.cfg.finetune
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's contract
    distributed = world > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    gpu = os.environ.get("LOCAL_RANK") if distributed and torch.cuda.is_available() else None
    device = encoders.resolve_device(cfg.model.device, gpu)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    encoder = encoders.build_encoder(plan.model, device, plan.package_dir)
    model = encoder.model
    if ft.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if ft.lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if gpu else None) if distributed else model
    data = PairShards(plan.train_dir, encoder, ft.batch_size, ft.seed, cfg.encode.max_image_pixels, cfg.encode.jpeg_draft, rank, world)
    if data.steps == 0:
        raise ValueError(f"finetune: {data.rows} training pairs cannot fill one batch of {ft.batch_size} per process")
    total = data.steps * ft.epochs
    # Gains, biases, norms and the temperature carry no weight decay (as in open_clip's own training).
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": ft.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=ft.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(ft.warmup_steps, total))
    autocast_dtype = encoder.autocast_dtype  # None on the CPU: plain fp32
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world)

    checkpoints = Path(plan.run_dir) / "checkpoints"
    state = {"epoch": 0, "step": 0, "best_mrr": -1.0, "best": {}, "history": []}
    if (checkpoints / LAST_CHECKPOINT).is_file():
        saved = torch.load(checkpoints / LAST_CHECKPOINT, map_location=device, weights_only=True)  # no pickle
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        state = saved["state"]
        log.info("finetune: resuming after epoch %d (step %d)", state["epoch"], state["step"])
    tracker = tracking.RunTracker(_client(cfg), plan.mlflow_run_id) if rank == 0 else None
    stop_after = cfg.faults.stop_finetune_after_step
    pending: dict[int, dict[str, float]] = {}
    for epoch in range(state["epoch"], ft.epochs):
        losses = []
        for pixels, tokens, _ in data.batches(epoch):
            with torch.autocast(device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None):
                image_features, text_features, logit_scale = _features(ddp(pixels.to(device), tokens.to(device)))
                loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():  # open_clip's own training clamps the temperature at 1/100
                model.logit_scale.clamp_(0, math.log(100))
            state["step"] += 1
            losses.append(float(loss.detach()))
            pending[state["step"]] = {"train/loss": losses[-1], "train/temperature": float(1.0 / model.logit_scale.detach().exp()),
                                      "train/learning_rate": scheduler.get_last_lr()[0]}
            if tracker and len(pending) >= 25:
                _flush(tracker, pending)
            if stop_after and state["step"] >= stop_after:
                if tracker:
                    _flush(tracker, pending)
                raise StopRequested(f"faults.stop_finetune_after_step={stop_after}: stopped at step {state['step']}")
        if tracker:
            _flush(tracker, pending)
        if rank == 0:
            scores = validation_scores(encoder, plan.val_dir, cfg.evaluation.ks, cfg.encode.max_image_pixels, cfg.encode.jpeg_draft)
            epoch_figures = {"train_loss": float(np.mean(losses)), **scores}
            tracker.log_metrics({f"val/{k}": v for k, v in scores.items()} | {"train/epoch_loss": epoch_figures["train_loss"]}, step=state["step"])
            state["history"].append(epoch_figures)
            if scores.get("mrr", 0.0) > state["best_mrr"]:
                state["best_mrr"], state["best"] = scores.get("mrr", 0.0), {**scores, "epoch": epoch, "step": state["step"]}
                checkpoints.mkdir(parents=True, exist_ok=True)
                encoders.save_checkpoint(model, checkpoints / BEST_WEIGHTS)
            state["epoch"] = epoch + 1
            _save(checkpoints, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "state": state,
            })
            log.info("finetune: epoch %d, step %d, loss %.4f, val %s", epoch, state["step"], epoch_figures["train_loss"], scores)
        else:
            state["epoch"] = epoch + 1
        if distributed:
            torch.distributed.barrier()
    if distributed:
        torch.distributed.destroy_process_group()
    return {"steps": state["step"], "best": state["best"], "history": state["history"]} if rank == 0 else None


def _features(output: Any) -> tuple[Any, Any, Any]:
    if isinstance(output, dict):
        return output["image_features"], output["text_features"], output["logit_scale"]
    return output[0], output[1], output[2]


def _save(folder: Path, checkpoint: dict) -> None:
    """Written aside and renamed: a kill while saving leaves the previous checkpoint whole."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{LAST_CHECKPOINT}.partial"
    torch.save(checkpoint, partial)
    os.replace(partial, folder / LAST_CHECKPOINT)


def _client(cfg: Config):
    import mlflow

    tracking.configure(cfg.tracking)
    return mlflow.MlflowClient()


def _flush(tracker: tracking.RunTracker, pending: dict[int, dict[str, float]]) -> None:
    for step, metrics in pending.items():
        tracker.log_metrics(metrics, step=step)
    pending.clear()


def finetune(spark: SparkSession, cfg: Config, run_name: str, resume: bool = True) -> FinetuneResult:
    """Fine-tune `cfg.model` on the sources' pairs in `finetune.run_dir/run_name`, register the best epoch.

    A folder that holds a checkpoint is resumed (its pair shards reused, so it trains on the snapshot it
    started with); `resume=False` starts it over."""
    ft = cfg.finetune
    started = time.monotonic()
    run_dir = os.path.abspath(os.path.join(ft.run_dir, run_name))
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    model = registry.pin(cfg.model, cfg.tracking)
    package_dir = registry.download(model, cfg.tracking, os.path.join(run_dir, "start_model"))
    with tracking.tracked_run(cfg, f"finetune {run_name}") as tracker:
        tracker.client.set_tag(tracker.run_id, "depop_embed.job", "finetune")
        marker = Path(run_dir) / "pairs" / "snapshot.json"
        train_dir, val_dir = os.path.join(run_dir, "pairs", "train"), os.path.join(run_dir, "pairs", "val")
        if marker.is_file():
            snapshot = json.loads(marker.read_text())
        else:
            train_dir, val_dir, snapshot = write_pairs(spark, cfg, run_dir)
            marker.write_text(json.dumps(snapshot))
        train_pairs, val_pairs = _rows(train_dir), _rows(val_dir)
        tracker.log_params({f"source.{k}": v for k, v in snapshot.items()} | {
            "finetune.start_model": encoders.model_id(model), "finetune.train_pairs": train_pairs, "finetune.val_pairs": val_pairs,
        })
        plan = TrainPlan(cfg, run_dir, train_dir, val_dir, model, package_dir, tracker.run_id)
        if ft.num_processes > 1:
            from pyspark.ml.torch.distributor import TorchDistributor

            # A single-node cluster trains on the driver's GPUs, a cluster with workers on theirs.
            local = spark.sparkContext.master.startswith("local")
            outcome = TorchDistributor(num_processes=ft.num_processes, local_mode=local, use_gpu=True).run(train, plan)
        else:
            outcome = train(plan)
        best_weights = Path(run_dir) / "checkpoints" / BEST_WEIGHTS
        registered = registry.register(replace(cfg, model=_checkpoint_model(model, package_dir, best_weights)), ft.registered_model, ft.alias)
        tracker.log_params({"finetune.registered": registered})
        tracker.log_metrics({f"best/{k}": v for k, v in outcome["best"].items()})
    return FinetuneResult(
        run_id=tracker.run_id, registered=registered, steps=outcome["steps"], train_pairs=train_pairs, val_pairs=val_pairs,
        val_listings=int(outcome["best"].get("listings", 0)), best=outcome["best"], history=outcome["history"],
        seconds=time.monotonic() - started,
    )


def _checkpoint_model(start: ModelConfig, package_dir: str | None, weights: Path) -> ModelConfig:
    """The trained weights as a checkpoint of the starting model's architecture."""
    name, config_path = start.name, start.config_path
    if package_dir is not None:
        package = encoders.read_package(package_dir)
        name = package["architecture"]
        config_path = str(Path(package_dir) / package["architecture_config"]) if package["architecture_config"] else None
    return ModelConfig(name=name, checkpoint=str(weights), config_path=config_path, device=start.device, precision=start.precision)


def _rows(folder: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in Path(folder).glob("*.parquet"))
