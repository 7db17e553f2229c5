"""harness: sharded fp32 master weights, bf16/fp16 compute, one loss-scale and clipping decision.

The Python API (the CLI is a thin door onto it):

    import harness
    cfg = harness.load_config("configs/tiny.yaml", overrides=["train.steps=20"])
    summary = harness.Trainer(cfg, model=..., data=..., loss=...).fit()

Names are handed on lazily: `import harness` imports no torch, so the launch scripts' config check stays fast.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Trainer": "harness.train.trainer",
    "Callback": "harness.train.callbacks",
    "RunSummary": "harness.observe.console",
    "Config": "harness.config",
    "load_config": "harness.config",
    "HarnessError": "harness.errors",
    "RunFinished": "harness.errors",
    "exit_process": "harness.runtime.process",
    "stopped_exit_code": "harness.runtime.preemption",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    if _EXPORTS[name].startswith("harness.train"):
        # transformers imports DeepSpeed, which warns on a CPU-only machine unless told first.
        from harness.runtime.process import quiet_imports_without_gpus

        quiet_imports_without_gpus()
    return getattr(importlib.import_module(_EXPORTS[name]), name)
