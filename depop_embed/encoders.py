"""The only place that builds models: open_clip by architecture plus pretrained tag, checkpoint or seed,
or from a model package (a registered MLflow model, downloaded).

`model_id` names exactly which weights produced a vector, and is computed on the driver without
building the model. `Encoder` wraps a built model with its tokenizer and returns L2-normalised
float32 vectors. Photos reach it as uint8 pixels decoded on the host (`photos.decode_pixels`) or as
JPEG bytes for the device's decoder (`photos.jpeg_for_device`); `Encoder.photo_input` is the one
place that turns them into the model's input, as a batch on the model's device: open_clip's eval
transform (resize, crop or pad, scale, normalise) redone in torch from the model's preprocess config. Texts run through the text tower in buckets of similar token
length, each only as long as its longest text needs (see `_TextCut`).

A package is a folder: the weights as safetensors, the architecture JSON of a custom architecture, and
`PACKAGE_FILE`, which names the architecture and tokenizer and holds the preprocess settings (a
pretrained tag's mean/std/interpolation differ from the architecture's defaults and would be lost with
the tag).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from depop_embed import photos
from depop_embed.config import REGISTERED_MODEL, ModelConfig

PACKAGE_FILE = "depop_embed_model.json"
_PACKAGE_WEIGHTS = "open_clip_model.safetensors"
_PREPROCESS_OVERRIDES = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation", "resize_mode": "image_resize_mode"}

TEXT_BUCKET = 8  # token lengths are rounded up to this to group texts: at most 7 wasted positions each
# Pixels per group that `photo_input` resizes at once (and per batch the device JPEG decoder gets):
# 32 M pixels are 96 MB as uint8 and 384 MB as float32, whatever the photos' sizes.
PHOTO_GROUP_PIXELS = 1 << 25


def model_id(cfg: ModelConfig) -> str:
    if cfg.registered is not None:
        spec = REGISTERED_MODEL.match(cfg.registered)
        if spec is None or spec["version"] is None:
            raise ValueError(f"model.registered: {cfg.registered} must name a version (resolve an alias first)")
        return f"registered/{spec['name']}/{spec['version']}"
    if cfg.pretrained is not None:
        return f"{cfg.name}/{cfg.pretrained}"
    if cfg.checkpoint is not None:
        return f"{cfg.name}/sha256-{_file_digest(cfg.checkpoint)[:16]}"
    return f"{cfg.name}/seed-{cfg.seed}"


def file_name(mid: str) -> str:
    """A model_id as a file or folder name."""
    return re.sub(r"[^\w.-]+", "_", mid)


def model_config_for(mid: str, base: ModelConfig) -> ModelConfig:
    """The model config that rebuilds the weights `mid` names: the inverse of `model_id`, for encoding
    queries against stored vectors. `base` (the configured model) gives the device, the precision and a
    custom architecture's config file; a checkpoint digest cannot be turned back into its file, so a
    checkpoint's model must be the configured one."""
    try:
        if model_id(base) == mid:
            return base
    except (ValueError, FileNotFoundError):  # an alias not pinned, a checkpoint not on this machine
        pass
    common = {"device": base.device, "precision": base.precision}
    if mid.startswith("registered/"):
        name, _, version = mid.removeprefix("registered/").rpartition("/")
        return ModelConfig(registered=f"models:/{name}/{version}", **common)
    arch, _, weights = mid.rpartition("/")
    if not arch or not weights:
        raise ValueError(f"model_id {mid!r} is not ARCHITECTURE/WEIGHTS or registered/NAME/VERSION")
    config_path = base.config_path if arch == base.name else None
    if weights.startswith("sha256-"):
        raise ValueError(
            f"model {mid} was built from a checkpoint file: configure it (model.name={arch}, "
            "model.checkpoint=<that file>) to encode queries for it"
        )
    if weights.startswith("seed-") and weights[5:].isdigit():
        return ModelConfig(name=arch, seed=int(weights[5:]), config_path=config_path, **common)
    return ModelConfig(name=arch, pretrained=weights, config_path=config_path, **common)


def embedding_dim(cfg: ModelConfig, package_dir: str | None = None) -> int:
    """The vector size of an architecture, read from its open_clip config (no weights built)."""
    import open_clip

    if cfg.registered is not None:
        return int(read_package(_required(package_dir))["embed_dim"])
    _register_config(cfg.config_path)
    model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise ValueError(f"model.name: {cfg.name!r} is not an open_clip architecture")
    return int(model_cfg["embed_dim"])


