"""``python -m zfalkon``: the same as the ``zfalkon`` command."""

import sys

from zfalkon.cli import main

sys.exit(main())
