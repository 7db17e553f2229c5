"""The backend's own checks of a config, before any rank starts (harness check, --check). Only
the backend that has something to check imports anything heavy."""

from __future__ import annotations


def check_backend_file(cfg, world_size: int) -> None:
    """The backend's own validation of the file a config hands it, before any rank starts: a
    DeepSpeed JSON through DeepSpeed's classes (importing DeepSpeed, so only when there is one);
    FSDP2 takes no file. A problem is one line (HarnessError)."""
    if cfg.parallel.backend != "deepspeed" or not cfg.parallel.deepspeed_config:
        return
    from harness.config.deepspeed_json import runtime_config
    from harness.parallel.deepspeed.compat import check_zero_section
    from harness.runtime.process import quiet_imports_without_gpus

    quiet_imports_without_gpus()
    # "auto" bucket sizes are filled from the hidden size at start-up; any positive size does here.
    check_zero_section(runtime_config(cfg, world_size, hidden_size=1024), cfg.parallel.deepspeed_config)
