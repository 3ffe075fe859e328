"""``python -m i2v_model`` = the ``i2v`` command."""

import sys

from i2v_model.cli import main

sys.exit(main())
