"""``python -m patchspec``: the command line (see :mod:`patchspec.cli`)."""

from patchspec.cli import main

raise SystemExit(main())
