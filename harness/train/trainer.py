"""`harness.Trainer`: the Python API, and what `harness train` calls.

    import harness
    cfg = harness.load_config("configs/tiny.yaml", overrides=["train.steps=20"])
    summary = harness.Trainer(cfg, model=my_model_fn, data=my_dataset, loss=my_loss).fit()

Run under a launcher (torchrun, srun, the deepspeed launcher) it is one rank of the job, exactly as
`python -m harness train` is: the same process group, sharding, loss scaler, checkpoints,
metrics, watchdog and stop signals. Without a launcher it is a world of one.
"""

from __future__ import annotations

import re
import signal
import sys
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from harness.config import Config, validate_for_world
from harness.errors import HarnessError, first_line, report_line
from harness.model.source import BlocksOf
from harness.observe.console import RunSummary
from harness.runtime import dist
from harness.runtime.host_memory import setup_allocations_returned_to_os
from harness.runtime.preemption import STOP_SIGNALS, StopRequest
from harness.runtime.process import env_rank, exit_process, quiet_imports_without_gpus
from harness.runtime.watchdog import EXIT_HUNG, Watchdog, backstop_timeout_s, interval_for, store_factory
from harness.train.build import Parts, build_loop
from harness.train.callbacks import Callback, LossFn


class LostRank(HarnessError):
    """A collective failed because another rank is gone: not this rank's bug, so no traceback."""

    exit_code = EXIT_HUNG
    heading = None


class Trainer:
    """One training run: the config, plus whatever pieces the user brings instead of the config's.

    model:     a callable returning an nn.Module, called inside the backend's context (the meta
               device, or ZeRO-3 partitions) so no rank builds the whole model; default: the
               config's transformers model.
    blocks:    model -> its transformer blocks, the units FSDP2 shards and ZeRO-3 gathers;
               default: the classes named in the model's `_no_split_modules` (transformers' own).
    data:      a map-style or iterable dataset of token-id sequences (train.seq_len + 1 tokens) or
               of dicts with `input_ids` and `labels`; the harness batches and orders it, so resume
               stays exact. Default: the config's corpus.
    eval_data: held-out items for eval.every, as `data`.
    loss:      loss(model, batch) -> (sum of token losses, token count); default: next-token
               cross entropy.
    callbacks: objects with on_step_end(row) / on_eval(step, eval_loss) (harness.Callback).
    """

    def __init__(self, cfg: Config, model: Optional[Callable[[], nn.Module]] = None, data: Any = None,
                 loss: Optional[LossFn] = None, *, blocks: Optional[BlocksOf] = None, eval_data: Any = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        self.parts = Parts(model=model, blocks=blocks, data=data, eval_data=eval_data, loss=loss,
                           callbacks=tuple(callbacks))

    def fit(self) -> RunSummary:
        """Train for train.steps (or until a stop signal, after a checkpoint); every rank returns
        the same summary. Joins the process group unless one exists, and leaves what it joined."""
        cfg = self.cfg
        quiet_imports_without_gpus()
        report_user_errors_in_one_line()
        previous_handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        stop = StopRequest().install()  # before anything slow: a signal during start-up counts too
        joined = False
        try:
            info = dist.rank_info_from_env()
            cfg.data.tokenizer = cfg.tokenizer_ref()  # a Config built in Python, not by load_config
            validate_for_world(cfg, info.world_size)
            if torch.distributed.is_initialized():
                device = dist.device_for(info, torch.distributed.get_backend())
            else:
                backend = dist.pick_dist_backend(cfg.parallel.dist_backend)
                device = dist.device_for(info, backend)
                # torch's own collective timeout is the backstop; the watchdog speaks first.
                dist.init_process_group(info, backend, backstop_timeout_s(cfg.parallel.timeout_s), device)
                joined = True
            summary = self._run(info, device, stop)
            if joined:
                dist.shutdown()
            return summary
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

    def _run(self, info: dist.RankInfo, device: torch.device, stop: StopRequest) -> RunSummary:
        # Watched from the start: a rank that never finishes setting up is named like one that
        # stops in a step (setup's collectives wait for every rank too).
        watchdog = _start_watchdog(self.cfg, info)
        if watchdog is not None:
            watchdog.enter("setup", 0)
        try:
            with setup_allocations_returned_to_os():
                loop = build_loop(self.cfg, info, device, self.parts, stop=stop, watchdog=watchdog)
        except BaseException:
            if watchdog is not None:
                watchdog.stop(wait=False)
            raise
        finished = False
        try:
            summary = loop.fit()
            finished = True
            return summary
        except Exception as exc:
            if loop.watchdog is None or not dist.is_communication_failure(exc):
                raise
            gone = loop.watchdog.peers_gone()
            if not gone:
                raise  # every peer is alive: this rank's own failure, traceback and all
            # The launcher names the rank that died; this one says where it was and stops.
            reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc))[:120]  # gloo prefixes its source location
            ranks = ", ".join(map(str, gone))
            raise LostRank(f"lost contact with rank {ranks} in {loop.watchdog.where()} ({reason}); stopping",
                           rank_local=True) from None
        finally:
            if loop.watchdog is not None:
                loop.watchdog.stop(wait=finished)


def report_user_errors_in_one_line() -> None:
    """A HarnessError a script leaves uncaught (harness.Trainer(...).fit() under torchrun) is what
    the CLI makes of it: one line from rank 0 (or from the rank it concerns) and the error's exit
    code (2 for a user mistake), not a traceback from every rank. Any other exception keeps the
    interpreter's report. Installed once, by the first fit()."""
    previous = sys.excepthook
    if getattr(previous, "harness_one_line", False):
        return

    def hook(kind, exc, traceback) -> None:
        if not isinstance(exc, HarnessError):
            previous(kind, exc, traceback)
            return
        line = report_line(exc, env_rank())
        if line is not None:  # the real stderr: torch's own hook (init_process_group) wraps this one in a buffer
            print(line, file=sys.__stderr__, flush=True)
        exit_process(exc.exit_code)

    hook.harness_one_line = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _start_watchdog(cfg: Config, info: dist.RankInfo) -> Optional[Watchdog]:
    """Multi-rank jobs only: a single process has no one to wait for."""
    if info.world_size == 1:
        return None
    connect = store_factory(info.master_addr, info.master_port,
                            timeout_s=max(2.0, 2 * interval_for(cfg.parallel.timeout_s)))
    return Watchdog(info.rank, info.world_size, cfg.parallel.timeout_s, cfg.run.dir, connect).start()
