"""`python -m harness.train CONFIG.yaml [key.sub=value ...]`: one rank of a training job."""

from harness.cli.train import main
from harness.runtime.process import exit_process

exit_process(main())
