from harness.cli import exit_process
from harness.estimate.cli import main

exit_process(main())
