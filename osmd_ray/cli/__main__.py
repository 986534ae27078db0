"""``python -m osmd_ray.cli``: the ``osmd`` command without its installed script."""

import sys

from osmd_ray.cli import main

sys.exit(main())
