"""harness: sharded fp32 master weights, bf16/fp16 compute, one loss-scale and clipping decision."""

__version__ = "0.1.0"
