"""Training: components built from the config, then the loop.

build.py     everything a run needs, built and checked before anything is written
loop.py      the step: scale the loss, backward, decide (one decision for all ranks), step or skip
rollback.py  a loss spike sends the run back to its last checkpoint before the spike
faults.py    fault injection for drills and tests, kept out of the loop's code
"""
