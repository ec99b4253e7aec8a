"""The user a worker's driver runs as (its session's Spark user, ``studio.livy.access``).

A cold worker gets it before its JVM starts: ``SPARK_USER`` and ``HADOOP_USER_NAME`` in its
environment, ``spark.studio.user`` in its conf, and Spark takes it from there. A warm worker of
the pool was started before anyone asked for it, and Spark fixes ``SparkContext.sparkUser`` when
the context is made, so ``become`` sets what reads the user afterwards, in the running driver:

* this process's ``SPARK_USER`` and ``HADOOP_USER_NAME`` (Python workers and child processes);
* Hadoop's login user (``UserGroupInformation.setLoginUser(createRemoteUser(user))``): what
  ``Utils.getCurrentUserName`` and Hadoop file systems read;
* ``SparkContext.sparkUser`` (a Scala ``val``: its field, set through Java reflection) and the
  ``SPARK_USER`` of executors launched from now on;
* the Spark UI's "User" (the jobs page, ``/api/v1/applications``), which comes from the
  application-start event: the same event is posted again with the new user (the status store
  rewrites the application's record from it and nothing else listens to it twice);
* ``spark.studio.user`` in the context's and the session's conf, with the UI's Environment tab
  brought up to date.

None of it is a shell string; the name is checked again here (``USER_NAME``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

USER_NAME = re.compile(r"^[a-z_][a-z0-9._-]{0,63}$")  # as studio.livy.access.USER_NAME
USER_CONF = "spark.studio.user"


def become(spark: Any, user: str, log: Callable[[str], None]) -> None:
    """Make ``user`` the Spark user of this driver (see the module docstring). Raises when an
    essential part cannot be set (the worker must not serve the session half as someone else)."""
    if not USER_NAME.fullmatch(user):
        raise ValueError(f"not a user name: {user[:80]!r}")
    sc = spark.sparkContext
    jvm = sc._jvm
    context = sc._jsc.sc()
    os.environ["SPARK_USER"] = user
    os.environ["HADOOP_USER_NAME"] = user
    ugi = jvm.org.apache.hadoop.security.UserGroupInformation
    ugi.setLoginUser(ugi.createRemoteUser(user))
    field = context.getClass().getDeclaredField("sparkUser")
    field.setAccessible(True)
    field.set(context, user)
    if context.sparkUser() != user:
        raise RuntimeError(f"SparkContext.sparkUser is still {context.sparkUser()!r}")
    context.conf().set(USER_CONF, user)
    spark.conf.set(USER_CONF, user)
    for name, step in (("executors' SPARK_USER", _executor_env), ("the Spark UI's user", _post_start), ("the Spark UI's environment", _post_environment)):
        try:
            step(jvm, context, user)
        except Exception as exc:  # noqa: BLE001 - what the UI shows must not keep the session from starting
            log(f"could not set {name} to {user}: {type(exc).__name__}: {exc}")


def _executor_env(jvm: Any, context: Any, user: str) -> None:
    context.executorEnvs().put("SPARK_USER", user)


def _post_start(jvm: Any, context: Any, user: str) -> None:
    option = jvm.scala.Option
    event = jvm.org.apache.spark.scheduler.SparkListenerApplicationStart(
        context.appName(),
        option.apply(context.applicationId()),
        context.startTime(),
        user,
        context.applicationAttemptId(),
        option.empty(),  # driver logs: None leaves the driver's entry as it is
        option.empty(),
    )
    context.listenerBus().post(event)


def _post_environment(jvm: Any, context: Any, user: str) -> None:
    method = context.getClass().getDeclaredMethod("postEnvironmentUpdate", None)
    method.setAccessible(True)
    method.invoke(context, None)
