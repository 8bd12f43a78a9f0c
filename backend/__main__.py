"""``python -m backend``: the same as the ``spatialavatar`` command."""

import sys

from backend.cli import main

sys.exit(main())
