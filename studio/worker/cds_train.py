"""Training run for the driver class-data archive (see ``studio.livy.cds``).

``python -m studio.worker.cds_train MASTER CONF_REPR``: starts a driver with the given conf
(which holds ``-XX:ArchiveClassesAtExit``), runs what sessions typically run first, then stops
Spark and waits for the JVM to exit, which is when the JVM writes the archive.
"""

from __future__ import annotations

import ast
import sys
import tempfile

from studio.worker import lean


def main() -> int:
    master, conf_text = sys.argv[1], sys.argv[2]
    conf = ast.literal_eval(conf_text)
    lean.patch_numpy_converters()
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    builder = SparkSession.builder.master(master).appName("spark-studio-cds-training")
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    sc = spark.sparkContext
    sc.setLogLevel("WARN")
    assert sc._gateway is not None  # set once the context is up
    jvm = sc._gateway.proc
    spark.range(1).count()
    spark.sql("SELECT 1").collect()
    frame = spark.range(100_000).selectExpr("id", "id % 7 AS k", "CAST(id AS STRING) AS s", "id * 0.5 AS d")
    frame.groupBy("k").count().collect()
    frame.createOrReplaceTempView("t")
    spark.sql("SELECT k, max(s), avg(d) FROM t GROUP BY k ORDER BY k").collect()
    frame.join(frame.select(F.col("k").alias("kk")).distinct(), F.col("k") == F.col("kk")).count()
    frame.toJSON().take(5)
    with tempfile.TemporaryDirectory() as folder:
        frame.write.mode("overwrite").parquet(folder + "/t.parquet")
        spark.read.parquet(folder + "/t.parquet").filter("k = 3").count()
    sc.parallelize(range(100)).map(lambda x: x * 2).sum()
    spark.createDataFrame([(1, "a"), (2, "b")], ["x", "y"]).collect()
    sc.setJobGroup("g", "d", True)
    sc.cancelJobGroup("g")
    spark.conf.set("spark.sql.shuffle.partitions", "4")
    spark.stop()
    # The JVM leaves when its stdin closes; the archive is written as it exits.
    jvm.stdin.close()
    return jvm.wait()


if __name__ == "__main__":
    sys.exit(main())
