"""harness doctor: the machine's inventory on one process, collective bandwidth on 2 gloo ranks,
and harness estimate --fabric reading what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli.doctor import findings, parse_sizes
from harness.errors import HarnessError
from harness.runtime.bandwidth import bus_factor
from harness.runtime.inventory import network_devices, precisions

ROOT = Path(__file__).resolve().parents[2]
HARNESS = str(Path(sys.executable).parent / "harness")


@pytest.fixture(scope="module")
def two_rank_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("doctor") / "doctor.json"
    result = subprocess.run([HARNESS, "doctor", "--nproc", "2", "--sizes", "64K,1M", "--iterations", "3",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in __import__("os").environ.items() if not k.startswith("NCCL_")})
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text()), result.stdout, out


@pytest.mark.spawns
def test_two_gloo_ranks_measure_bus_bandwidth_per_message_size(two_rank_report):
    report, stdout, _ = two_rank_report
    assert (report["backend"], report["device"], report["world_size"], report["nodes"]) == ("gloo", "cpu", 2, 1)
    rows = report["collectives"]
    assert [(r["op"], r["group"], r["ranks"], r["bytes"]) for r in rows] == [
        ("all_reduce", "intra", 2, 64 << 10), ("all_reduce", "intra", 2, 1 << 20),
        ("all_gather", "intra", 2, 64 << 10), ("all_gather", "intra", 2, 1 << 20)]
    for r in rows:
        assert r["seconds"] > 0
        assert r["algbw_gbyte_s"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)
        assert r["busbw_gbyte_s"] == pytest.approx(r["algbw_gbyte_s"] * (1.0 if r["op"] == "all_reduce" else 0.5))
        assert r["busbw_gbit_s"] == pytest.approx(8 * r["busbw_gbyte_s"])
    assert report["fabric"] == {"intra_gbit_s": rows[1]["busbw_gbit_s"], "inter_gbit_s": None}
    assert "gloo on CPU: no GPU here" in stdout and "inter-node not measured (one node)" in stdout
    assert report["inventory"]["versions"]["torch"].startswith("2.") and report["findings"] == []


@pytest.mark.spawns
def test_estimate_uses_the_measured_fabric(two_rank_report):
    report, _, path = two_rank_report
    result = subprocess.run([HARNESS, "estimate", "configs/tiny.yaml", "--world-size", "2", "--fabric", str(path),
                             "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    step = json.loads(result.stdout)["step"]
    assert step["intra_gbps"] == pytest.approx(report["fabric"]["intra_gbit_s"])
    assert step["inter_gbps"] == 400.0  # one node measured: the H100 default stays for inter-node
    assert step["fabric_source"].startswith("measured by harness doctor over gloo on 1 node(s)")


@pytest.mark.parametrize("content, message", [
    (None, "does not exist; write it with harness doctor"),
    ("not json", "is not a harness doctor report"),
    (json.dumps({"fabric": {"intra_gbit_s": None, "inter_gbit_s": None}}), "holds no bandwidth"),
])
def test_a_bad_fabric_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "doctor.json"
    if content is not None:
        path.write_text(content)
    result = subprocess.run([HARNESS, "estimate", "configs/tiny.yaml", "--fabric", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_one_process_reports_the_machine_and_says_what_it_did_not_measure(tmp_path):
    result = subprocess.run([HARNESS, "doctor", "--out", str(tmp_path / "d.json")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["world_size"] == 1 and report["collectives"] == []
    assert "collectives not measured: one rank" in result.stdout
    ops = report["inventory"]["deepspeed_ops"]
    assert "cpu_adam" in ops and set(ops["cpu_adam"]) == {"prebuilt", "compatible"}


def _inventory(host: str, torch: str, ports=(), settings=None) -> dict:
    return {"host": {"hostname": host}, "versions": {"python": "3.11", "torch": torch, "deepspeed": "0.19.8"},
            "network": list(ports), "network_settings": settings or {}}


def test_nodes_that_disagree_and_ports_that_are_down_are_findings():
    down = {"device": "mlx5_1", "port": 1, "state": "1: DOWN", "rate": "", "link_layer": "InfiniBand", "kind": "InfiniBand"}
    lines = findings([_inventory("node1", "2.13.0"), _inventory("node1", "2.13.0"), _inventory("node2", "2.12.1", [down]),
                      _inventory("node3", "2.13.0", settings={"NCCL_SOCKET_IFNAME": "nosuchif0"})])
    assert lines[0] == ("the ranks run different torch: 2.12.1 on node2; 2.13.0 on node1, node3; install one "
                        "environment on every node (or one container image)")
    assert lines[1].startswith("node2: InfiniBand port mlx5_1/1 is 1: DOWN; NCCL will not use it")
    assert lines[2].startswith("node3: NCCL_SOCKET_IFNAME=nosuchif0 names no interface of this node")
    assert len(lines) == 3


def test_infiniband_and_roce_ports_are_read_from_sysfs(tmp_path):
    for device, link in (("mlx5_0", "InfiniBand"), ("mlx5_bond_0", "Ethernet")):
        port = tmp_path / "infiniband" / device / "ports" / "1"
        port.mkdir(parents=True)
        (port / "state").write_text("4: ACTIVE\n")
        (port / "rate").write_text("400 Gb/sec (4X NDR)\n")
        (port / "link_layer").write_text(link + "\n")
    found = network_devices(tmp_path)
    assert [(p["device"], p["kind"], p["state"], p["rate"]) for p in found] == [
        ("mlx5_0", "InfiniBand", "4: ACTIVE", "400 Gb/sec (4X NDR)"), ("mlx5_bond_0", "RoCE", "4: ACTIVE", "400 Gb/sec (4X NDR)")]
    assert network_devices(tmp_path / "none") == []


@pytest.mark.parametrize("capability, name, rocm, expected", [
    ((7, 0), "Tesla V100", False, ["fp32", "fp16"]),
    ((8, 0), "A100", False, ["fp32", "fp16", "bf16", "tf32"]),
    ((8, 9), "L40S", False, ["fp32", "fp16", "bf16", "tf32", "fp8"]),
    ((9, 0), "H100", False, ["fp32", "fp16", "bf16", "tf32", "fp8"]),
    ((9, 4), "AMD Instinct MI300X", True, ["fp32", "fp16", "bf16", "fp8"]),
])
def test_native_precisions_by_compute_capability(capability, name, rocm, expected):
    assert precisions(*capability, rocm, name) == expected


def test_sizes_and_bus_factors():
    assert parse_sizes("64K,16M,1G,512") == (64 << 10, 16 << 20, 1 << 30, 512)
    with pytest.raises(HarnessError, match="'lots' is not a size"):
        parse_sizes("1M,lots")
    assert bus_factor("all_reduce", 8) == 1.75 and bus_factor("all_gather", 8) == 0.875
