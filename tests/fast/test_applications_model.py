"""Applications without a JVM: definitions and their refusals, a driver shape's conf, what a session
asks beyond its application's shape, capacity arithmetic, state transitions, the declarations file."""

from __future__ import annotations

import asyncio
import json

import pytest

from studio.config import Settings
from studio.errors import ConflictError, InvalidRequestError, StudioError
from studio.livy import sparkconf
from studio.livy.applications import (
    TRANSITIONS,
    Application,
    ApplicationState,
    Applications,
    driver_conf,
    memory_mb,
    parse_definition,
    read_declarations,
)
from studio.livy.pool import WorkerPool
from studio.store import Store


def test_definitions_take_emr_fields_and_refuse_in_words():
    definition = parse_definition(
        {
            "name": "bigmem",
            "type": "Spark",
            "runtimeConfiguration": [{"classification": "spark-defaults", "properties": {"spark.sql.shuffle.partitions": 8}}],
            "driverConfiguration": {"driverCores": 2, "jars": ["/opt/a.jar"], "conf": {"spark.jars.packages": "x:y:1"}},
            "initialCapacity": {"driver": {"workerCount": 2, "workerConfiguration": {"cpu": "2vCPU", "memory": "4GB"}}},
            "clientToken": "ignored",
        }
    )
    assert driver_conf(definition) == {
        "spark.sql.shuffle.partitions": "8",
        "spark.driver.memory": "4096m",
        "spark.driver.cores": "2",
        "spark.jars": "/opt/a.jar",
        "spark.jars.packages": "x:y:1",
    }
    for body, words in [
        ({"name": "../x"}, "application name"),
        ({"name": "a", "type": "HIVE"}, "only SPARK"),
        ({"name": "a", "initialCapacity": {"EXECUTOR": {"workerCount": 1}}}, "only DRIVER"),
        ({"name": "a", "runtimeConfiguration": [{"classification": "spark-env", "properties": {}}]}, "spark-defaults"),
        ({"name": "a", "runtimeConfiguration": [{"classification": "spark-defaults", "properties": {"spark.master": "x"}}]}, "spark.master"),
        ({"name": "a", "driverConfiguration": {"proxyUser": "bob"}}, "proxyUser"),
        ({"name": "a", "driverConfiguration": {"conf": {"spark.submit.deployMode": "cluster"}}}, "deployMode"),
        ({"name": "a", "maximumCapacity": {"memory": "lots"}}, "maximumCapacity.memory"),
        ({"name": "a", "autoStopConfiguration": {"idleTimeoutMinutes": 0}}, "idleTimeoutMinutes"),
        ({"name": "a", "unknown": 1}, "unknown"),
        ([], "JSON object"),
    ]:
        with pytest.raises(InvalidRequestError) as refused:
            parse_definition(body)
        assert words in refused.value.msg, (body, refused.value.msg)


def test_what_a_session_asks_beyond_its_shape():
    shape = {"spark.driver.memory": "2g", "spark.jars": "/a.jar,/b.jar", "spark.sql.shuffle.partitions": "8"}
    assert sparkconf.beyond_shape({"spark.driver.memory": "2048m", "spark.jars": "/b.jar, /a.jar"}, shape) == {}
    assert sparkconf.beyond_shape({"spark.driver.memory": "3g", "spark.sql.shuffle.partitions": "4"}, shape) == {
        "spark.driver.memory": "3g",
        "spark.sql.shuffle.partitions": "4",
    }
    assert memory_mb("4GB", "x") == 4096 and memory_mb("512m", "x") == 512 and memory_mb(1024, "x") == 1024
    # Layers: the session over its application over the base; JVM options add up.
    merged = sparkconf.overlay(
        {"spark.driver.extraJavaOptions": "-Da=1", "k": "base"}, {"k": "app"}, {"spark.driver.extraJavaOptions": "-Db=2"}
    )
    assert merged["k"] == "app" and "-Da=1" in merged["spark.driver.extraJavaOptions"] and "-Db=2" in merged["spark.driver.extraJavaOptions"]


def test_states_follow_emr():
    allowed = {(old, new) for new, olds in TRANSITIONS.items() for old in olds}
    S = ApplicationState
    assert (S.CREATED, S.STARTING) in allowed and (S.STOPPED, S.STARTING) in allowed and (S.STARTED, S.STOPPING) in allowed
    assert (S.STARTED, S.TERMINATED) not in allowed and (S.TERMINATED, S.STARTING) not in allowed


def _registry(tmp_path) -> Applications:
    settings = Settings(state_dir=tmp_path, pool_size=0, max_sessions=4)
    store = Store(tmp_path / "studio.db")

    def new_pool(app: Application) -> WorkerPool:
        return WorkerPool(settings, lambda: None, size=app.initial_capacity, name=app.name)  # type: ignore[arg-type,return-value]

    return Applications(settings, store, new_pool)


def test_capacity_counts_sessions_runs_and_warm_drivers(tmp_path):
    async def scenario():
        apps = _registry(tmp_path)
        app = await apps.create({"name": "small", "maximumCapacity": {"drivers": 2, "memory": "3g", "cpu": "3vCPU"}})
        assert app.state is ApplicationState.CREATED and app.is_idle()
        sessions: list[tuple[int, float]] = []
        apps.session_usage = lambda a: sessions if a is app else []
        assert app.room_for(1024, 1) is None
        sessions.append((2048, 1.0))
        assert "2048 MB of its maximum 3072 MB" in (app.room_for(2048, 1) or "")
        app.running_jobs = 1
        assert "2 of its maximum 2 drivers" in (app.room_for(512, 1) or "")
        assert not app.is_idle()
        with pytest.raises(StudioError):
            apps.admit_session(app, 512, 1, warm=False)
        # A stop is refused while work is live (it would lose it); update and delete need it stopped.
        app.state = ApplicationState.STARTED
        with pytest.raises(ConflictError):
            await apps.stop("small")
        with pytest.raises(ConflictError):
            await apps.update("small", {"tags": {"a": "b"}})
        with pytest.raises(ConflictError):
            await apps.delete("small")

    asyncio.run(scenario())


def test_applications_survive_a_restart_of_the_registry(tmp_path):
    async def first():
        apps = _registry(tmp_path)
        created = await apps.create({"name": "kept", "tags": {"team": "x"}})
        return created.id, apps.default.id

    kept_id, default_id = asyncio.run(first())

    async def second():
        apps = _registry(tmp_path)
        assert apps.default.id == default_id and apps.get("kept").id == kept_id
        assert apps.get(kept_id).definition.tags == {"team": "x"}
        assert apps.get("kept").state is ApplicationState.CREATED

    asyncio.run(second())


def test_the_declarations_file(tmp_path):
    toml = tmp_path / "apps.toml"
    toml.write_text('[[applications]]\nname = "a"\n[applications.driverConfiguration]\ndriverMemory = "2g"\n')
    assert [d.name for d in read_declarations(toml)] == ["a"]
    listed = tmp_path / "apps.json"
    listed.write_text(json.dumps([{"name": "a"}, {"name": "a"}]))
    with pytest.raises(StudioError, match="share a name"):
        read_declarations(listed)
    listed.write_text(json.dumps({"applications": [{"name": "b", "driverConfiguration": {"driverMemory": "x"}}]}))
    with pytest.raises(StudioError, match="application 1"):
        read_declarations(listed)
