"""Spark scoring's entry point: `python spark_score.py INPUT ... --output DIR`, or the file spark-submit runs
(see bikeshare_membership/spark_cli.py and docs/spark.md)."""

import sys

from bikeshare_membership.spark_cli import main

if __name__ == "__main__":
    sys.exit(main())
