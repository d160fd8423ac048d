"""``python -m bonescan_core`` = the ``bonescan`` command."""

import sys

from bonescan_core.cli import main

sys.exit(main())
