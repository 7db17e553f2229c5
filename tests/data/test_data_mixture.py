"""Weighted mixtures (data.sources, harness/data/order.py MixedSequences): the realised proportions,
the same batches on 1 and 2 ranks, exact resume across a kill, tokens_by_source in every row."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from harness.config import load_config
from harness.data import BatchShape, MixedSequences, PackedSequences, TrainBatches
from harness.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _mixture(weights: list[float], sizes: list[int], seq_len: int = 8) -> MixedSequences:
    # Source i's tokens are i * 1_000_000 + position: every row says where it came from.
    parts = [PackedSequences(np.arange(n, dtype=np.int64) + i * 1_000_000, seq_len) for i, n in enumerate(sizes)]
    return MixedSequences(parts, weights, [f"s{i}" for i in range(len(sizes))])


def _sources_of(batches: TrainBatches, step: int) -> list[int]:
    return [int(row[0]) // 1_000_000 for batch in batches.micro_batches(step) for row in batch]


def test_realised_proportions_follow_the_weights():
    mixture = _mixture([5, 3, 2], [4000, 9000, 900])  # the small source is revisited (epochs)
    batches = TrainBatches(mixture, seed=1, shape=BatchShape(8, 2, 4), rank=0)
    batches_all = [TrainBatches(mixture, seed=1, shape=BatchShape(8, 2, 4), rank=r) for r in range(4)]
    counts = np.zeros(3)
    steps = 400  # 25,600 sequences
    for step in range(1, steps + 1):
        for b in batches_all:
            for source in _sources_of(b, step):
                counts[source] += 1
    shares = counts / counts.sum()
    assert shares == pytest.approx([0.5, 0.3, 0.2], abs=0.005)
    by_source = batches.tokens_by_source(steps)
    assert [by_source[f"s{i}"] for i in range(3)] == [int(c) * 8 for c in counts]
    # Different seeds, different interleavings; the proportions stay.
    other = TrainBatches(mixture, seed=2, shape=BatchShape(8, 2, 4), rank=0)
    assert _sources_of(other, 1) != _sources_of(batches, 1)


def test_one_and_two_ranks_see_the_same_global_batches():
    mixture = _mixture([1, 1], [3000, 5000])
    one = TrainBatches(mixture, seed=0, shape=BatchShape(4, 2, 1), rank=0)
    two = [TrainBatches(mixture, seed=0, shape=BatchShape(4, 1, 2), rank=r) for r in (0, 1)]
    for step in (1, 2, 17, 300):
        whole = np.concatenate([b.numpy() for b in one.micro_batches(step)])
        split = np.concatenate([b.numpy() for r in two for b in r.micro_batches(step)])
        assert np.array_equal(whole, split), step


def test_resumed_order_continues_without_repeats():
    mixture = _mixture([2, 1], [2000, 2000])
    run = TrainBatches(mixture, seed=3, shape=BatchShape(4, 1, 2), rank=0)
    resumed = TrainBatches(mixture, seed=3, shape=BatchShape(4, 1, 2), rank=0, start_step=10,
                           start_offset=run.consumed_after(10))
    for step in (11, 12, 40):
        assert all((a == b).all() for a, b in zip(run.micro_batches(step), resumed.micro_batches(step)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.sources=[{path: a.txt, weight: 0}]"], "data.sources[0].weight must be > 0"),
        (["data.sources=[{path: a/x.txt}, {path: b/x.txt}]"], "two data.sources are named 'x'"),
        (["data.path=other.txt", "data.sources=[{path: a.txt}]"], "data.sources replaces data.path"),
        (["data.sources=[{weight: 1}]"], "data.sources[0].path is empty"),
        (["data.sources=[{path: a.txt, wieght: 1}]"], "unknown config key data.sources[0].wieght"),
    ],
)
def test_mixture_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "tiny.yaml", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.spawns
def test_mixture_training_resumes_exactly_after_a_kill(tmp_path):
    """A real 2-rank run on two corpora: tokens_by_source in every row, and a kill + resume=auto
    continues with the uninterrupted run's losses and counts."""
    extra = tmp_path / "fox.jsonl"
    extra.write_text("".join(json.dumps({"text": f"Fox {i} jumps over the lazy dog. " * 30}) + "\n" for i in range(200)))
    sources = f"data.sources=[{{path: 'bundled:shakespeare', weight: 3}}, {{path: '{extra}', weight: 1, name: fox}}]"
    common = ["launch/local.sh", "2", "configs/tiny.yaml", sources, f"data.cache_dir={tmp_path / 'cache'}",
              "log.progress=off", "eval.every=4", "checkpoint.every=2", "train.steps=6"]

    def run(run_dir: Path, *extra_args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*common, f"run.dir={run_dir}", *extra_args], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)

    def rows(run_dir: Path) -> list[dict]:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    reference = run(tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-3000:]
    crashed = run(tmp_path / "crash", "faults.kill_at_step=3")
    assert crashed.returncode != 0
    resumed = run(tmp_path / "crash", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, got = rows(tmp_path / "ref"), rows(tmp_path / "crash")
    assert [r["step"] for r in got][-4:] == [3, 4, 5, 6]
    assert [r["loss"] for r in got[-4:]] == [r["loss"] for r in ref[2:]]
    assert [r["tokens_by_source"] for r in got[-4:]] == [r["tokens_by_source"] for r in ref[2:]]
    last = ref[-1]["tokens_by_source"]
    assert set(last) == {"shakespeare", "fox"} and sum(last.values()) == ref[-1]["tokens"]