@dataclass(frozen=True)
class PhotoTransform:
    """open_clip's eval transform (`open_clip.transform.image_transform`) for one model, as torch ops
    over a batch of same-sized uint8 images: resize (antialiased, so a reduction averages as Pillow's
    does), center crop or pad, scale to [0, 1], normalise. Sizes and crop offsets are computed exactly
    as torchvision and open_clip compute them."""

    size: tuple[int, int]  # (height, width) of the model's input
    resize_mode: str  # shortest | longest | squash
    interpolation: str  # bicubic | bilinear
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fill_color: int  # padding of `longest`

    @classmethod
    def of(cls, preprocess_cfg: dict) -> PhotoTransform:
        size = preprocess_cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        interpolation = "bilinear" if preprocess_cfg.get("interpolation") == "bilinear" else "bicubic"
        return cls(
            size=size, resize_mode=preprocess_cfg.get("resize_mode") or "shortest", interpolation=interpolation,
            mean=tuple(preprocess_cfg["mean"]), std=tuple(preprocess_cfg["std"]),
            fill_color=int(preprocess_cfg.get("fill_color") or 0),
        )

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the resize step gives an image of this size."""
        target_h, target_w = self.size
        if self.resize_mode == "squash":
            return self.size
        if self.resize_mode == "shortest" and target_h == target_w:
            # torchvision's Resize(int): the short side to the size, the long side truncated.
            short, long = sorted((height, width))
            new_long = int(target_h * long / short)
            return (new_long, target_h) if width <= height else (target_h, new_long)
        # open_clip's ResizeKeepRatio: one ratio for both sides, rounded.
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
        return round(height / ratio), round(width / ratio)

    def __call__(self, batch: Any) -> Any:
        """(N, 3, h, w) uint8 -> (N, 3, H, W) float32 on the same device."""
        import torch
        import torch.nn.functional as F

        height, width = batch.shape[-2:]
        new_size = self.resized(height, width)
        if new_size != (height, width):
            if batch.device.type == "cpu":
                # The CPU has a vectorised uint8 kernel for channels-last images, rounding to uint8 as Pillow does.
                batch = F.interpolate(batch, size=new_size, mode=self.interpolation, antialias=True)
            else:
                batch = F.interpolate(batch.float(), size=new_size, mode=self.interpolation, antialias=True)
                batch = batch.round_().clamp_(0, 255)  # Pillow's resize ends in uint8 too
        batch = self._crop_or_pad(batch)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1) * 255
        return (batch.float() - mean) / std

    def _crop_or_pad(self, batch: Any) -> Any:
        import torch.nn.functional as F

        crop_h, crop_w = self.size
        height, width = batch.shape[-2:]
        if crop_h > height or crop_w > width:
            pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
            fill = self.fill_color if self.resize_mode == "longest" else 0  # torchvision's CenterCrop pads with 0
            batch = F.pad(batch, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=fill)
            height, width = batch.shape[-2:]
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
        return batch[..., top : top + crop_h, left : left + crop_w]


@dataclass
class Encoder:
    model: Any
    preprocess: Any  # PIL image -> CHW float tensor: open_clip's own eval transform (the reference)
    tokenizer: Any
    device: str
    autocast_dtype: Any  # torch dtype, or None for plain fp32
    image_side: int  # the longer side of the model's input image, in pixels
    photo_transform: PhotoTransform
    text_cut: _TextCut | None = None  # None: every text runs over the whole context length

    def load_photo(self, data: bytes, max_pixels: int, draft: bool = True, device_jpeg: bool = False):
        """The host's half of a photo, for `photo_input`: (H, W, 3) uint8 pixels, decoded at the
        smallest JPEG draft scale that keeps the resize's quality (`draft`); or, with `device_jpeg`,
        a `photos.DeviceJpeg` for a JPEG the device can decode itself. Raises `photos.PhotoError`."""
        input_side = self.image_side if draft else 0
        if device_jpeg and (jpeg := photos.jpeg_for_device(data, max_pixels, input_side)) is not None:
            return jpeg
        return photos.decode_pixels(data, max_pixels, input_side)

    def photo_input(self, images: Sequence[Any]) -> Any:
        """The device's half: `load_photo` results -> the model's (N, 3, H, W) float32 input on its
        device, in the input order. Same-sized images are resized together; host pixels travel as
        uint8 (through pinned memory, without blocking, to a GPU). A JPEG the device decoder refuses
        is decoded on the host instead, whose `PhotoError` (a corrupt file) is raised."""
        import torch

        height, width = self.photo_transform.size
        out = torch.empty((len(images), 3, height, width), dtype=torch.float32, device=self.device)
        jpegs = [i for i, image in enumerate(images) if isinstance(image, photos.DeviceJpeg)]
        decoded = dict(zip(jpegs, self._decode_jpegs([images[i] for i in jpegs]))) if jpegs else {}
        pixels = [decoded.get(i, image) for i, image in enumerate(images)]
        for rows in _same_size_groups(pixels):
            out[rows] = self.photo_transform(self._to_device([pixels[i] for i in rows]))
        return out

    def _to_device(self, images: list) -> Any:
        """Same-sized (H, W, 3) uint8 images -> one (N, 3, H, W) uint8 channels-last tensor on the device."""
        import torch

        if isinstance(images[0], torch.Tensor):  # decoded on the device already
            return torch.stack(images).permute(0, 3, 1, 2)
        if self.device == "cpu":
            return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        staged = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=True)
        np.stack(images, out=staged.numpy())
        return staged.to(self.device, non_blocking=True).permute(0, 3, 1, 2)

    def _decode_jpegs(self, jpegs: list[photos.DeviceJpeg]) -> list:
        """JPEGs -> (H, W, 3) uint8 pixels, decoded by torchvision on the encoder's device (nvjpeg on a
        GPU, libjpeg-turbo on the CPU) in batches, turned upright as their EXIF says."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(group: list[photos.DeviceJpeg]) -> list:
            data = [torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in group]
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its image decoders for torchcodec's
                warnings.simplefilter("ignore")
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

        out: list = []
        for group in _pixel_groups(jpegs):
            try:
                chw = decode(group)
            except RuntimeError:  # the batch call gives nothing when one file fails: retry one by one
                chw = []
                for jpeg in group:
                    try:
                        chw += decode([jpeg])
                    except RuntimeError:
                        chw.append(None)
            out += [
                _upright(image, jpeg.orientation).permute(1, 2, 0) if image is not None else jpeg.decode_on_host()
                for image, jpeg in zip(chw, group)
            ]
        return out

    def encode_images(self, pixels: Any) -> np.ndarray:
        """A (N, 3, H, W) tensor from `photo_input` (or open_clip's `preprocess`) -> (N, dim) normalised float32."""
        import torch

        with torch.inference_mode(), self._autocast():
            features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return _normalised(features)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, dim) normalised float32; the tokenizer truncates at the context length."""
        import torch

        tokens = self.tokenizer(list(texts))
        with torch.inference_mode(), self._autocast():
            if self.text_cut is None or not len(tokens):
                features = self.model.encode_text(tokens.to(self.device, non_blocking=True))
            else:
                features = self._encode_text_buckets(tokens)
        return _normalised(features)

    def _encode_text_buckets(self, tokens: Any) -> Any:
        """Texts whose needed lengths round up to the same multiple of 8 run together, cut to their
        longest; results go back to the input order."""
        needed = self.text_cut.needed_lengths(tokens)
        buckets = (needed + TEXT_BUCKET - 1) // TEXT_BUCKET
        features = None
        for bucket in buckets.unique().tolist():
            rows = (buckets == bucket).nonzero().squeeze(1)
            length = int(needed[rows].max())
            with self.text_cut.positions(length):
                out = self.model.encode_text(tokens[rows, :length].to(self.device, non_blocking=True))
            if features is None:
                features = out.new_empty((len(tokens), out.shape[1]))
            features[rows.to(out.device)] = out
        return features

    def _autocast(self):
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.autocast_dtype)


def build_encoder(cfg: ModelConfig, device: str | None = None, package_dir: str | None = None) -> Encoder:
    """Build the model once; callers cache it (one per Python worker). A registered model
    (`cfg.registered`) is built from its package, downloaded to `package_dir`."""
    import open_clip
    import torch

    device = device or resolve_device(cfg.device)
    if cfg.registered is not None:
        return build_packaged_encoder(_required(package_dir), device, cfg.precision)
    _register_config(cfg.config_path)
    if cfg.seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(cfg.name, pretrained=None)
    else:
        # A tag or a local file: open_clip reads safetensors, or torch files with weights_only=True.
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.name, pretrained=cfg.pretrained or cfg.checkpoint, weights_only=True
        )
    return _encoder(model, preprocess, open_clip.get_tokenizer(cfg.name), device, cfg.precision)


def build_packaged_encoder(package_dir: str, device: str | None = None, precision: str = "auto") -> Encoder:
    """The encoder of a package written by `save_package`, preprocessing exactly as when it was saved."""
    import open_clip

    package = read_package(package_dir)
    if package["architecture_config"]:
        _register_config(str(Path(package_dir) / package["architecture_config"]))
    overrides = {arg: package["preprocess"][key] for key, arg in _PREPROCESS_OVERRIDES.items()}
    model, _, preprocess = open_clip.create_model_and_transforms(
        package["architecture"], pretrained=str(Path(package_dir) / package["weights"]), weights_only=True, **overrides
    )
    if _json_round_trip(model.visual.preprocess_cfg) != package["preprocess"]:
        raise ValueError(
            f"{package_dir}: open_clip rebuilt preprocessing {model.visual.preprocess_cfg}, "
            f"the package holds {package['preprocess']}"
        )
    tokenizer = open_clip.get_tokenizer(package["tokenizer"])
    return _encoder(model, preprocess, tokenizer, device or resolve_device("auto"), precision)


def save_package(cfg: ModelConfig, out_dir: str | Path) -> dict[str, Any]:
    """Write the model `cfg` names as a package folder (see the module docstring); returns its manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder = build_encoder(cfg, "cpu")
    save_checkpoint(encoder.model, out / _PACKAGE_WEIGHTS)
    architecture_config = None
    if cfg.config_path:
        # open_clip names a config file's architecture after the file, so the copy keeps the name.
        architecture_config = f"{cfg.name}.json"
        shutil.copyfile(cfg.config_path, out / architecture_config)
    package = {
        "architecture": cfg.name,
        "architecture_config": architecture_config,
        "weights": _PACKAGE_WEIGHTS,
        "preprocess": _json_round_trip(encoder.model.visual.preprocess_cfg),
        "tokenizer": cfg.name,  # open_clip picks the tokenizer by architecture name
        "embed_dim": embedding_dim(cfg),
        "source_model_id": model_id(cfg),
    }
    (out / PACKAGE_FILE).write_text(json.dumps(package, indent=2))
    return package


