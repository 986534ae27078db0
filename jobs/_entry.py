"""What every jobs/*.py shares: find the osmd_ray package, then run ``osmd <command> ARGS``."""

import os
import sys


def run(command: str) -> None:
    """Exit with ``osmd <command> <this script's arguments>``'s exit code (0, 1 or 2)."""
    # `ray job submit --working-dir .` unpacks the repository as the job's working directory
    # but puts only jobs/ on sys.path; fall back to the repository root when the package is
    # not installed.
    try:
        import osmd_ray  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from osmd_ray.cli import main

    sys.exit(main([command, *sys.argv[1:]]))
