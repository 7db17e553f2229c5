"""`python -m harness.train CONFIG.yaml [key.sub=value ...]`: one rank of a training job."""

from harness.cli.main import exit_process
from harness.cli.train import main

exit_process(main())
