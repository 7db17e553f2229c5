"""DeepSpeed ZeRO-1/2/3 behind the backend interface.

backend.py  the ParallelBackend: build the engine, backward, step or skip as harness decided
layouts.py  where each DeepSpeed optimizer keeps what harness reads and writes
compat.py   every private DeepSpeed attribute harness reads or replaces, checked when the backend
            is built; the DeepSpeed releases it was tested with
"""
