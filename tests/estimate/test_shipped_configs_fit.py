"""Every shipped config names the hardware it fits in its header, and the estimator agrees:

    # Fits: 8 x 80 GB GPUs          (per GPU: the configured backend's device memory at world size 8)
    # Fits: 8 x 80 GB GPUs, 1300 GB host per node   (and each node's host memory)
    # Fits: 2 CPU ranks in 24 GB    (all ranks together: device + host memory, a CPU run's both)

A GPU config also passes harness check's other hardware checks there: host memory per node where
the header names it, and a stop signal (slurm.signal_seconds) that comes early enough for
log.every steps and a save at the estimated step time, on H100s.

A config whose model.pretrained is a hub id is estimated from a copy of that model's config.json
(tests/fixtures): the estimator reads the architecture only, never weights."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional

import pytest

from harness.cli.check import Findings, _fits
from harness.config import load_config, validate_for_world
from harness.estimate.memory import estimate, meta_model

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FIXTURES = ROOT / "tests" / "fixtures"
HUB_MODELS = {"meta-llama/Llama-3.1-8B-Instruct": FIXTURES / "llama-3.1-8b-instruct",
              "meta-llama/Llama-3.1-70B-Instruct": FIXTURES / "llama-3.1-70b-instruct"}
GPU_CLAIM = re.compile(r"^# Fits: (\d+) x (\d+) GB GPUs(?:, (\d+) GB host per node)?\b")
CPU_CLAIM = re.compile(r"^# Fits: (\d+) CPU ranks in (\d+) GB\b")
GIB = 2**30


def claim(path: Path) -> tuple[str, int, int, Optional[int]]:
    """("gpu" | "cpu", ranks, GB, host GB per node or None) from the config's header comment."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        for kind, pattern in (("gpu", GPU_CLAIM), ("cpu", CPU_CLAIM)):
            if (match := pattern.match(line)) is not None:
                host = match.group(3) if kind == "gpu" else None
                return kind, int(match.group(1)), int(match.group(2)), int(host) if host else None
    raise AssertionError(f"{path.name} names no hardware: add a '# Fits: N x G GB GPUs' or "
                         "'# Fits: N CPU ranks in G GB' line to its header")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_fits_the_hardware_its_header_names(path):
    kind, ranks, gb, host_gb = claim(path)
    overrides = []
    pretrained = load_config(path).model.pretrained
    if pretrained in HUB_MODELS:
        overrides.append(f"model.pretrained={HUB_MODELS[pretrained]}")
    cfg = load_config(path, overrides)
    validate_for_world(cfg, ranks)
    result = estimate(cfg, ranks, meta_model(cfg))
    need = result["backends"][result["configured"]]
    if kind == "gpu":
        assert need["device"] <= gb * GIB, f"{path.name}: {need['device'] / GIB:.1f} GiB per GPU > {gb} GB"
        found = Findings()
        checks = argparse.Namespace(world_size=ranks, nodes=None, gpu="h100", device_gb=gb, host_gb=host_gb,
                                    signal_seconds=None)
        _fits(cfg, checks, found)
        assert found.lines == [], f"{path.name}: " + "; ".join(found.lines)
    else:
        together = ranks * (need["device"] + need["host"])
        assert together <= gb * GIB, f"{path.name}: {together / GIB:.1f} GiB for {ranks} ranks > {gb} GB"


def test_a_claim_the_estimator_refutes_fails():
    cfg = load_config(ROOT / "configs" / "llama-8b.yaml", ["train.micro_batch_size=2", "train.grad_accum=1"])
    need = estimate(cfg, 8, meta_model(cfg))["backends"]["fsdp2"]["device"]
    assert need > 80 * GIB


@pytest.mark.parametrize("overrides, host_gb, finding", [
    (["slurm.signal_seconds=120"], 1300, "the stop signal comes 120 s before the time limit"),
    (["log.every=10"], 1300, "every log.every=10 steps"),
    ([], 1000, "GiB of host memory per node"),
])
def test_the_70b_configs_promises_fail_when_broken(overrides, host_gb, finding):
    cfg = load_config(ROOT / "configs" / "llama-70b.yaml", overrides)
    found = Findings()
    _fits(cfg, argparse.Namespace(world_size=8, nodes=None, gpu="h100", device_gb=80, host_gb=host_gb,
                                  signal_seconds=None), found)
    assert len(found.lines) == 1 and finding in found.lines[0]
