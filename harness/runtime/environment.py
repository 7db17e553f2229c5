"""Process environment that must be set before the libraries read it (no torch import here)."""

from __future__ import annotations

import os


def quiet_deepspeed_without_gpus() -> None:
    """transformers imports DeepSpeed when it is installed, and DeepSpeed warns on every CPU-only
    machine that it fell back to its CPU accelerator. Name that accelerator up front instead."""
    if "DS_ACCELERATOR" not in os.environ and not os.path.exists("/dev/nvidiactl"):
        os.environ["DS_ACCELERATOR"] = "cpu"
