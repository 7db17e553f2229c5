"""`harness estimate CONFIG [overrides] --world-size N [--nodes M] [--gpu h100|h200|a100|...]
[--fabric doctor.json] [--intra-gbps X --inter-gbps Y] [--peak-tflops P] [--mfu F] [--device-gb G] [--json]`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from harness.config import load_config_for_world
from harness.errors import HarnessError
from harness.estimate.memory import estimate, format_table, meta_model
from harness.estimate.step import format_step, predict_step, step_json
from harness.estimate.step_time import GPUS, Cluster

DEFAULT_MFU = 0.40
"""Roughly what FSDP2 + torch.compile reaches on H100s for dense Llama models (torchtitan's
Llama 3 8B runs report ~38-42%)."""
GPUS_PER_NODE = 8


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="harness estimate",
        description="Per-rank memory of every backend, and one optimizer step's compute, collectives "
                    "(bytes and time over intra- and inter-node bandwidth), exposed communication and "
                    "the limit, for a config on a cluster, before you queue.")
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--world-size", type=int, default=1, help="number of ranks (GPUs)")
    parser.add_argument("--nodes", type=int, default=None,
                        help=f"nodes the ranks spread over (default: {GPUS_PER_NODE} GPUs per node)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU model: peak FLOPs, memory, bandwidths")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak TFLOP/s of the compute dtype, for a GPU not in --gpu (its other numbers stay)")
    parser.add_argument("--intra-gbps", type=float, default=None, help="per-GPU bus bandwidth within a node, Gbit/s")
    parser.add_argument("--inter-gbps", type=float, default=None, help="per-GPU bandwidth across nodes, Gbit/s")
    parser.add_argument("--fabric", metavar="DOCTOR_JSON", default=None,
                        help="use the bus bandwidths harness doctor measured (its --out file); --intra-gbps / "
                             "--inter-gbps still win")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"assumed model FLOPs utilization of the compute (default {DEFAULT_MFU})")
    parser.add_argument("--device-gb", type=float, default=None,
                        help="GPU memory per rank in GiB: mark what fits (the step model's memory limit; default: the --gpu's)")
    parser.add_argument("--host-gb", type=float, default=None,
                        help="host memory per node in GiB: mark which backends fit it (offload and setup included)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return parser.parse_intermixed_args(argv)


def _cluster(args: argparse.Namespace) -> Cluster:
    world = args.world_size
    nodes = args.nodes if args.nodes is not None else max(1, -(-world // GPUS_PER_NODE))
    if nodes < 1 or world % nodes:
        raise HarnessError(f"--nodes {nodes} does not divide --world-size {world}: every node runs the same number of ranks")
    gpu = GPUS[args.gpu]
    if args.peak_tflops is not None:
        if args.peak_tflops <= 0:
            raise HarnessError(f"--peak-tflops must be > 0 (got {args.peak_tflops:g})")
        peak = args.peak_tflops
        gpu = dataclasses.replace(gpu, name=f"{gpu.name} at {peak:g} TFLOP/s", peak_tflops={k: peak for k in gpu.peak_tflops})
    for flag in ("intra_gbps", "inter_gbps"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise HarnessError(f"--{flag.replace('_', '-')} must be > 0 Gbit/s (got {value:g})")
    if not 0 < args.mfu <= 1:
        raise HarnessError(f"--mfu must be in (0, 1] (got {args.mfu:g})")
    intra, inter, source = gpu.intra_gbps, gpu.inter_gbps, f"assumed for the {gpu.name}"
    if args.fabric:
        intra, inter, source = measured_fabric(args.fabric, intra, inter)
    if args.intra_gbps or args.inter_gbps:
        source += "; flags"
    return Cluster(world, nodes, gpu, args.intra_gbps or intra, args.inter_gbps or inter, args.mfu,
                   args.device_gb or gpu.memory_gib, source)


def measured_fabric(path: str, intra: float, inter: float) -> tuple[float, float, str]:
    """(intra, inter, where they come from) from a harness doctor report; a bandwidth it did not
    measure (inter-node, on one node) keeps the assumed one."""
    try:
        report = json.loads(Path(path).read_text())
        fabric, date = report["fabric"], report.get("date", "")
        backend, nodes = report.get("backend", "?"), report.get("nodes", "?")
    except FileNotFoundError:
        raise HarnessError(f"--fabric {path} does not exist; write it with harness doctor --out {path} "
                           "(under srun or torchrun with several ranks)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise HarnessError(f"--fabric {path} is not a harness doctor report (no 'fabric' section); "
                           "write one with harness doctor --out FILE") from None
    measured_intra, measured_inter = fabric.get("intra_gbit_s"), fabric.get("inter_gbit_s")
    if measured_intra is None and measured_inter is None:
        raise HarnessError(f"--fabric {path} holds no bandwidth: harness doctor ran on one rank; run it on several "
                           "(srun harness doctor, or harness doctor --nproc N)")
    source = f"measured by harness doctor over {backend} on {nodes} node(s), {date[:10]}"
    if measured_inter is None:
        source += "; inter-node assumed (one node measured)"
    return measured_intra or intra, measured_inter or inter, source


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config_for_world(args.config, args.overrides, args.world_size)
        for flag in ("device_gb", "host_gb"):
            if getattr(args, flag) is not None and getattr(args, flag) <= 0:
                raise HarnessError(f"--{flag.replace('_', '-')} must be > 0 (got {getattr(args, flag)})")
        cluster = _cluster(args)
        model = meta_model(cfg)
        result = estimate(cfg, args.world_size, model)
        result["device_gb"] = args.device_gb
        step = predict_step(cfg, cluster, model, result)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        result["step"] = step_json(step, cluster, cfg)
        print(json.dumps(result))
    else:
        print(format_table(result, cluster.gpus_per_node, cluster.memory_gib, cluster.gpu.name, args.host_gb)
              + "\n" + format_step(step, cluster, cfg))
    return 0
