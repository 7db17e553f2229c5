"""What this machine is, for `harness doctor`: the versions of the stack, the GPUs and the
precisions they run natively, the network devices NCCL can use and the NCCL settings in force.
Each part answers on any machine; what is missing is reported as missing, never raised."""

from __future__ import annotations

import os
import platform
import socket
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "datasets", "wandb", "flash-attn", "torchao", "peft")
NETWORK_SETTINGS = ("NCCL_", "TORCH_NCCL_", "GLOO_SOCKET_IFNAME", "FI_", "UCX_", "CUDA_VISIBLE_DEVICES")


def package_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    found["torch.cuda"] = torch.version.cuda or "none (CPU build)"
    if torch.version.hip:
        found["torch.hip"] = torch.version.hip
    found["nccl"] = nccl_version()
    return found


def nccl_version() -> str:
    if not torch.cuda.is_available():
        return "none (no CUDA device)"
    try:
        return ".".join(str(part) for part in torch.cuda.nccl.version())
    except (RuntimeError, AttributeError, TypeError):
        return "unknown (this torch build has no NCCL)"


def precisions(major: int, minor: int, rocm: bool, name: str) -> list[str]:
    """Compute dtypes the GPU runs in tensor cores: bf16/tf32 from Ampere (8.0), fp8 from Ada
    and Hopper (8.9); on ROCm, bf16 everywhere and fp8 on MI300 (gfx94x)."""
    if rocm:
        return ["fp32", "fp16", "bf16"] + (["fp8"] if "MI3" in name or major >= 9 else [])
    found = ["fp32", "fp16"]
    if (major, minor) >= (8, 0):
        found += ["bf16", "tf32"]
    if (major, minor) >= (8, 9):
        found.append("fp8")
    return found


def gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append({
            "index": index,
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "precisions": precisions(props.major, props.minor, bool(torch.version.hip), props.name),
        })
    return found


def network_devices(sys_class: Path = Path("/sys/class")) -> list[dict[str, Any]]:
    """InfiniBand and RoCE ports (from /sys/class/infiniband): NCCL's fast inter-node paths."""
    found = []
    for device in sorted((sys_class / "infiniband").glob("*")):
        for port in sorted((device / "ports").glob("*")):
            link = _read(port / "link_layer")
            found.append({"device": device.name, "port": int(port.name), "state": _read(port / "state"),
                          "rate": _read(port / "rate"), "link_layer": link,
                          "kind": "RoCE" if link == "Ethernet" else "InfiniBand" if link else "unknown"})
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def network_settings(environ: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in sorted(environ.items()) if key.startswith(NETWORK_SETTINGS)}


def host() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "slurm_job": os.environ.get("SLURM_JOB_ID", "")}


def inventory() -> dict[str, Any]:
    return {"host": host(), "versions": package_versions(), "gpus": gpus(), "network": network_devices(),
            "network_settings": network_settings(dict(os.environ))}