def read_package(package_dir: str | Path) -> dict[str, Any]:
    path = Path(package_dir) / PACKAGE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"not a model package: cannot read {path}: {exc}") from exc


@dataclass(frozen=True)
class _TextCut:
    """How to run a causal text tower over fewer than its context length of positions.

    With a causal mask, position p sees only positions up to p, so the vector pooled at the
    end-of-text token does not depend on the padding after it: a pass over the first `eot + 1`
    positions gives the same vector. open_clip 3.3.0 does not take shorter token tensors itself:
    `CLIP.encode_text` adds the whole position table and passes the whole causal mask, and
    `TextTransformer` cuts the position table but not the mask. `positions` cuts both on the
    tower for the duration of a pass, so the pass is still open_clip's own code. Towers where
    this would change the vector (no causal mask, pooling at the last position, an appended
    class token) or that are not open_clip's (Hugging Face) get no `_TextCut` and run in full.
    """

    tower: Any  # the module holding `positional_embedding` and `attn_mask`
    pool_type: str  # "argmax" (the EOT token has the highest id) or "eos"
    eos_id: int | None

    @classmethod
    def of(cls, model: Any) -> _TextCut | None:
        from open_clip import CLIP
        from open_clip.transformer import TextTransformer

        if isinstance(model, CLIP):
            tower, pool_type, eos_id = model, model.text_pool_type, model.text_eos_id
        elif isinstance(getattr(model, "text", None), TextTransformer) and model.text.cls_emb is None:
            tower, pool_type, eos_id = model.text, model.text.pool_type, model.text.eos_id
        else:
            return None
        if tower.attn_mask is None or pool_type not in ("argmax", "eos"):
            return None
        return cls(tower, pool_type, eos_id)

    def needed_lengths(self, tokens: Any) -> Any:
        """Per text, the positions up to and including the one the tower pools at."""
        pooled = tokens.argmax(dim=-1) if self.pool_type == "argmax" else (tokens == self.eos_id).int().argmax(dim=-1)
        return pooled + 1

    @contextlib.contextmanager
    def positions(self, length: int):
        import torch

        table, mask = self.tower.positional_embedding, self.tower.attn_mask
        try:
            self.tower.positional_embedding = torch.nn.Parameter(table[:length], requires_grad=False)
            self.tower.attn_mask = mask[:length, :length]
            yield
        finally:
            self.tower.positional_embedding, self.tower.attn_mask = table, mask


