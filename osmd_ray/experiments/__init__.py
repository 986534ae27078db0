"""Experiments built from training runs: the main job, comparisons and sweeps.

- ``main_job``: ``osmd main``, ordinary_only / full_multimodal / osmd on the default data;
- ``compare``: ``osmd compare``, variants x seeds x datasets from a spec, a summary;
- ``sweep``: ``osmd sweep``, a Ray Tune search over config keys;
- ``spec_file``: reading the YAML specs of compare and sweep;
- ``stats``: gap closure, mean and spread over seeds, the noise rule.
"""
