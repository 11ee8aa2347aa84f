"""``python -m tests.chaos``: run the chaos scenarios and print the figures table."""

import sys

from tests.chaos.run import main

sys.exit(main())
