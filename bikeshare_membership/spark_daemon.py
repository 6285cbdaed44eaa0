"""Spark's Python daemon for the scoring job (`spark.python.daemon.module`): pyspark's own daemon, with the modules
the job's workers run imported first (the file readers and the fast form: not MLflow nor scikit-learn, which a
worker imports only for a version without a saved fast form), so that each worker Spark forks from it starts
with them."""

from pyspark import daemon

import bikeshare_membership.spark_scoring  # noqa: F401

if __name__ == "__main__":
    daemon.manager()
