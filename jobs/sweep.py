"""Run a Ray Tune sweep (a sweep spec) on the Ray cluster this job was submitted to.

A thin entry point over ``osmd sweep``: the same flags, the same ``key.sub=value``
overrides and the same exit codes (0 done, 1 failed, 2 bad input), so a failed job shows
FAILED in ``ray job status``. Inside ``ray job submit`` Ray sets RAY_ADDRESS for this
process, and osmd_ray connects to that cluster instead of starting a private instance.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
    python jobs/sweep.py --config configs/sweep_synth.yaml --out /shared/runs/sweep

``python jobs/sweep.py --help`` lists the flags.
"""

from _entry import run  # jobs/_entry.py, beside this script

if __name__ == "__main__":
    run("sweep")
