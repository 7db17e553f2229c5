"""Training: components built from the config, then the loop.

build.py       everything a run needs, built and checked before anything is written
loop.py        the step: scale the loss, backward, decide (one decision for all ranks), step or skip
rows.py        one step's values on their way from the device to a metrics row
evaluation.py  the held-out loss, the same for any world size
run_state.py   a run's state: what a checkpoint holds, and the one way to restore it (resume,
               weights only, rollback)
recovery.py    what a loss spike or an abort leads to: a rollback through that restore
faults.py      fault injection for drills and tests, wrapped around the loop's parts
callbacks.py   what a user's code hooks into a run (its loss, callbacks)
trainer.py     harness.Trainer: the Python API (the CLI calls it)
"""
