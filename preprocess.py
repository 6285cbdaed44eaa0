"""The name registered models give their feature step: `preprocess.TripFeatures`.

Every pipeline in the registry was saved (skops, with `code_paths`) naming `preprocess.TripFeatures`, so this
module stays importable with that class in it. The definitions live in the package: the request schema in
`bikeshare_membership.schema`, the City's files in `bikeshare_membership.city_files`, the features in
`bikeshare_membership.features` and this step in `bikeshare_membership.feature_step`. A pipeline pickled
before the features were chosen per model still loads: `TripFeatures.__setstate__` gives it the ten features
it used.
"""

from bikeshare_membership.feature_step import TripFeatures

__all__ = ["TripFeatures"]
