"""Write, import or check a dataset (`osmd data synth|import|check`) from a Ray job.

A thin entry point over ``osmd data``: the same flags and the same exit
codes (0 done, 1 failed, 2 bad input), so a failed job shows
FAILED in ``ray job status``. Inside ``ray job submit`` Ray sets RAY_ADDRESS for this
process, and osmd_ray connects to that cluster instead of starting a private instance.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
    python jobs/make_data.py synth --out /shared/data/synth_cls

``python jobs/make_data.py --help`` lists the flags.
"""

from _entry import run  # jobs/_entry.py, beside this script

if __name__ == "__main__":
    run("data")
