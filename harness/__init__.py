"""harness: sharded fp32 master weights, bf16/fp16 compute, one loss-scale and clipping decision."""

__version__ = "0.1.0"


def quiet_deepspeed_without_gpus() -> None:
    """transformers imports DeepSpeed when it is installed, and DeepSpeed warns on every CPU-only
    machine that it fell back to its CPU accelerator. Name that accelerator up front instead."""
    import os

    if "DS_ACCELERATOR" not in os.environ and not os.path.exists("/dev/nvidiactl"):
        os.environ["DS_ACCELERATOR"] = "cpu"
