from harness.cli.estimate import main
from harness.cli.main import exit_process

exit_process(main())
