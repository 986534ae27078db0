"""The statistics every experiment reports: gap closure, mean and spread over seeds, and the
noise rule that says when a difference is too small to call."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass


def gap_closure(method: float, ordinary_only: float, full_multimodal: float) -> float:
    """(method - ordinary_only) / (full_multimodal - ordinary_only), DESIGN §3."""
    gap = full_multimodal - ordinary_only
    return float("nan") if gap == 0 else (method - ordinary_only) / gap


NOISE_RULE = (
    "a difference from the target is *within seed noise* when |mean(variant) - mean(target)| "
    "<= the larger of the two sample standard deviations over seeds (a rule of thumb with a "
    "few seeds, not a significance test; with fewer than 2 seeds on either side it is not judged)"
)


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    """Sample standard deviation; nan with fewer than 2 values."""
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not vals:
            return cls(math.nan, math.nan, 0)
        std = statistics.stdev(vals) if len(vals) > 1 else math.nan
        return cls(statistics.fmean(vals), std, len(vals))

    def fmt(self, digits: int = 4) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def within_noise(variant: Stat, target: Stat) -> bool | None:
    """The rule in NOISE_RULE; None when either side has fewer than 2 seeds."""
    if variant.n < 2 or target.n < 2:
        return None
    return abs(variant.mean - target.mean) <= max(variant.std, target.std)
