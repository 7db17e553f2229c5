"""`harness estimate CONFIG [overrides] --world-size N`: what a job will hold and cost, before you queue.

memory.py         bytes per rank of every state kind, for FSDP2 and ZeRO-1/2/3 side by side
communication.py  the bytes of every collective of one optimizer step, from the sharding plan
step_time.py      compute time at an assumed MFU, collective times over intra- and inter-node
                  bandwidth with overlap, the exposed remainder, and the limit named in one line
step.py           one step of a config predicted from the above, as text or JSON
"""

from harness.estimate.memory import activation_bytes, estimate, format_table, fsdp2_local_numel

__all__ = ["activation_bytes", "estimate", "format_table", "fsdp2_local_numel"]
