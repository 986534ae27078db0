"""The statistics every experiment reports: gap closure, mean and spread over seeds, and the
paired test that says whether a variant differs from the target."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeGuard

from scipy.stats import t as student_t

CONFIDENCE = 0.95
"""Coverage of every interval the experiments report (two-sided)."""
HEADLINE_SEEDS = 5
"""Fewest seeds behind a figure that may be quoted as a result (issue 28)."""
PAIRED_TEST = (
    "paired t-interval over seeds, 95%, two-sided: per seed k, variant(seed k) - target(seed k) "
    "(seeds finished by both), then the mean of those differences and its Student-t confidence "
    "interval with n - 1 degrees of freedom; a difference whose interval contains 0 is not "
    "distinguishable from none, and with fewer than 2 paired seeds it is not judged"
)


def gap_closure(method: float, ordinary_only: float, full_multimodal: float) -> float:
    """(method - ordinary_only) / (full_multimodal - ordinary_only), DESIGN §3."""
    gap = full_multimodal - ordinary_only
    return float("nan") if gap == 0 else (method - ordinary_only) / gap


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    """Sample standard deviation; nan with fewer than 2 values."""
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        vals = [float(v) for v in values if _present(v)]
        if not vals:
            return cls(math.nan, math.nan, 0)
        std = statistics.stdev(vals) if len(vals) > 1 else math.nan
        return cls(statistics.fmean(vals), std, len(vals))

    @property
    def interval(self) -> tuple[float, float]:
        """Two-sided Student-t confidence interval (CONFIDENCE) of the mean; (nan, nan) with
        fewer than 2 values, where the spread, and so the interval, is unknown."""
        if self.n < 2:
            return math.nan, math.nan
        quantile = float(student_t.ppf(0.5 + CONFIDENCE / 2, self.n - 1))
        half = quantile * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def excludes_zero(self) -> bool | None:
        """Whether the interval lies wholly above or below 0; None when it is not judged."""
        lo, hi = self.interval
        if math.isnan(lo) or math.isnan(hi):
            return None
        return lo > 0 or hi < 0

    def fmt(self, digits: int = 4) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def paired_differences(
    variant: Mapping[int, float | None], target: Mapping[int, float | None]
) -> list[float]:
    """variant[k] - target[k] for every seed k that both have a value for, in seed order.

    Runs of one seed share what the seed decides (the order of the batches, the random
    draws of training), so their difference leaves out part of the seed-to-seed spread that
    each side's own std still carries.
    """
    pairs = [(variant[k], target[k]) for k in sorted(variant.keys() & target.keys())]
    return [float(v) - float(t) for v, t in pairs if _present(v) and _present(t)]


def paired_difference(
    variant: Mapping[int, float | None], target: Mapping[int, float | None]
) -> Stat:
    """Mean, std, n and (through :attr:`Stat.interval`) the interval of PAIRED_TEST."""
    return Stat.of(paired_differences(variant, target))


def _present(value: float | None) -> TypeGuard[float]:
    return value is not None and not math.isnan(float(value))
