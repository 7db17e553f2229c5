"""`harness report RUN_DIR [RUN_DIR ...] --out report.html|.png|.md`: what precision did to a run.

Compares runs of the same config in different precisions (or any runs): loss and eval-loss
curves overlaid, final/min loss deltas against the reference run (the fp32 one, unless
--reference names another), skipped steps, the loss-scale trajectory, tokens/s, peak memory, and
a plain verdict per run such as "bf16 within 0.5% of fp32 eval loss".
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from harness.errors import HarnessError

SMOOTH = 5
"""Final train loss = mean of the last SMOOTH steps, so one noisy batch does not decide a verdict."""


@dataclass
class RunStats:
    name: str
    path: Path
    precision: str
    steps: list[int]
    losses: list[Optional[float]]
    eval_steps: list[int]
    eval_losses: list[float]
    scales: list[float]
    skipped: int
    tokens_per_s: float
    peak_mem_gb: float

    @property
    def final_loss(self) -> float:
        tail = [x for x in self.losses[-SMOOTH:] if x is not None]
        return statistics.fmean(tail) if tail else float("nan")

    @property
    def min_loss(self) -> float:
        return min((x for x in self.losses if x is not None), default=float("nan"))

    @property
    def final_eval(self) -> Optional[float]:
        return self.eval_losses[-1] if self.eval_losses else None


def load_run(path: Path) -> RunStats:
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise HarnessError(f"{path} has no metrics.jsonl; pass run directories written by harness train")
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not rows:
        raise HarnessError(f"{metrics} is empty; the run logged no step")
    config_file = path / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    throughput = [r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]
    return RunStats(
        name=(config.get("run") or {}).get("name") or path.name,
        path=path,
        precision=config.get("precision", "?"),
        steps=[r["step"] for r in rows],
        losses=[r["loss"] for r in rows],
        eval_steps=[r["step"] for r in rows if r.get("eval_loss") is not None],
        eval_losses=[r["eval_loss"] for r in rows if r.get("eval_loss") is not None],
        scales=[r["loss_scale"] for r in rows],
        skipped=sum(1 for r in rows if r["skipped"]),
        tokens_per_s=statistics.median(throughput),
        peak_mem_gb=max(r["mem_gb"] for r in rows),
    )


def _delta(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or reference is None or reference == 0:
        return None
    return (value - reference) / reference


def verdict(run: RunStats, ref: RunStats, tolerance: float) -> str:
    if run is ref:
        return f"{run.name} ({run.precision}) is the reference"
    use_eval = run.final_eval is not None and ref.final_eval is not None
    what = "eval loss" if use_eval else f"final train loss (mean of last {SMOOTH} steps)"
    mine, theirs = (run.final_eval, ref.final_eval) if use_eval else (run.final_loss, ref.final_loss)
    delta = _delta(mine, theirs)
    if delta is None:
        return f"{run.precision}: no comparable loss"
    label = f"{run.precision} ({run.name})" if run.precision != "?" else run.name
    numbers = f"{mine:.4f} vs {theirs:.4f}, {delta:+.2%}"
    if abs(delta) <= tolerance:
        return f"{label} within {tolerance:.1%} of {ref.precision} {what} ({numbers})"
    direction = "above" if delta > 0 else "below"
    return f"{label} is {abs(delta):.1%} {direction} {ref.precision} {what} ({numbers}; tolerance {tolerance:.1%})"


def table(runs: list[RunStats], ref: RunStats) -> list[list[str]]:
    header = ["run", "precision", "steps", "final loss", "vs ref", "min loss", "vs ref", "eval loss", "vs ref",
              "skipped", "final scale", "tokens/s", "peak mem GiB"]
    body = [header]
    for r in runs:
        def pct(value, reference, run=r):
            d = _delta(value, reference)
            return "-" if d is None or run is ref else f"{d:+.2%}"

        body.append([
            r.name, r.precision, str(r.steps[-1]), f"{r.final_loss:.4f}", pct(r.final_loss, ref.final_loss),
            f"{r.min_loss:.4f}", pct(r.min_loss, ref.min_loss),
            "-" if r.final_eval is None else f"{r.final_eval:.4f}", pct(r.final_eval, ref.final_eval),
            str(r.skipped), f"{r.scales[-1]:g}", f"{r.tokens_per_s:,.0f}", f"{r.peak_mem_gb:.2f}",
        ])
    return body


def plot_png(runs: list[RunStats]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    loss_ax, eval_ax, scale_ax, speed_ax = axes.flat
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(runs):
        label = f"{r.name} ({r.precision})"
        style = styles[i % len(styles)]  # runs that agree overlap; the dash patterns keep each visible
        loss_ax.plot(r.steps, [float("nan") if x is None else x for x in r.losses], style, label=label)
        if r.eval_losses:
            eval_ax.plot(r.eval_steps, r.eval_losses, style, marker="o", label=label)
        scale_ax.step(r.steps, r.scales, style, where="post", label=label)
    loss_ax.set(title="train loss", xlabel="step", ylabel="loss")
    eval_ax.set(title="eval loss", xlabel="step", ylabel="loss")
    scale_ax.set(title="loss scale (the scale each step's backward used)", xlabel="step", yscale="log")
    names = [f"{r.name}\n({r.precision})" for r in runs]
    speed_ax.bar(names, [r.tokens_per_s for r in runs], color="tab:gray")
    speed_ax.set(title="median tokens/s (bars) and peak memory GiB (labels)")
    for i, r in enumerate(runs):
        speed_ax.annotate(f"{r.peak_mem_gb:.2f} GiB", (i, r.tokens_per_s), ha="center", va="bottom")
    for ax in (loss_ax, eval_ax, scale_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(runs: list[RunStats], ref: RunStats, out: Path, tolerance: float) -> list[str]:
    verdicts = [verdict(r, ref, tolerance) for r in runs]
    rows = table(runs, ref)
    png = plot_png(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".png":
        out.write_bytes(png)
    elif suffix == ".md":
        image = out.with_suffix(".png")
        image.write_bytes(png)
        lines = ["# Precision report", "", *[f"- {v}" for v in verdicts], ""]
        lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        lines += ["", f"![loss, eval loss, loss scale, throughput]({image.name})", ""]
        out.write_text("\n".join(lines))
    elif suffix == ".html":
        cells = "".join(
            "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in row)
            + "</tr>"
            for i, row in enumerate(rows)
        )
        items = "".join(f"<li>{html.escape(v)}</li>" for v in verdicts)
        encoded = base64.b64encode(png).decode()
        out.write_text(
            "<!doctype html><meta charset=utf-8><title>harness precision report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style>"
            f"<h1>Precision report</h1><ul>{items}</ul><table>{cells}</table>"
            f"<p><img alt='curves' src='data:image/png;base64,{encoded}'></p>"
        )
    else:
        raise HarnessError(f"--out {out}: use a .html, .png or .md file name")
    return verdicts
