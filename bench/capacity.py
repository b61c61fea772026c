"""Capacity model: hours and node-hours of a full photo backfill and of the daily incremental run, per
model and GPU node shape, and which resource (GPU or host CPU) bounds each. See docs/capacity.md.

    python bench/capacity.py [--host-ms 1.3] [--device-jpeg-host-ms 0.25] [--utilisation 0.4] [--photos 100e6]

Per GPU: photos/s = min(GPU, host), where
  GPU  = peak dense bf16 tensor FLOP/s (datasheet) x utilisation / FLOPs per image  (an ESTIMATE: no GPU
         was measured; --utilisation states the share of peak a ViT forward reaches)
  host = usable cores per GPU x 1000 / host ms per photo per core  (host ms: measured, bench/host_cost.py)
"""

from __future__ import annotations

import argparse

# FLOPs per 224-px image forward (the figures the issue gives, from open_clip's model profile).
MODELS = {"ViT-B-32": 8.8e9, "ViT-B-16": 35.1e9, "ViT-L-14": 162e9}
# Peak dense bf16 tensor TFLOP/s, from the vendors' datasheets (no sparsity).
GPUS = {"A10G": 70e12, "L4": 121e12, "A100": 312e12, "H100": 989e12}
# AWS node shapes: (GPU, GPUs per node, vCPUs per node).
NODES = {
    "g5.xlarge": ("A10G", 1, 4),
    "g5.2xlarge": ("A10G", 1, 8),
    "g5.12xlarge": ("A10G", 4, 48),
    "g6.xlarge": ("L4", 1, 4),
    "g6.4xlarge": ("L4", 1, 16),
    "p4d.24xlarge": ("A100", 8, 96),
    "p5.48xlarge": ("H100", 8, 192),
}
# Cores per node not given to decoding: the executor's JVM, Spark's Python worker, the torch launch thread.
RESERVED_CORES_PER_NODE = 1


def per_gpu(model: str, node: str, host_ms: float, utilisation: float) -> tuple[float, float, float]:
    """(photos/s, GPU-bound photos/s, host-bound photos/s) for one GPU of `node`."""
    gpu, gpus, vcpus = NODES[node]
    gpu_rate = GPUS[gpu] * utilisation / MODELS[model]
    cores = (vcpus - RESERVED_CORES_PER_NODE) / gpus
    host_rate = cores * 1000 / host_ms
    return min(gpu_rate, host_rate), gpu_rate, host_rate


def table(photos: float, host_ms: float, utilisation: float, nodes_in_cluster: int) -> list[str]:
    lines = [
        f"| model | node (GPU x n, vCPUs) | GPU est. photos/s/GPU | host photos/s/GPU | bound | photos/s/node | "
        f"backfill node-hours | backfill hours on {nodes_in_cluster} nodes | daily 1% node-hours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        for node, (gpu, gpus, vcpus) in NODES.items():
            rate, gpu_rate, host_rate = per_gpu(model, node, host_ms, utilisation)
            node_rate = rate * gpus
            backfill_node_hours = photos / node_rate / 3600
            lines.append(
                f"| {model} | {node} ({gpu} x {gpus}, {vcpus}) | {gpu_rate:,.0f} | {host_rate:,.0f} | "
                f"{'GPU' if gpu_rate <= host_rate else 'host CPU'} | {node_rate:,.0f} | {backfill_node_hours:,.2f} | "
                f"{backfill_node_hours / nodes_in_cluster:,.2f} | {backfill_node_hours / 100:,.3f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host-ms", type=float, default=1.3, help="host ms per photo per core: 1.12 ms draft floor (issue 17, measured on one core) + sha256, checks and array")
    parser.add_argument("--device-jpeg-host-ms", type=float, default=0.25,
                        help="host ms per photo per core with encode.device_jpeg_decode")
    parser.add_argument("--utilisation", type=float, default=0.4, help="share of peak bf16 FLOP/s a forward reaches")
    parser.add_argument("--photos", type=float, default=100e6, help="photos in the full backfill")
    parser.add_argument("--nodes", type=int, default=8, help="workers of the backfill cluster (backfill_num_workers)")
    args = parser.parse_args()
    print(f"{args.photos:,.0f} photos backfill, daily incremental 1% ({args.photos / 100:,.0f}); GPU figures ESTIMATED at "
          f"{args.utilisation:.0%} of datasheet peak bf16; {RESERVED_CORES_PER_NODE} core per node reserved")
    for label, host_ms in (("host decode (job default)", args.host_ms),
                           ("device JPEG decode (host: hash + header)", args.device_jpeg_host_ms)):
        print(f"\n{label}: {host_ms} ms/photo/core\n")
        print("\n".join(table(args.photos, host_ms, args.utilisation, args.nodes)))


if __name__ == "__main__":
    main()
