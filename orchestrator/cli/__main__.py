"""`python -m orchestrator.cli ...` is `mdsweep ...` (how `ray job submit` and tests start it)."""
import sys

from orchestrator.cli.main import main

sys.exit(main())
