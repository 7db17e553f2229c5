"""The entry points: each parses its arguments and calls the Python API, nothing more.

main.py          `harness COMMAND ...`: dispatches to the modules below; the one place a user error
                 becomes one line and an exit code
train.py         `harness train` / `python -m harness train`: one rank of a training job
launcher.py      `launch/local.sh`: torchrun with signal forwarding and a one-line failure report
submit.py        `harness submit`: render and sbatch a Slurm job
export.py        `harness export`: a checkpoint as a Hugging Face folder
report.py        `harness report`: compare runs (curves, deltas, verdict)
estimate.py      `harness estimate`: memory, collectives and step time before you queue
prepare_data.py  `harness prepare-data`: tokenize a config's corpus into the shared cache
"""
