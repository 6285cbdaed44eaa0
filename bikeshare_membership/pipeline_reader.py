"""Reading a fitted scikit-learn pipeline into its exact fast form (fast_pipeline.py), checked against the
pipeline's own `predict_proba` before it is used.

Only a process that has unpickled a pipeline needs this module (and scikit-learn): a version whose verified
fast form is saved in the cache loads without either (model_store.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, TargetEncoder

from bikeshare_membership.fast_pipeline import (
    BoostedTrees,
    FastPipeline,
    StationEncoding,
    UnsupportedPipeline,
    parity_check_trips,
    reading,
)
from bikeshare_membership.feature_step import TripFeatures
from bikeshare_membership.features import FEATURE_CATALOGUE
from bikeshare_membership.schema import MODEL_INPUT_COLUMNS


def fast_pipeline_of(pipeline: Any) -> FastPipeline:
    """Build from a fitted pipeline and verify it against the pipeline; raises UnsupportedPipeline.

    Reading the fitted steps and evaluating the check trips the fast way are wrapped (`reading`): a
    failure there is an UnsupportedPipeline. `pipeline.predict_proba` is not: if scikit-learn itself
    cannot score the check trips, the model cannot be served at all, and the caller's load fails.
    """
    if not isinstance(pipeline, Pipeline) or len(pipeline.steps) != 3:
        raise UnsupportedPipeline("expected the pipeline TripFeatures -> ColumnTransformer -> classifier")
    features, encoder, classifier = (step for _, step in pipeline.steps)
    if not isinstance(features, TripFeatures) or not isinstance(encoder, ColumnTransformer):
        raise UnsupportedPipeline("expected TripFeatures then a ColumnTransformer")
    if not isinstance(classifier, HistGradientBoostingClassifier):
        raise UnsupportedPipeline(f"no exact fast form for {type(classifier).__name__}")
    with reading("the fitted column steps"):
        columns = model_columns(encoder)
    fast = FastPipeline(features, columns, boosted_trees(classifier))
    with reading("the features' fitted stations"):
        check_trips = parity_check_trips(features, columns)
    fast.verify(check_trips, pipeline.predict_proba(pd.DataFrame(check_trips)[MODEL_INPUT_COLUMNS])[:, 1])
    return fast


def boosted_trees(classifier: HistGradientBoostingClassifier) -> BoostedTrees:
    """The classifier's trees and baseline.

    Raises UnsupportedPipeline for a model neither evaluation takes exactly, and for trees it cannot read
    (private attributes of the boosted trees).
    """
    with reading("the boosted trees"):
        if list(classifier.classes_) != [0, 1] or classifier.n_trees_per_iteration_ != 1:
            raise UnsupportedPipeline("only a binary classifier with classes [0, 1] is supported")
        if getattr(classifier, "_preprocessor", None) is not None or classifier.is_categorical_ is not None:
            raise UnsupportedPipeline("categorical features in the boosted trees are not supported")
        trees = [predictors[0].nodes for predictors in classifier._predictors]
        if any(tree["is_categorical"].any() for tree in trees):
            raise UnsupportedPipeline("categorical splits are not supported")
        return BoostedTrees(trees, float(np.ravel(classifier._baseline_prediction)[0]))


def model_columns(encoder: ColumnTransformer) -> list[tuple[int, StationEncoding | None]]:
    """Each column the classifier sees, in its order: its feature's place in FEATURE_CATALOGUE, and the fitted
    encoding of a station column (None for a feature passed through). Raises UnsupportedPipeline."""
    columns: list[tuple[int, StationEncoding | None]] = []
    for name, transformer, selected in encoder.transformers_:
        positions = [FEATURE_CATALOGUE.index(column) for column in selected]
        if transformer == "drop" or not positions:
            continue
        if transformer == "passthrough" or (isinstance(transformer, FunctionTransformer) and transformer.func is None):
            columns += [(position, None) for position in positions]
        elif isinstance(transformer, TargetEncoder) and transformer.target_type_ == "binary":
            for position, categories, encodings in zip(
                positions, transformer.categories_, transformer.encodings_, strict=True
            ):
                encoding = StationEncoding.from_fitted(
                    np.asarray(categories, dtype="float64"), encodings, transformer.target_mean_
                )
                columns.append((position, encoding))
        else:
            raise UnsupportedPipeline(f"no exact fast form for the column step {name!r}")
    return columns
