"""Automatic foreground bounds C1/C2 (the reference's "tune cut").

After a short plain (CE-only) warm-up of a throw-away copy of the model, the statistic
S = mean over maps of Σ|R| over the *whole* heatmap (background included) is collected for every
training sample with Welford's algorithm, and

    C1 = max(μ/5, μ - 3σ),    C2 = min(25·C1, μ + 3σ)

(σ the sample standard deviation). The warm-up loop itself lives in `isnet_cli.train.trainer`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from isnet_cli.errors import IsnetError


@dataclass
class Welford:
    """Running count, mean and sum of squared deviations (M2); mergeable across processes (Chan et al.)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: Iterable[float]) -> None:
        for v in values:
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (v - self.mean)

    def merge(self, other: Welford) -> Welford:
        """Combine two partial statistics (used to pool the statistic of all DDP ranks)."""
        n = self.count + other.count
        if n == 0:
            return Welford()
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / n
        return Welford(n, mean, m2)

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1), 0 for fewer than two values."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0


def cut_from_stats(mean: float, std: float) -> tuple[float, float]:
    """C1 = max(μ/5, μ - 3σ), C2 = min(25·C1, μ + 3σ)."""
    if not (math.isfinite(mean) and math.isfinite(std)) or mean <= 0:
        raise IsnetError(
            f"cannot tune C1/C2: relevance mass statistic is mean={mean}, std={std}; "
            "pass --cut C1,C2 explicitly or check the data"
        )
    c1 = max(mean / 5.0, mean - 3.0 * std)
    c2 = min(25.0 * c1, mean + 3.0 * std)
    return c1, c2


def parse_cut(text: str) -> tuple[float, float] | None:
    """'auto' -> None (tune); 'C1,C2' -> (C1, C2) with 0 < C1 < C2."""
    if text.strip().lower() == "auto":
        return None
    try:
        c1, c2 = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise ValueError(f"--cut must be 'auto' or 'C1,C2' (two numbers), got {text!r}") from exc
    if not (0 < c1 < c2):
        raise ValueError(f"--cut needs 0 < C1 < C2, got {c1}, {c2}")
    return c1, c2
