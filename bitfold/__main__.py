"""``python -m bitfold`` is the ``bitfold`` command."""

import sys

from bitfold.tools.cli import main

sys.exit(main())