def resolve_device(requested: str, gpu_address: str | None = None) -> str:
    import torch

    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device: cuda was asked for but torch sees no CUDA device")
    return f"cuda:{gpu_address}" if gpu_address is not None else "cuda"


def save_checkpoint(model: Any, path: str | Path) -> None:
    """Write a model's weights as safetensors (no pickle), the format `model.checkpoint` prefers."""
    from safetensors.torch import save_model

    save_model(model, str(path))


def _encoder(model: Any, preprocess: Any, tokenizer: Any, device: str, precision: str) -> Encoder:
    import open_clip

    model = model.to(device).eval()
    return Encoder(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=device,
        autocast_dtype=_autocast_dtype(precision, device),
        image_side=_image_side(model),
        photo_transform=PhotoTransform.of(open_clip.get_model_preprocess_cfg(model)),
        text_cut=_TextCut.of(model),
    )


def _same_size_groups(images: list) -> list[list[int]]:
    """Indices of same-sized images held in the same place (host or device), in groups of at most
    PHOTO_GROUP_PIXELS pixels."""
    by_size: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault((*image.shape, type(image)), []).append(i)
    groups = []
    for (height, width, _, _), rows in by_size.items():
        step = max(1, PHOTO_GROUP_PIXELS // (height * width))
        groups += [rows[start : start + step] for start in range(0, len(rows), step)]
    return groups


def _pixel_groups(jpegs: list[photos.DeviceJpeg]) -> list[list[photos.DeviceJpeg]]:
    """Consecutive JPEGs in groups of at most PHOTO_GROUP_PIXELS decoded pixels (one JPEG at least)."""
    groups: list[list[photos.DeviceJpeg]] = [[]]
    pixels = 0
    for jpeg in jpegs:
        if groups[-1] and pixels + jpeg.width * jpeg.height > PHOTO_GROUP_PIXELS:
            groups.append([])
            pixels = 0
        groups[-1].append(jpeg)
        pixels += jpeg.width * jpeg.height
    return groups


def _upright(chw: Any, orientation: int) -> Any:
    """A (3, H, W) image turned as Pillow's `ImageOps.exif_transpose` turns it for this EXIF orientation."""
    import torch

    h, w = 1, 2
    turns = {
        2: lambda x: x.flip(w),  # mirrored
        3: lambda x: x.flip(h, w),  # upside down
        4: lambda x: x.flip(h),
        5: lambda x: x.transpose(h, w),
        6: lambda x: torch.rot90(x, -1, (h, w)),  # taken with the phone turned right: a quarter turn clockwise
        7: lambda x: x.transpose(h, w).flip(h, w),
        8: lambda x: torch.rot90(x, 1, (h, w)),
    }
    return turns[orientation](chw) if orientation in turns else chw


def _image_side(model: Any) -> int:
    import open_clip

    size = open_clip.get_model_preprocess_cfg(model)["size"]
    return max(size) if isinstance(size, (tuple, list)) else int(size)


def _required(package_dir: str | None) -> str:
    if package_dir is None:
        raise ValueError("model.registered: the registered model must be downloaded first (no package_dir given)")
    return package_dir


def _json_round_trip(value: Any) -> Any:
    """As JSON reads it back (tuples become lists), so a saved and a rebuilt config compare equal."""
    return json.loads(json.dumps(value))


def _autocast_dtype(precision: str, device: str):
    import torch

    if device == "cpu" or precision == "fp32":
        return None  # the CPU path stays fp32: autocast there changes the vectors
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _normalised(features: Any) -> np.ndarray:
    import torch

    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return features.cpu().numpy().astype(np.float32, copy=False)


@lru_cache(maxsize=None)
def _register_config(config_path: str | None) -> None:
    if config_path:
        import open_clip

        if not Path(config_path).is_file():
            raise FileNotFoundError(f"model.config_path: no file at {config_path}")
        open_clip.add_model_config(config_path)


@lru_cache(maxsize=16)
def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise FileNotFoundError(f"model.checkpoint: cannot read {path}: {exc}") from exc
    return digest.hexdigest()
