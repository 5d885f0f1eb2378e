"""`python -m mtssl.cli`: the `mtssl` command."""

import sys

from mtssl.cli import main

sys.exit(main())
