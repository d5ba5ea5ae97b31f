"""``python -m titans.harness ARGS``: lm-eval's command line (``lm_eval ARGS``) with model ``titans`` registered."""

import sys

from titans.harness import main

sys.exit(main())
