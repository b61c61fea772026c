import json
from pathlib import Path

import numpy as np
import open_clip
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


def test_a_model_id_turns_back_into_the_config_that_builds_those_weights(tmp_path):
    base = with_(device="cpu")
    for model in (with_(seed=3), ModelConfig(name="ViT-B-32", pretrained="laion2b_s34b_b79k")):
        back = encoders.model_config_for(encoders.model_id(model), base)
        assert encoders.model_id(back) == encoders.model_id(model) and back.device == "cpu"
    assert encoders.model_config_for("depop-tiny-clip/seed-3", base).config_path == TINY_MODEL  # same architecture
    assert encoders.model_config_for("ViT-B-32/seed-1", base).config_path is None
    registered = encoders.model_config_for("registered/main.features.clip/7", base)
    assert registered.registered == "models:/main.features.clip/7" and encoders.model_id(registered) == "registered/main.features.clip/7"
    checkpoint = tmp_path / "w.safetensors"
    checkpoint.write_bytes(b"weights")
    configured = with_(seed=None, checkpoint=str(checkpoint))
    assert encoders.model_config_for(encoders.model_id(configured), configured) is configured
    with pytest.raises(ValueError, match="built from a checkpoint file: configure it"):
        encoders.model_config_for("depop-tiny-clip/sha256-0123456789abcdef", base)
    with pytest.raises(ValueError, match="is not ARCHITECTURE/WEIGHTS"):
        encoders.model_config_for("no-slash", base)


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


LISTING_TEXTS = [
    "Nike black hoodie",
    "Vintage Levi's 501 jeans W32 L32, great condition!!! Fits true to size",
    "bag",
    "Y2K pink baby tee ✨ #y2k #vintage",
    "Carhartt jacket " * 30,  # longer than the context: the tokenizer truncates it at 77 tokens
    "Dr. Martens 1460 boots, UK 6. Worn a handful of times, smoke-free home, fast shipping.",
]


def tiny_config(tmp_path, name: str, **text_cfg) -> ModelConfig:
    """A variant of the tiny test model as its own open_clip config file."""
    spec = json.loads(Path(TINY_MODEL).read_text())
    spec["text_cfg"].update(text_cfg)
    spec["custom_text"] = True  # a TextTransformer under `model.text` (the other text tower layout)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return ModelConfig(name=name, config_path=str(path), seed=0)


def full_pass(encoder, texts) -> np.ndarray:
    """open_clip's own encode_text over the whole 77-token context, as the reference."""
    with torch.inference_mode():
        features = encoder.model.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts))
    return torch.nn.functional.normalize(features, dim=-1).numpy()


def sequence_lengths(module) -> list[int]:
    """Records the number of positions of every pass through `module` (the text transformer)."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("layout", ["clip", "custom_text"])
def test_texts_run_only_over_the_positions_they_need_with_the_same_vectors(tmp_path, layout):
    cfg = TINY if layout == "clip" else tiny_config(tmp_path, "tiny-custom-text")
    encoder = encoders.build_encoder(cfg, "cpu")
    assert encoder.text_cut is not None
    transformer = encoder.model.transformer if layout == "clip" else encoder.model.text.transformer
    reference = full_pass(encoder, LISTING_TEXTS)
    lengths = sequence_lengths(transformer)
    vectors = encoder.encode_texts(LISTING_TEXTS)
    cosines = (vectors * reference).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines
    # SOT + tokens + EOT, per text: "bag" needs 3 positions, the truncated text all 77.
    needed = [len(_bpe(t)) + 2 for t in LISTING_TEXTS]
    assert min(needed) == 3 and max(needed) == 77
    buckets = {}
    for n in needed:
        buckets[(n + 7) // 8] = max(buckets.get((n + 7) // 8, 0), n)
    assert sorted(lengths) == sorted(buckets.values())
    assert sum(lengths) < 77 * len(lengths)


def test_towers_where_cutting_would_change_the_vectors_run_in_full(tmp_path):
    # Without a causal mask every position sees the padding; pooling at the last position reads it.
    for cfg in (tiny_config(tmp_path, "tiny-bidirectional", no_causal_mask=True),
                tiny_config(tmp_path, "tiny-last-pool", pool_type="last")):
        encoder = encoders.build_encoder(cfg, "cpu")
        assert encoder.text_cut is None
        reference = full_pass(encoder, LISTING_TEXTS)
        lengths = sequence_lengths(encoder.model.text.transformer)
        np.testing.assert_allclose(encoder.encode_texts(LISTING_TEXTS), reference, atol=1e-6)
        assert lengths == [77]


def test_a_failed_pass_leaves_the_tower_whole():
    encoder = encoders.build_encoder(TINY, "cpu")
    table, mask = encoder.model.positional_embedding, encoder.model.attn_mask
    with pytest.raises(RuntimeError, match="boom"):
        with encoder.text_cut.positions(5):
            assert encoder.model.positional_embedding.shape[0] == 5 and encoder.model.attn_mask.shape == (5, 5)
            raise RuntimeError("boom")
    assert encoder.model.positional_embedding is table and encoder.model.attn_mask is mask


def _bpe(text: str) -> list[int]:
    """The text's BPE ids, capped so that SOT + ids + EOT fit in 77 positions."""
    return open_clip.tokenizer.SimpleTokenizer().encode(text)[:75]
