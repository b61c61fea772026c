"""The open_clip encoder as an MLflow model: packaged, logged, registered, and fetched back for a run.

The registered model is a pyfunc over a model package (`encoders.save_package`: safetensors weights,
architecture, preprocess settings, tokenizer name). Its input is a DataFrame with an `image` column (photo
bytes) and/or a `text` column; its output holds L2-normalised `image_embedding` / `text_embedding` and
an `error` for photos that cannot be decoded. It builds its model through `encoders` and decodes photos
through `photos`, as the embedding job does, so its vectors equal the tables'. The pyfunc is logged as
code (`mlflow_model.py`), not pickled.

The job runs a registered model by `models:/NAME/VERSION` or `models:/NAME@ALIAS`: `pin` resolves an
alias once, on the driver, and `download` fetches that version's package to a folder the workers build
from.
"""

from __future__ import annotations

import io
import logging
import tempfile
from dataclasses import replace
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import Model

from depop_embed import encoders, photos, tracking
from depop_embed.config import REGISTERED_MODEL, Config, EncodeConfig, ModelConfig, TrackingConfig

log = logging.getLogger(__name__)

PACKAGE_ARTIFACT = "package"
_MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# What depop_embed's model code imports, pinned to this environment's versions (no inference run).
_REQUIREMENTS = ("torch", "torchvision", "open_clip_torch", "pillow", "safetensors", "numpy", "pandas", "pyarrow", "pyyaml")


class OpenClipEmbedder(mlflow.pyfunc.PythonModel):
    """DataFrame(image: bytes, text: str; either may be absent or null) -> DataFrame(image_embedding,
    text_embedding, error)."""

    batch_size = 32
    max_image_pixels = EncodeConfig.max_image_pixels

    def load_context(self, context) -> None:
        self.encoder = encoders.build_packaged_encoder(context.artifacts[PACKAGE_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return _embed_frame(self.encoder, model_input, self.batch_size, self.max_image_pixels)


def _embed_frame(encoder: encoders.Encoder, frame: pd.DataFrame, batch_size: int, max_image_pixels: int) -> pd.DataFrame:
    n = len(frame)
    errors: list = [None] * n
    pixels = {}
    for i, data in enumerate(frame["image"] if "image" in frame else []):
        if not isinstance(data, (bytes, bytearray, memoryview)):  # null: no photo in this row
            continue
        try:
            # Draft-decoded like the job's default (encode.jpeg_draft), so serving sees the job's pixels.
            pixels[i] = encoder.load_photo(bytes(data), max_image_pixels)
        except photos.PhotoError as exc:
            errors[i] = str(exc)
    texts = {i: t for i, t in enumerate(frame["text"] if "text" in frame else []) if isinstance(t, str) and t}
    return pd.DataFrame({
        "image_embedding": _in_batches(n, pixels, lambda batch: encoder.encode_images(encoder.photo_input(batch)), batch_size),
        "text_embedding": _in_batches(n, texts, encoder.encode_texts, batch_size),
        "error": errors,
    })


def _in_batches(n: int, inputs: dict[int, Any], encode, batch_size: int) -> list:
    """Encode {row: input} in batches -> a list of n vectors (None for rows without input)."""
    vectors: list = [None] * n
    rows = list(inputs)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        for i, vector in zip(batch, encode([inputs[i] for i in batch])):
            vectors[i] = vector.tolist()
    return vectors


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image", required=False), ColSpec(DataType.string, "text", required=False)]),
        outputs=Schema([
            ColSpec(Array(DataType.float), "image_embedding", required=False),
            ColSpec(Array(DataType.float), "text_embedding", required=False),
            ColSpec(DataType.string, "error", required=False),
        ]),
    )


def _input_example() -> pd.DataFrame:
    from PIL import Image

    photo = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(photo, format="JPEG")
    return pd.DataFrame({"image": [photo.getvalue()], "text": ["Red cotton t-shirt. Nike. size M"]})


def register(cfg: Config, name: str, alias: str | None = None) -> str:
    """Log the model `cfg.model` names (pretrained tag, checkpoint or seed) as a pyfunc in an MLflow run,
    register it as `name`, optionally point `alias` at the new version; returns `models:/NAME/VERSION`."""
    if cfg.model.registered is not None:
        raise ValueError("model.registered: register a model from a pretrained tag, a checkpoint or a seed")
    source_id = encoders.model_id(cfg.model)
    with mlflow.start_run(experiment_id=tracking.experiment_id(cfg.tracking), run_name=f"register {name}"):
        mlflow.log_params({"source_model_id": source_id, "architecture": cfg.model.name})
        with tempfile.TemporaryDirectory() as tmp:
            package = encoders.save_package(cfg.model, Path(tmp) / PACKAGE_ARTIFACT)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(_MODEL_CODE),
                artifacts={PACKAGE_ARTIFACT: str(Path(tmp) / PACKAGE_ARTIFACT)},
                code_paths=[str(Path(__file__).parent)],
                signature=_signature(),
                input_example=_input_example(),
                pip_requirements=[f"{p}=={installed_version(p)}" for p in _REQUIREMENTS],
                registered_model_name=name,
                metadata={"source_model_id": source_id, "embed_dim": package["embed_dim"]},
            )
    version = str(info.registered_model_version)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    log.info("registered %s as models:/%s/%s%s", source_id, name, version, f" (@{alias})" if alias else "")
    return f"models:/{name}/{version}"


def pin(model: ModelConfig, tracking_cfg: TrackingConfig) -> ModelConfig:
    """A registered model pinned to the version its alias points at now (a version is checked to exist);
    any other model as it is."""
    if model.registered is None:
        return model
    match = REGISTERED_MODEL.match(model.registered)  # config.validate checked the form
    tracking.configure(tracking_cfg)
    client = mlflow.MlflowClient()
    if match["alias"]:
        found = client.get_model_version_by_alias(match["name"], match["alias"])
    else:
        found = client.get_model_version(match["name"], match["version"])
    pinned = f"models:/{found.name}/{found.version}"
    log.info("model %s is %s", model.registered, pinned)
    return replace(model, registered=pinned)


def download(model: ModelConfig, tracking_cfg: TrackingConfig, download_dir: str) -> str | None:
    """The package folder of a pinned registered model, downloaded to `download_dir`; None for other models."""
    if model.registered is None:
        return None
    tracking.configure(tracking_cfg)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model.registered, dst_path=download_dir)
    flavor = Model.load(local).flavors["python_function"]
    return str(Path(local) / flavor["artifacts"][PACKAGE_ARTIFACT]["path"])
