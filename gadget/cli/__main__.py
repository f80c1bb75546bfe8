"""``python -m gadget.cli`` = the ``varnet`` console script."""
import sys

from . import main

sys.exit(main())
