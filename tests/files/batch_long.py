import time

from pyspark.sql import SparkSession

spark = SparkSession.builder.getOrCreate()
print("LONG BATCH STARTED", flush=True)
spark.sparkContext.parallelize(range(2), 2).foreach(lambda x: time.sleep(600))
