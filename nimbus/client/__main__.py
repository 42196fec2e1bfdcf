"""`python -m nimbus.client`: the sample CLI (nimbus/client/cli.py)."""

import sys

from nimbus.client.cli import main

sys.exit(main())
