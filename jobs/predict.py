"""Predict a split of a dataset with a deployment model (RUN/deploy); runs in the job's driver.

A thin entry point over ``osmd predict``: the same flags and the same exit
codes (0 done, 1 failed, 2 bad input), so a failed job shows
FAILED in ``ray job status``. Inside ``ray job submit`` Ray sets RAY_ADDRESS for this
process, and osmd_ray connects to that cluster instead of starting a private instance.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
    python jobs/predict.py --model /shared/runs/a/deploy --data /shared/data/synth_cls \\
        --out /shared/pred.parquet

``python jobs/predict.py --help`` lists the flags.
"""

from _entry import run  # jobs/_entry.py, beside this script

if __name__ == "__main__":
    run("predict")
