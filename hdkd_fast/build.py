"""``hdkd-fast build`` (also ``python -m hdkd_fast.build``): build the compiled extension now.

For images and clusters that prepare an environment once: compiles ``hdkd_fast._C`` for this machine
into the cache of the build on first use (:mod:`hdkd_fast._ext_loader`), or finds the build that is
there already (ahead of time or cached), and prints what was built. ``--force`` rebuilds a cached
build. Exit status 0 when the extension is available, 1 when it is not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _ext_loader
from .backends import native_backend
from .info import extension_lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild a cached build on first use")


def run(args: argparse.Namespace) -> int:
    """Build (or find) the extension and print what there is."""
    try:
        _ext_loader.build(force=args.force)
    except _ext_loader.ExtensionBuildError as exc:
        print(f"hdkd-fast build: error: {exc}", file=sys.stderr)
        return 1
    info = native_backend.build_info()
    print("\n".join(extension_lines(info)))
    return 0 if info["built"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hdkd_fast.build", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
