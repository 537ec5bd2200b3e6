"""``python -m pyramid_core.cli`` runs the ``pyramid`` command."""

import sys

from pyramid_core.cli import main

sys.exit(main())
