"""`harness doctor [--out doctor.json] [--nproc N] [--sizes 1M,16M,...] [--load-ops]`: what this
machine (or this allocation) is, and what its fabric moves.

On one process: the versions of python, torch (and its CUDA), NCCL, DeepSpeed (and which of its
ops are prebuilt or JIT-buildable; --load-ops loads the ones harness uses), transformers,
flash-attn and friends; the GPUs with their compute capability, memory and native precisions;
the InfiniBand/RoCE ports and the NCCL variables set. Under a launcher with several ranks
(`srun harness doctor` in an allocation, torchrun, or --nproc N here): the same for every node,
differences between nodes as findings, and all-reduce / all-gather bus bandwidth per message
size within and across nodes, written with the rest to --out, which `harness estimate --fabric`
reads in place of its assumed fabric. Exit 0, or 2 with each finding on its own line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from harness.errors import HarnessError

HARNESS_OPS = ("cpu_adam", "fused_adam")
"""The DeepSpeed ops harness itself uses: CPU Adam with parallel.offload, fused Adam on GPUs."""
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="harness doctor", description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", default="doctor.json", help="the JSON report (default doctor.json)")
    parser.add_argument("--nproc", type=int, default=0, help="start N local ranks (torchrun) to measure this node")
    parser.add_argument("--sizes", default="", help="message sizes, e.g. 1M,64M,512M (default: 1M..512M on GPUs, "
                                                    "64K..8M on CPU)")
    parser.add_argument("--iterations", type=int, default=5, help="timed calls per size (after 2 warm-up calls)")
    parser.add_argument("--load-ops", action="store_true",
                        help="load DeepSpeed's cpu_adam and fused_adam (JIT-builds them if not prebuilt: minutes)")
    return parser.parse_args(argv)


def parse_sizes(text: str) -> tuple[int, ...]:
    sizes = []
    for word in filter(None, text.split(",")):
        unit = _UNITS.get(word[-1].upper(), 1)
        number = word[:-1] if word[-1].upper() in _UNITS else word
        if not number.isdigit() or int(number) == 0:
            raise HarnessError(f"--sizes {text!r}: {word!r} is not a size like 64K, 16M or 1G")
        sizes.append(int(number) * unit)
    return tuple(sizes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
        if args.nproc > 1:
            return _spawn(args.nproc, [a for a in (argv if argv is not None else sys.argv[1:])])
        return _doctor(args, sizes)
    except HarnessError as exc:
        print(f"harness: doctor: {exc}", file=sys.stderr)
        return exc.exit_code


def _spawn(nproc: int, argv: list[str]) -> int:
    """N ranks on this node through torchrun, each running this command without --nproc."""
    import logging
    import os

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args
    from torch.distributed.run import run

    logging.getLogger("torch.distributed").setLevel(logging.ERROR)  # torchrun's OMP_NUM_THREADS banner
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc"):
            skip = arg == "--nproc"
            continue
        rest.append(arg)
    try:
        run(torchrun_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "harness.cli.doctor", *rest]))
    except ChildFailedError as err:
        return max(failure.exitcode for failure in err.failures.values())
    return 0


def _doctor(args: argparse.Namespace, sizes: tuple[int, ...]) -> int:
    import torch.distributed as dist

    from harness.runtime import dist as harness_dist
    from harness.runtime.bandwidth import CPU_SIZES, GPU_SIZES, as_rows, fabric, measure
    from harness.runtime.inventory import inventory

    info = harness_dist.rank_info_from_env()
    backend = harness_dist.pick_dist_backend("auto")
    device = harness_dist.device_for(info, backend)
    mine = inventory()
    mine["deepspeed_ops"] = deepspeed_ops(load=args.load_ops and info.local_rank == 0)
    report: dict[str, Any] = {
        "harness_doctor": 1, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend, "device": device.type, "world_size": info.world_size,
        "ranks_per_node": info.local_world_size, "nodes": info.world_size // info.local_world_size,
        "inventory": mine, "collectives": [], "fabric": {"intra_gbit_s": None, "inter_gbit_s": None},
    }
    every = [mine]
    if info.world_size > 1:
        harness_dist.init_process_group(info, backend, 300, device)
        every = [None] * info.world_size
        dist.all_gather_object(every, mine)
        measured = measure(device, info.local_world_size, sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES),
                           iterations=args.iterations)
        report["collectives"], report["fabric"] = as_rows(measured), fabric(measured)
        harness_dist.shutdown()
    report["findings"] = findings(every)
    if info.rank != 0:
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(format_report(report))
    print(f"wrote {args.out} (harness estimate CONFIG --fabric {args.out} uses its measured bandwidth)")
    for line in report["findings"]:
        print(f"harness: doctor: {line}", file=sys.stderr)
    return 2 if report["findings"] else 0


def deepspeed_ops(load: bool) -> dict[str, Any]:
    """DeepSpeed's ops (prebuilt or JIT-compatible; with load, harness's own ops are loaded)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("deepspeed")
    except PackageNotFoundError:
        return {}
    from harness.parallel.deepspeed.compat import op_report
    from harness.runtime.process import quiet_imports_without_gpus

    quiet_imports_without_gpus()
    try:
        return op_report(HARNESS_OPS if load else ())
    except Exception as exc:  # an install too broken to list its ops: that is the finding
        return {"error": " ".join(str(exc).split())[:300]}


