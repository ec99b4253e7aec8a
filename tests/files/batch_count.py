"""A PySpark batch application: counts a range and prints the result with its arguments."""

import sys

from pyspark.sql import SparkSession

import batch_helper

spark = SparkSession.builder.getOrCreate()
n = int(sys.argv[1])
print(f"BATCH RESULT {spark.range(n).count()} args={sys.argv[1:]} helper={batch_helper.NAME}", flush=True)
spark.stop()
