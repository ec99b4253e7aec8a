from pyspark.sql import SparkSession

spark = SparkSession.builder.getOrCreate()
spark.range(3).count()
raise RuntimeError("this batch fails on purpose")
