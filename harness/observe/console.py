"""What a person watching the job sees. Only rank 0 talks, except for per-rank warnings.

On a terminal: a progress bar (steps, loss, tok/s, ETA). Elsewhere (Slurm logs, CI): one plain
line every `log.every` steps. Skipped steps and evaluations always get a line.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, TextIO


def print0(rank: int, message: str, stream: TextIO = sys.stdout) -> None:
    if rank == 0:
        print(message, file=stream, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _num(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


class Progress:
    def __init__(self, rank: int, total_steps: int, mode: str, every: int, stream: TextIO = sys.stderr) -> None:
        self.enabled = rank == 0 and mode != "off"
        self.total = total_steps
        self.every = every
        self.stream = stream
        use_bar = mode == "bar" or (mode == "auto" and stream.isatty())
        self.bar = None
        if self.enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, file=stream, dynamic_ncols=True, unit="step")
        self.started = time.perf_counter()
        self.first_step: Optional[int] = None

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = row["step"]
        if self.first_step is None:
            self.first_step = step
            self.started = time.perf_counter() - row["step_time_s"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(
                f"loss {_num(row['loss'], '.4f')} tok/s {row['tokens_per_s']:,.0f}", refresh=False
            )
            if row["skipped"] or "eval_loss" in row:
                self.bar.write(self._line(row), file=self.stream)
            return
        if row["skipped"] or "eval_loss" in row or step % self.every == 0 or step in (self.first_step, self.total):
            print(self._line(row), file=self.stream, flush=True)

    def _line(self, row: dict[str, Any]) -> str:
        step = row["step"]
        done = step - (self.first_step or step) + 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step)
        parts = [
            f"step {step}/{self.total}",
            f"loss {_num(row['loss'], '.4f')}",
            f"lr {row['lr']:.2e}",
            f"grad_norm {_num(row['grad_norm'], '.3f')}",
            f"scale {row['loss_scale']:g}",
            f"{row['tokens_per_s']:,.0f} tok/s",
            f"eta {format_duration(eta)}",
        ]
        if "eval_loss" in row:
            parts.insert(2, f"eval_loss {_num(row['eval_loss'], '.4f')}")
        if row["skipped"]:
            # A spike's skip is decided on finite gradients; an overflow's row names its tensors.
            spike_only = row.get("spike") and "nonfinite_tensors" not in row
            parts.append("SKIPPED (loss spike)" if spike_only else "SKIPPED (non-finite gradients)")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class RunSummary:
    steps: int
    skipped: int
    first_loss: Optional[float]
    final_loss: Optional[float]
    eval_loss: Optional[float]
    tokens: int
    tokens_per_s: float
    mfu: Optional[float]
    peak_mem_gb: float
    wall_s: float
    run_dir: str
    overflows: Optional[str] = None
    stopped: Optional[tuple[str, int]] = None
    """(signal name, last step) when a stop signal ended the run early."""
    setup_host_peak_gb: list[float] = field(default_factory=list)
    """Each rank's host resident-set high-water mark after setup, before step 1 (GiB)."""

    def to_json(self) -> dict:
        """What run.dir/summary.json holds."""
        data = asdict(self)
        data["stopped"] = None if self.stopped is None else {"signal": self.stopped[0], "after_step": self.stopped[1]}
        return data

    def table(self) -> str:
        rows = [
            ("steps", f"{self.steps} ({self.skipped} skipped)" if self.stopped is None
             else f"stopped by {self.stopped[0]} after step {self.stopped[1]} of {self.steps} ({self.skipped} skipped)"),
            ("overflows", self.overflows or "none"),
            ("final loss", f"{_num(self.final_loss, '.4f')} (first {_num(self.first_loss, '.4f')})"),
            ("eval loss", _num(self.eval_loss, ".4f")),
            ("tokens", f"{self.tokens:,}"),
            ("tokens/s", f"{self.tokens_per_s:,.0f}"),
            ("mfu", "n/a (no device peak known)" if self.mfu is None else f"{self.mfu:.1%}"),
            ("peak memory", f"{self.peak_mem_gb:.2f} GiB (rank 0)"),
            ("setup host", "-" if not self.setup_host_peak_gb else
             f"{max(self.setup_host_peak_gb):.2f} GiB peak before step 1 (largest of {len(self.setup_host_peak_gb)} rank(s))"),
            ("wall time", format_duration(self.wall_s)),
            ("run dir", self.run_dir),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(["harness run summary"] + [f"  {k.ljust(width)}  {v}" for k, v in rows])
