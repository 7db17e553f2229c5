"""Loss spikes and non-finite losses: train.spike.action=warn|skip|rollback, one decision for all
ranks, on FSDP2 and ZeRO; the data order after a rollback is deterministic and recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.config import SpikeConfig
from harness.data.order import BatchShape, TrainBatches
from harness.numerics.spikes import SpikeGuard
from tests.reliability.drills import BACKENDS, losses, rows, run

SHAPE = ["train.lr_schedule=constant", "train.warmup_steps=0", "precision=fp32", "train.spike.window=3",
         "faults.loss_spike_steps=[6]", "faults.loss_spike_factor=20"]


def test_guard_flags_a_spike_against_the_running_median_and_keeps_it_out_of_the_window():
    guard = SpikeGuard(SpikeConfig(action="skip", factor=3.0, window=3), device=torch.device("cpu"))
    verdicts = []
    for loss in [4.0, 3.0, 2.0, 100.0, 2.5, 7.4, 7.6, float("nan")]:
        spike, median = guard.check(torch.tensor(loss))
        verdicts.append(bool(spike))
    # Not before the window is full; 100 > 3 x median(4, 3, 2); 7.4 < 3 x 2.5; 7.6 > 3 x median(3, 2.5, 2) is not
    # (median of the last three accepted: 2, 2.5, 7.4 -> 2.5, 3 x 2.5 = 7.5); NaN always.
    assert verdicts == [False, False, False, True, False, False, True, True]
    state = guard.state_dict()
    again = SpikeGuard(SpikeConfig(window=3), device=torch.device("cpu"))
    again.load_state_dict(state)
    assert torch.equal(again.history, guard.history) and int(again.filled) == 3


def test_left_out_batches_shift_the_stream_by_one_batch_each():
    sequences = _Sequences(100)
    shape = BatchShape(micro_batch_size=2, grad_accum=1, data_ranks=2)
    plain = TrainBatches(sequences, 0, shape, rank=0)
    skipping = TrainBatches(sequences, 0, shape, rank=0, skip_steps=[3, 5])
    assert all(np.array_equal(skipping.global_indices(s), plain.global_indices(s)) for s in (1, 2))
    assert np.array_equal(skipping.global_indices(3), plain.global_indices(4))
    assert np.array_equal(skipping.global_indices(4), plain.global_indices(5))
    assert np.array_equal(skipping.global_indices(5), plain.global_indices(7))
    assert skipping.consumed_after(5) == plain.consumed_after(7)
    resumed = TrainBatches(sequences, 0, shape, rank=0, start_step=4, start_offset=skipping.consumed_after(4),
                           skip_steps=[3, 5])  # a checkpoint after step 4: step 3's hole is in the offset
    assert np.array_equal(resumed.global_indices(5), skipping.global_indices(5))


class _Sequences:
    seq_len = 4

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def order(self, seed: int):
        from harness.data.order import GlobalOrder

        return GlobalOrder(self.n, seed)


@pytest.mark.spawns
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_rollback_reloads_the_checkpoint_and_leaves_the_spiking_batch_out(backend, tmp_path):
    drill = run(tmp_path / "drill", *SHAPE, *BACKENDS[backend], "train.spike.action=rollback", "checkpoint.every=4",
                "train.steps=10", "log.every=2", "log.progress=lines")
    assert drill.returncode == 0, drill.output[-3000:]
    assert "loss spike" in drill.output and "rollback 1/3: reloaded step-00000004" in drill.output
    assert "SKIPPED (loss spike)" in drill.output and "SKIPPED (non-finite gradients)" not in drill.output
    by_row = rows(tmp_path / "drill")
    spiked = [row for row in by_row if row["spike"]]
    assert [row["step"] for row in spiked] == [6] and spiked[0]["skipped"]
    assert [row["step"] for row in by_row] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]
    assert [row["skipped_batches"] for row in by_row] == [0] * 6 + [1] * 6
    assert not any(row["spike"] for row in by_row[6:])
    # Step 5 re-runs from the checkpoint with the same batch: the same loss.
    assert by_row[6]["loss"] == pytest.approx(by_row[4]["loss"], rel=1e-6)

    # Deterministic: kill the run after the rollback, resume, and the losses are the same.
    killed = run(tmp_path / "again", *SHAPE, *BACKENDS[backend], "train.spike.action=rollback", "checkpoint.every=4",
                 "train.steps=10", "log.every=2", "faults.kill_at_step=8")
    assert killed.returncode != 0
    resumed = run(tmp_path / "again", *SHAPE, *BACKENDS[backend], "train.spike.action=rollback", "checkpoint.every=4",
                  "train.steps=10", "log.every=2", "resume=auto")
    assert resumed.returncode == 0, resumed.output[-3000:]
    want, got = losses(tmp_path / "drill"), losses(tmp_path / "again")
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert rows(tmp_path / "again")[-1]["skipped_batches"] == 1


@pytest.mark.spawns
def test_skip_and_warn_and_a_nonfinite_loss_and_the_rollback_limit(tmp_path):
    skip = run(tmp_path / "skip", *SHAPE, "train.spike.action=skip", "train.steps=8")
    warn = run(tmp_path / "warn", *SHAPE, "train.spike.action=warn", "train.steps=8")
    clean = run(tmp_path / "clean", *SHAPE, "faults.loss_spike_steps=[]", "train.steps=8")
    for result in (skip, warn, clean):
        assert result.returncode == 0, result.output[-3000:]
    skip_rows, warn_rows, clean_rows = rows(tmp_path / "skip"), rows(tmp_path / "warn"), rows(tmp_path / "clean")
    assert [r["spike"] for r in skip_rows] == [r["spike"] for r in warn_rows] == [s == 6 for s in range(1, 9)]
    assert [r["skipped"] for r in skip_rows] == [s == 6 for s in range(1, 9)]
    assert not any(r["skipped"] for r in warn_rows) and not any(r["spike"] for r in clean_rows)
    assert "update skipped" in skip.output and "applied anyway" in warn.output
    # A skipped spike changes nothing: step 7 continues from step 5's state, as the run without the
    # fault does from its step 6 update... so only the steps before the spike agree with it.
    assert [r["loss"] for r in skip_rows[:5]] == pytest.approx([r["loss"] for r in clean_rows[:5]], rel=1e-6)
    assert skip_rows[5]["loss"] == pytest.approx(20 * clean_rows[5]["loss"], rel=1e-5)

    nan = run(tmp_path / "nan", "precision=fp32", "train.steps=4", "train.spike.action=skip",
              "faults.nonfinite_forward_module=lm_head", "faults.nonfinite_value=nan", "faults.nonfinite_grad_steps=[3]",
              "faults.nonfinite_grad_rank=1", "log.progress=lines")
    assert nan.returncode == 0, nan.output[-3000:]
    assert "SKIPPED (non-finite gradients)" in nan.output  # a NaN loss: its gradients are not finite either
    nan_rows = rows(tmp_path / "nan")
    assert [r["spike"] for r in nan_rows] == [False, False, True, False]  # one rank's NaN: every rank's decision
    assert nan_rows[2]["skipped"]

    limited = run(tmp_path / "limited", *SHAPE, "train.spike.action=rollback", "train.spike.max_rollbacks=0",
                  "checkpoint.every=4", "train.steps=8")
    assert limited.returncode == 3, limited.output[-3000:]
    assert "train.spike.max_rollbacks=0" in limited.output and "Traceback" not in limited.output
