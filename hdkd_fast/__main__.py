"""``python -m hdkd_fast``: the ``hdkd-fast`` command line."""

from .cli import main

raise SystemExit(main())
