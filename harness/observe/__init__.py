"""What the job tells people and tools.

console.py       progress lines or bar on rank 0, and the end-of-run summary
metrics.py       metrics.jsonl rows (strict JSON), memory peaks, MFU peaks per GPU
tracking.py      wandb (one run, every metrics field), or a no-op tracker
wandb_file.py    reads wandb's offline .wandb files back (tests, backfill)
step_counter.py  host syncs and collectives per step (debug.count_syncs); `host_read`, the one way
                 harness reads device values
report.py        runs compared: curves, deltas, a verdict per run
"""
