"""``python -m evoprune.cli``: the same as the ``evoprune`` command."""
import sys

from . import main

sys.exit(main())
