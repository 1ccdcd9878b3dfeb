"""`python -m orchestrator.cli`: the same as the `orchestratord` command."""

import sys

from orchestrator.cli.main import main

sys.exit(main())
