import json

import numpy as np
import pytest
import torch

from depop_embed import encoders
from depop_embed.config import ModelConfig

from conftest import TINY_MODEL

TINY = ModelConfig(name="depop-tiny-clip", config_path=TINY_MODEL, seed=0)
TEXTS = ["Nike black hoodie", "Levi's 501 jeans, W32", ""]


def with_(**changes) -> ModelConfig:
    from dataclasses import replace

    return replace(TINY, **changes)


def test_model_id_names_the_weights(tmp_path):
    assert encoders.model_id(with_(seed=3)) == "depop-tiny-clip/seed-3"
    assert encoders.model_id(ModelConfig(name="ViT-B-32", pretrained="laion2b_s34b_b79k")) == "ViT-B-32/laion2b_s34b_b79k"
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"weights a")
    b.write_bytes(b"weights b")
    id_a = encoders.model_id(with_(seed=None, checkpoint=str(a)))
    assert id_a.startswith("depop-tiny-clip/sha256-") and id_a != encoders.model_id(with_(seed=None, checkpoint=str(b)))


def test_embedding_dim_without_building():
    assert encoders.embedding_dim(TINY) == 32
    with pytest.raises(ValueError, match="model.name"):
        encoders.embedding_dim(ModelConfig(name="no-such-arch", seed=0))


def test_seeded_weights_are_reproducible_and_vectors_normalised():
    first = encoders.build_encoder(TINY, "cpu").encode_texts(TEXTS)
    again = encoders.build_encoder(TINY, "cpu").encode_texts(TEXTS)
    other = encoders.build_encoder(with_(seed=1), "cpu").encode_texts(TEXTS)
    assert first.dtype == np.float32 and first.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tmp_path, suffix):
    seeded = encoders.build_encoder(with_(seed=5), "cpu")
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        encoders.save_checkpoint(seeded.model, path)
    else:
        torch.save({"state_dict": seeded.model.state_dict()}, path)  # plain tensors: loads with weights_only
    loaded = encoders.build_encoder(with_(seed=None, checkpoint=str(path)), "cpu")
    pixels = torch.rand(2, 3, 64, 64)
    np.testing.assert_allclose(loaded.encode_images(pixels), seeded.encode_images(pixels), atol=1e-6)
    np.testing.assert_allclose(loaded.encode_texts(TEXTS), seeded.encode_texts(TEXTS), atol=1e-6)


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": object()}, path)  # needs pickle to load an arbitrary object
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        encoders.build_encoder(with_(seed=None, checkpoint=str(path)), "cpu")


def test_a_package_rebuilds_the_same_model_with_its_own_preprocessing(tmp_path):
    seeded = encoders.build_encoder(TINY, "cpu")
    manifest = encoders.save_package(TINY, tmp_path / "package")
    assert {p.name for p in (tmp_path / "package").iterdir()} == {
        encoders.PACKAGE_FILE, "depop-tiny-clip.json", "open_clip_model.safetensors",
    }
    assert manifest["architecture"] == manifest["tokenizer"] == "depop-tiny-clip"
    assert manifest["embed_dim"] == 32 and manifest["source_model_id"] == "depop-tiny-clip/seed-0"
    rebuilt = encoders.build_packaged_encoder(str(tmp_path / "package"), "cpu")
    pixels = torch.rand(2, 3, 64, 64)
    np.testing.assert_allclose(rebuilt.encode_images(pixels), seeded.encode_images(pixels), atol=1e-6)
    np.testing.assert_allclose(rebuilt.encode_texts(TEXTS), seeded.encode_texts(TEXTS), atol=1e-6)

    # Preprocessing travels with the package (a pretrained tag's mean/std differ from the architecture's).
    path = tmp_path / "package" / encoders.PACKAGE_FILE
    manifest["preprocess"].update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], interpolation="bilinear")
    path.write_text(json.dumps(manifest))
    normalize = encoders.build_packaged_encoder(str(tmp_path / "package"), "cpu").preprocess.transforms[-1]
    assert list(normalize.mean) == [0.5, 0.5, 0.5] and list(normalize.std) == [0.25, 0.25, 0.25]
    # A setting open_clip cannot rebuild is refused rather than silently dropped.
    manifest["preprocess"]["fill_color"] = 255
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="open_clip rebuilt preprocessing"):
        encoders.build_packaged_encoder(str(tmp_path / "package"), "cpu")


def test_a_registered_model_is_named_by_version_and_built_only_from_its_download():
    registered = ModelConfig(registered="models:/main.features.clip/3")
    assert encoders.model_id(registered) == "registered/main.features.clip/3"
    with pytest.raises(ValueError, match="resolve an alias first"):
        encoders.model_id(ModelConfig(registered="models:/clip@champion"))
    with pytest.raises(ValueError, match="must be downloaded first"):
        encoders.build_encoder(registered, "cpu")
