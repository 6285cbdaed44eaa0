"""`TripFeatures`, the first step of every logged pipeline: the features (features.py) as a scikit-learn
transformer, fitted with the station coordinates and holiday calendar of its time.

Registered models name this class `preprocess.TripFeatures` (skops stores the module and the class name): the
root module `preprocess` re-exports it, so that name resolves to this class wherever the class lives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

from bikeshare_membership.features import (
    DEFAULT_FEATURES,
    FEATURE_CATALOGUE,
    LEGACY_FEATURES,
    FittedFeatures,
    TripColumns,
    ontario_holidays,
)
from bikeshare_membership.stations import station_index


class TripFeatures(TransformerMixin, BaseEstimator, FittedFeatures):
    """The features of a trip, computed column-wise from `MODEL_INPUT_COLUMNS`; `features` names which.

    Fitting captures the station coordinates and the holiday calendar, so a logged pipeline carries the ones
    it was trained with.
    """

    def __init__(self, features: tuple[str, ...] = DEFAULT_FEATURES) -> None:
        self.features = features

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A model registered before `features` and the holiday calendar existed loads with what it used."""
        state.setdefault("features", LEGACY_FEATURES)
        state.setdefault("holiday_days_", np.empty(0, dtype="int64"))
        super().__setstate__(state)

    def fit(self, trips: TripColumns, target: Any = None) -> TripFeatures:
        unknown = sorted(set(self.features) - set(FEATURE_CATALOGUE))
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {', '.join(FEATURE_CATALOGUE)}")
        coordinates = station_index().coordinates
        self.station_ids_ = np.array(sorted(coordinates), dtype="float64")
        self.station_coordinates_ = np.radians(np.array([coordinates[int(i)] for i in self.station_ids_]))
        self.holiday_days_ = ontario_holidays()
        return self

    def transform(self, trips: TripColumns) -> pd.DataFrame:
        index = trips.index if isinstance(trips, pd.DataFrame) else None
        return pd.DataFrame(self.feature_matrix(trips), columns=list(self.features), index=index)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.array(self.features, dtype=object)


TripFeatures.__module__ = "preprocess"
