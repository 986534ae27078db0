"""Write, import or check a dataset (`osmd data synth|import|check`) from a Ray job.

A thin entry point over ``osmd data``: the same flags and the same exit
codes (0 done, 1 failed, 2 bad input), so a failed job shows
FAILED in ``ray job status``. Inside ``ray job submit`` Ray sets RAY_ADDRESS for this
process, and osmd_ray connects to that cluster instead of starting a private instance.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
    python jobs/make_data.py synth --out /shared/data/synth_cls

``python jobs/make_data.py --help`` lists the flags.
"""

import os
import sys

# `ray job submit --working-dir .` unpacks the repository as the job's working directory but
# puts only jobs/ on sys.path; fall back to the repository root when the package is not installed.
try:
    import osmd_ray  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from osmd_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
