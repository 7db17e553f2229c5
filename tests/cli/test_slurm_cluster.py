"""The Slurm test cluster itself: job ids stay inside Slurm's range whatever the wall clock says,
never repeat between clusters on one machine, and a cluster that will not start says why."""

from __future__ import annotations

import pytest

from tests import slurm_cluster
from tests.slurm_cluster import JOB_ID_BLOCK, MAX_JOB_ID, Cluster, SlurmUnavailable, ensure_installed, reserve_job_ids
from tests.unavailable import unavailable

# 2026-11-26: inside the window where the old clock-derived FirstJobId exceeded MaxJobId.
INSIDE_OLD_FAILING_WINDOW = 1_790_710_245
OUTSIDE_OLD_FAILING_WINDOW = 1_790_300_000
LAST_SECOND_OF_THE_CYCLE = 1_790_999_999


@pytest.mark.parametrize("now", [0, INSIDE_OLD_FAILING_WINDOW, OUTSIDE_OLD_FAILING_WINDOW, LAST_SECOND_OF_THE_CYCLE,
                                 4_102_444_800])
def test_first_job_id_is_inside_slurms_range_at_any_time(tmp_path, now):
    first = reserve_job_ids(tmp_path / "counter", now)
    assert 1 <= first and first + JOB_ID_BLOCK - 1 <= MAX_JOB_ID


def test_clusters_on_one_machine_get_disjoint_job_id_blocks(tmp_path):
    counter = tmp_path / "counter"
    firsts = [reserve_job_ids(counter, INSIDE_OLD_FAILING_WINDOW) for _ in range(50)]
    blocks = sorted((first, first + JOB_ID_BLOCK) for first in firsts)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(blocks, blocks[1:]))


def test_the_counter_wraps_inside_the_range(tmp_path):
    counter = tmp_path / "counter"
    counter.write_text(f"{(MAX_JOB_ID - 1) // JOB_ID_BLOCK - 1}\n")
    last = reserve_job_ids(counter, 0)
    assert last + JOB_ID_BLOCK - 1 <= MAX_JOB_ID
    assert reserve_job_ids(counter, 0) == 1


@pytest.fixture
def slurm_installed():
    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        unavailable(f"SLURM TESTS SKIPPED: {exc}")


@pytest.mark.spawns
@pytest.mark.parametrize("now", [INSIDE_OLD_FAILING_WINDOW, OUTSIDE_OLD_FAILING_WINDOW])
def test_cluster_comes_up_whatever_the_clock_says(slurm_installed, tmp_path, now):
    # A fresh counter: the first id is chosen from the (patched) clock, as on a new CI machine.
    cluster = Cluster(tmp_path / "slurm", clock=lambda: now, job_id_counter=tmp_path / "counter")
    cluster.start()
    try:
        job = cluster.run(["sbatch", "--parsable", "--wrap", "true"])
        assert job.returncode == 0, job.stderr
        assert int(job.stdout.strip().split(";")[0]) == cluster.first_job_id
    finally:
        cluster.stop()


@pytest.mark.spawns
def test_a_cluster_that_cannot_start_quotes_the_daemons_log(slurm_installed, tmp_path, monkeypatch):
    monkeypatch.setattr(slurm_cluster, "reserve_job_ids", lambda counter, now: MAX_JOB_ID + 1)
    cluster = Cluster(tmp_path / "slurm", job_id_counter=tmp_path / "counter")
    with pytest.raises(SlurmUnavailable, match="FirstJobId > MaxJobId"):
        cluster.start()
