from harness.cli.estimate import main
from harness.runtime.process import exit_process

exit_process(main())
