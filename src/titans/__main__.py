"""``python -m titans``: the command line (see :mod:`titans.cli`)."""

from titans.cli import main

raise SystemExit(main())
