"""bikeshare-membership: whether a Toronto Bike Share trip was taken by an annual Member or a Casual rider.

Modules, each with one job, by what they are for (docs/architecture.md orders them by level: a module imports
only modules of lower levels, so imports point one way and tests/test_architecture.py keeps it so):

- contract: `schema` (the request schema, its validation, timestamps), `stations` (the station reference),
  `city_files` (the City's file layouts, read in chunks), `features` (the model's features, defined once),
  `feature_step` (`TripFeatures`, the pipeline's first step);
- model: `fast_pipeline` (the exact fast evaluation), `pipeline_reader` (a fitted pipeline read into it),
  `model_files` (a cached version's manifest and saved fast form), `registry` (which version is in Production),
  `model_store` (fetching into the verified cache, loading), `model_holder` (hot reload), `shadow` (the challenger
  scored beside the served model), `evaluation` (metrics and figures), `drift` (feature profiles);
- work: `training` (candidates, time-ordered evaluation), `promotion` (the gate), `registration` (the MLflow
  run, the registry), `batch_scoring`, `batch_jobs`, `watch`, `monitoring` (scoring a labelled file),
  `live_monitoring` (the prediction log against a labelled file), `spark_scoring` (the same scoring as a
  Spark job, for files of any size);
- service: `errors` (the one refusal type), `openapi` (the API document), `app` (the Flask app);
- observability: `jsonlog`, `metrics`, `metrics_archive` (exited workers' values), `recorder`, `prediction_log`
  (every answered trip, as Parquet);
- shared by all: `config` (settings from the environment), `storage` (local paths and S3, atomic writes);
- command lines: `train_cli`, `batch_cli`, `wait_cli`, `spark_cli`, behind the root scripts train.py, batch.py,
  wait_for_model.py and spark_score.py.

One module lives outside the package: the root `preprocess.py`, which keeps the name every registered
model gives its feature step, `preprocess.TripFeatures`.
"""
