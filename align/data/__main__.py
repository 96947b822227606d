"""``python -m align.data``: see `align.data.cli`."""

import logging
import sys

from align.data.cli import main

if __name__ == "__main__":
    # Keep the logger's "skipped N bad records" warning out of the CLI: the summary already lists them.
    logging.disable(logging.WARNING)
    sys.exit(main())