def findings(every: list[dict]) -> list[str]:
    """What would make a job fail or crawl: nodes that disagree on the stack, network ports that
    are down, a socket interface NCCL is told to use that the node lacks."""
    lines = []
    for key in ("python", "torch", "torch.cuda", "nccl", "deepspeed", "transformers"):
        seen: dict[str, list[str]] = {}
        for inv in every:
            seen.setdefault(inv["versions"].get(key, "?"), []).append(inv["host"]["hostname"])
        if len(seen) > 1:
            lines.append(f"the ranks run different {key}: " + "; ".join(
                f"{value} on {', '.join(sorted(set(hosts)))}" for value, hosts in sorted(seen.items()))
                + "; install one environment on every node (or one container image)")
    for inv in every:
        host = inv["host"]["hostname"]
        for port in inv["network"]:
            if port["state"] and "ACTIVE" not in port["state"]:
                lines.append(f"{host}: {port['kind']} port {port['device']}/{port['port']} is {port['state']}; "
                             "NCCL will not use it (ask the admins, or exclude the device with NCCL_IB_HCA)")
        interface = inv["network_settings"].get("NCCL_SOCKET_IFNAME", "")
        if interface and not interface.startswith(("^", "=")) and not any(
                Path("/sys/class/net", name).exists() for name in interface.split(",")):
            lines.append(f"{host}: NCCL_SOCKET_IFNAME={interface} names no interface of this node "
                         f"(it has {', '.join(sorted(p.name for p in Path('/sys/class/net').iterdir()))})")
    return list(dict.fromkeys(lines))


def format_report(report: dict) -> str:
    inv = report["inventory"]
    v = inv["versions"]
    where = "NCCL on GPUs" if report["device"] == "cuda" else "gloo on CPU: no GPU here"
    lines = [f"harness doctor: {inv['host']['hostname']}, {report['nodes']} node(s) x {report['ranks_per_node']} "
             f"rank(s), {where}",
             f"  versions    python {v['python']}, torch {v['torch']} (CUDA {v['torch.cuda']}), NCCL {v['nccl']}, "
             f"deepspeed {v['deepspeed']}, transformers {v['transformers']}, flash-attn {v['flash-attn']}, "
             f"torchao {v['torchao']}, peft {v['peft']}"]
    gpus = inv["gpus"]
    lines.append("  gpus        " + ("; ".join(f"{g['index']}: {g['name']} (sm {g['compute_capability']}, "
                                              f"{g['memory_gib']} GiB, {'/'.join(g['precisions'])})" for g in gpus)
                                     or "none: ranks run on CPU with gloo (fp32/bf16 math, no tensor cores)"))
    ops = inv["deepspeed_ops"]
    if "error" in ops:
        lines.append(f"  deepspeed   its ops could not be listed: {ops['error']}")
    elif ops:
        prebuilt = [n for n, o in ops.items() if o["prebuilt"]]
        jit = [n for n, o in ops.items() if not o["prebuilt"] and o["compatible"]]
        loaded = [f"{n} {'loads' if o['loads'] else 'FAILS: ' + o.get('error', '')}" for n, o in ops.items() if "loads" in o]
        lines.append(f"  deepspeed   ops prebuilt: {', '.join(prebuilt) or 'none'}; built on first use: "
                     f"{', '.join(jit) or 'none'}" + (f"; {'; '.join(loaded)}" if loaded else ""))
    ports = inv["network"]
    lines.append("  network     " + (", ".join(f"{p['device']}/{p['port']} {p['kind']} {p['state']} {p['rate']}"
                                              for p in ports) or "no InfiniBand/RoCE devices (NCCL uses sockets)"))
    settings = inv["network_settings"]
    lines.append("  settings    " + (" ".join(f"{k}={val}" for k, val in settings.items()) or "no NCCL_* variables set"))
    if report["collectives"]:
        lines.append("  collectives (nccl-tests convention: busbw is per GPU, comparable with link speeds)")
        lines.append(f"    {'op':<11}{'group':>6}{'ranks':>6}{'size':>10}{'time':>11}{'algbw':>12}{'busbw':>12}"
                     f"{'busbw':>13}")
        lines.append(f"    {'':<11}{'':>6}{'':>6}{'':>10}{'':>11}{'GB/s':>12}{'GB/s':>12}{'Gbit/s':>13}")
        for row in report["collectives"]:
            lines.append(f"    {row['op']:<11}{row['group']:>6}{row['ranks']:>6}{_size(row['bytes']):>10}"
                         f"{row['seconds'] * 1e3:>9.2f}ms{row['algbw_gbyte_s']:>12.2f}{row['busbw_gbyte_s']:>12.2f}"
                         f"{row['busbw_gbit_s']:>13.1f}")
        fab = report["fabric"]
        intra = (f"{fab['intra_gbit_s']:,.1f} Gbit/s" if fab["intra_gbit_s"] is not None
                 else "not measured (one rank per node)")
        inter = f"{fab['inter_gbit_s']:,.1f} Gbit/s" if fab["inter_gbit_s"] is not None else "not measured (one node)"
        lines.append(f"  fabric      per GPU: intra-node {intra}, inter-node {inter}")
    else:
        lines.append("  collectives not measured: one rank (run it under srun / torchrun with several, or --nproc N)")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.0f} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    from harness.runtime.process import exit_process

    exit_process(main())
