"""A PySpark batch that prints whom it runs as (tests/test_livy_access.py)."""

import os

from pyspark.sql import SparkSession

spark = SparkSession.builder.getOrCreate()
sc = spark.sparkContext
print(
    f"BATCH USER spark={sc.sparkUser()} env={os.environ.get('SPARK_USER')} hadoop={os.environ.get('HADOOP_USER_NAME')} "
    f"conf={sc.getConf().get('spark.studio.user', None)}",
    flush=True,
)
spark.stop()
