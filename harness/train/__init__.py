"""Training: components built from the config, then the loop.

build.py       everything a run needs, built and checked before anything is written
loop.py        the step: scale the loss, backward, decide (one decision for all ranks), step or skip
rows.py        one step's values on their way from the device to a metrics row
evaluation.py  the held-out loss, the same for any world size
rollback.py    a loss spike sends the run back to its last checkpoint before the spike
faults.py      fault injection for drills and tests, kept out of the loop's code
callbacks.py   what a user's code hooks into a run (its loss, callbacks)
trainer.py     harness.Trainer: the Python API (the CLI calls it)
"""
