"""Feature drift: a small profile of the features a model was trained on, and the population stability index.

`train.py` logs `feature_profile.json` with the model's run: for each model feature, its bins and the share of
training trips in each (deciles for a number; the 30 most common values and `other` for a station, a route, a
weekday or a month; and `missing`). `batch.py evaluate` counts a new file's trips in the same bins, chunk by
chunk, and reports each feature's PSI = sum((actual - expected) * ln(actual / expected)). The usual reading:
under 0.1 stable, 0.1 to 0.25 a moderate shift, over 0.25 a major one.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd

from bikeshare_membership.schema import MODEL_INPUT_COLUMNS

PROFILE_ARTIFACT = "feature_profile.json"
NUMERIC_BINS = 10
TOP_CATEGORIES = 30
CATEGORICAL_FEATURES = {"weekday", "month", "round_trip", "holiday", "free_day", "from_station", "to_station", "route"}
EMPTY_SHARE = 1e-4  # the share a bin without trips counts as, so that the logarithm stays finite


def model_features(pipeline: Any, trips: pd.DataFrame) -> pd.DataFrame:
    """The features a fitted pipeline computes for parsed trips (its first step, `TripFeatures`)."""
    return pipeline.named_steps["features"].transform(trips[MODEL_INPUT_COLUMNS])


def feature_profile(features: pd.DataFrame) -> dict[str, Any]:
    """The bins of every feature and the share of `features` rows in each: the reference for drift."""
    profiled: dict[str, Any] = {}
    for name in features.columns:
        values = features[name].to_numpy(dtype="float64")
        known = values[~np.isnan(values)]
        if name in CATEGORICAL_FEATURES:
            categories, counts = np.unique(known, return_counts=True)
            common = categories[np.argsort(-counts, kind="stable")[:TOP_CATEGORIES]]
            spec: dict[str, Any] = {"kind": "categorical", "categories": sorted(common.tolist())}
        else:
            quantiles = np.linspace(0, 1, NUMERIC_BINS + 1)[1:-1]
            spec = {"kind": "numeric", "edges": np.unique(np.quantile(known, quantiles)).tolist() if len(known) else []}
        counts = bin_counts(spec, values)
        profiled[name] = {**spec, "bins": bin_labels(spec), "shares": (counts / max(counts.sum(), 1)).tolist()}
    return {"rows": len(features), "features": profiled}


def bin_counts(spec: dict[str, Any], values: np.ndarray) -> np.ndarray:
    """How many values fall in each bin of `spec`: the value bins, then `missing`."""
    missing = np.isnan(values)
    known = values[~missing]
    if spec["kind"] == "numeric":
        bins = np.searchsorted(np.asarray(spec["edges"], dtype="float64"), known, side="right")
        value_bins = len(spec["edges"]) + 1
    else:
        categories = np.asarray(spec["categories"], dtype="float64")
        position = np.searchsorted(categories, known).clip(0, max(len(categories) - 1, 0))
        found = categories[position] == known if len(categories) else np.zeros(len(known), dtype=bool)
        bins = np.where(found, position, len(categories))  # anything else is `other`
        value_bins = len(categories) + 1
    return np.append(np.bincount(bins, minlength=value_bins), missing.sum())


def bin_labels(spec: dict[str, Any]) -> list[str]:
    if spec["kind"] == "numeric":
        edges = [f"{edge:.4g}" for edge in spec["edges"]]
        if not edges:
            return ["any", "missing"]
        middle = [f"[{low}, {high})" for low, high in itertools.pairwise(edges)]
        return [f"< {edges[0]}", *middle, f">= {edges[-1]}", "missing"]
    return [f"{category:g}" for category in spec["categories"]] + ["other", "missing"]


def population_stability(expected_shares: np.ndarray, actual_counts: np.ndarray) -> float:
    expected = np.clip(np.asarray(expected_shares, dtype="float64"), EMPTY_SHARE, None)
    actual = np.clip(actual_counts / max(actual_counts.sum(), 1), EMPTY_SHARE, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


class DriftCounter:
    """Counts trips into a profile's bins chunk by chunk, then compares them with the training shares."""

    def __init__(self, profile: dict[str, Any]) -> None:
        self.profile = profile["features"]
        self.counts = {name: np.zeros(len(spec["shares"]), dtype="int64") for name, spec in self.profile.items()}

    def add(self, features: pd.DataFrame) -> None:
        for name, spec in self.profile.items():
            self.counts[name] += bin_counts(spec, features[name].to_numpy(dtype="float64"))

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per feature: the PSI, and the expected and actual share of each bin."""
        report = {}
        for name, spec in self.profile.items():
            counts = self.counts[name]
            report[name] = {
                "psi": population_stability(np.asarray(spec["shares"]), counts),
                "bins": spec["bins"],
                "expected": spec["shares"],
                "actual": (counts / max(counts.sum(), 1)).tolist(),
            }
        return report
