"""`python -m dqar.cli ...` (also what torchrun starts for `fid-sample`)."""
import sys

from dqar.cli.app import main

sys.exit(main())
