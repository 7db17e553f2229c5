"""The loss of a step is the mean over every trained token of the global batch (item 4 of the
fine-tuning issue): with rows whose trained tokens differ, 1 rank x grad_accum 4, 2 ranks x
grad_accum 2 and 4 ranks x grad_accum 1 give the same losses and gradient norms on FSDP2 and
ZeRO-1/2/3, and the first step's loss equals an independent computation over the global batch.
One spawn per world size, every backend inside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_on_ranks

pytestmark = pytest.mark.spawns

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
BACKENDS = {
    "fsdp2": ["parallel.backend=fsdp2"],
    "zero1": ["parallel.backend=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
}
STEPS = 3
ROWS_PER_STEP = 8  # micro_batch_size 2 x grad_accum x world size = 2 x 4 x 1 = 2 x 2 x 2 = 2 x 1 x 4
LENGTH = 32


class UnevenRows:
    """Rows of LENGTH tokens whose labels keep a different number of tokens each (a prompt of
    -100 in front, padding of -100 behind), as instruction data has them."""

    def __init__(self, count: int = 64) -> None:
        rng = np.random.default_rng(7)
        self.items = []
        for _ in range(count):
            ids = rng.integers(0, 50_000, LENGTH)
            labels = ids.copy()
            prompt, kept = rng.integers(1, LENGTH - 2), rng.integers(1, 8)
            labels[:prompt] = -100
            labels[prompt + kept:] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _scenarios(run_root: str) -> dict:
    from harness.config import load_config
    from harness.data.batch import collate
    from harness.data.order import GlobalOrder
    from harness.model.loss import loss_sum_and_count
    from harness.numerics.optim import lr_at
    from harness.runtime import dist as hdist
    from harness.train.build import Parts, build_loop

    info = hdist.rank_info_from_env()
    device = torch.device("cpu")
    hdist.init_process_group(info, "gloo", 120, device)
    data = UnevenRows()
    grad_accum = 4 // info.world_size
    out: dict = {}
    for label, backend_args in BACKENDS.items():
        cfg = load_config(TINY, [f"run.dir={run_root}/{label}-{info.world_size}", "log.progress=off", "eval.every=0",
                                 "precision=fp32", f"train.steps={STEPS}", "train.micro_batch_size=2",
                                 f"train.grad_accum={grad_accum}", *backend_args])
        loop = build_loop(cfg, info, device, Parts(data=data))
        reference = None
        if info.world_size == 1 and label == "fsdp2":
            # The independent computation: one forward over the whole global batch of step 1.
            keys = GlobalOrder(len(data), cfg.train.seed).take(0, ROWS_PER_STEP)
            with torch.no_grad():
                total, count = loss_sum_and_count(loop.backend.model, collate([data[int(k)] for k in keys]))
            reference = float(total / count)
        losses, norms, trained = [], [], []
        for step in range(1, STEPS + 1):
            local = loop.forward_backward(step, loss_scale=None)
            decision = loop.apply_gradients(step, lr_at(step, cfg.train), local).read()
            losses.append(decision.mean_loss)
            norms.append(decision.grad_norm)
            trained.append(float(local[1]))
        out[label] = {"losses": losses, "norms": norms, "local_tokens": trained, "reference": reference}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("token-mean")
    return {world: run_on_ranks(_scenarios, world, str(root)) for world in (1, 2, 4)}


def test_the_first_loss_is_the_mean_over_the_global_batchs_trained_tokens(runs):
    single = runs[1][0]["fsdp2"]
    assert single["losses"][0] == pytest.approx(single["reference"], rel=1e-6)
    # The rows keep 1 to 7 tokens each: a mean of per-row (or per-micro-batch) means would differ.
    assert len(set(UnevenRows().items[i]["labels"].tolist().count(-100) for i in range(8))) > 1


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_losses_and_norms_are_the_same_on_1_2_and_4_ranks(runs, backend):
    want = runs[1][0]["fsdp2"]
    for world in (1, 2, 4):
        for rank, result in enumerate(runs[world]):
            got, where = result[backend], f"{backend}, rank {rank} of {world}"
            np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-6, err_msg=where)
            np.testing.assert_allclose(got["norms"], want["norms"], rtol=1e-6, err_msg=where)
        # The ranks trained different numbers of tokens: the global count, not the local one, divides.
        if world > 1:
            assert len({tuple(r[backend]["local_tokens"]) for r in runs[world]}) > 1
