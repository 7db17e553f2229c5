"""`python launch/harness_train.py CONFIG.yaml [key=value ...]`: `harness train` as a script file.

For launchers that take a script path rather than a module (deepspeed's slurm launcher runs
`python -u SCRIPT`). Same as `python -m harness train`.
"""

from harness.cli.train import main
from harness.runtime.process import exit_process

if __name__ == "__main__":
    exit_process(main())
