"""Model-level options on the CPU: channels_last memory format and bf16 autocast, against plain fp32.

    python bench/cpu_options.py [--batch 16] [--threads 2] [--model ViT-B-32]

Prints photos/s of the image tower for each option on one batch of preprocessed sample photos, and the
cosine of each option's vectors to fp32's. The job keeps an option only where it is faster here and its
vectors stay >= 0.9999 cosine of fp32's (on the CPU it uses neither; README, Performance).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from PIL import Image

from depop_embed import encoders
from depop_embed.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    encoder = encoders.build_encoder(ModelConfig(name=args.model, seed=0), "cpu")
    paths = sorted((ROOT / "sample_data" / "photos").glob("*.jpg"))[: args.batch]
    pixels = torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])
    options = {  # name: (memory format of model and input, autocast)
        "fp32": (torch.contiguous_format, contextlib.nullcontext),
        "channels_last": (torch.channels_last, contextlib.nullcontext),
        "bf16 autocast": (torch.contiguous_format, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    }
    reference = None
    print(f"{args.model}, batch of {len(pixels)} photos, {args.threads} torch threads, best of {args.repeats}")
    for name, (memory_format, autocast) in options.items():
        model = encoder.model.to(memory_format=memory_format)  # in place: each option sets its own
        batch = pixels.contiguous(memory_format=memory_format)
        with torch.inference_mode(), autocast():
            vectors = model.encode_image(batch)  # also the warm-up
            best = min(_seconds(lambda: model.encode_image(batch)) for _ in range(args.repeats))
        vectors = torch.nn.functional.normalize(vectors.float(), dim=-1).numpy()
        reference = vectors if reference is None else reference
        cosine = (vectors * reference).sum(axis=1)
        print(f"  {name:14} {len(batch) / best:6.2f} photos/s   cosine to fp32: min {cosine.min():.6f}, mean {cosine.mean():.6f}")


def _seconds(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


if __name__ == "__main__":
    main()
