"""The third-party `livy` client from PyPI (acroz/pylivy), unchanged, against the service: it
authenticates with HTTP Basic (``auth=(user, token)``), and is refused without it."""

from __future__ import annotations

import pandas as pd
import pytest
import requests
from livy import LivyBatch, LivySession, SessionKind, SessionState

from conftest import shared_service
from helpers import REPO

FILES = REPO / "tests" / "files"


@pytest.fixture(scope="module")
def service(warm_service):
    yield from shared_service(warm_service, ready=2)  # both sessions tests take a warm worker; neither waits for a refill


def auth(service):
    return ("analyst", service.token)  # the user name is free until there are users; the token is the password


def test_without_credentials_the_client_is_refused(service):
    with pytest.raises(requests.HTTPError) as refused:
        LivySession.create(service.url, kind=SessionKind.PYSPARK)
    assert refused.value.response.status_code == 401
    with pytest.raises(requests.HTTPError) as wrong:
        LivySession.create(service.url, auth=("analyst", "not-the-token"), kind=SessionKind.PYSPARK)
    assert wrong.value.response.status_code == 401


def test_pyspark_session_run_download_upload(service):
    with LivySession.create(service.url, auth=auth(service), kind=SessionKind.PYSPARK) as session:
        output = session.run("spark.range(3).count()")
        assert output.text == "3"
        session.run("df = spark.createDataFrame([(1, 'a', 0.5), (2, 'b', 1.5)], ['n', 'letter', 'x'])")
        downloaded = session.download("df")
        assert downloaded.to_dict("records") == [
            {"n": 1, "letter": "a", "x": 0.5},
            {"n": 2, "letter": "b", "x": 1.5},
        ]
        local = pd.DataFrame({"city": ["Oslo", "Lima"], "people": [700000, 10000000]})
        session.upload("cities", local)
        assert session.run("cities.orderBy('city').first().city").text == "'Lima'"
        with pytest.raises(Exception) as failure:
            session.run("undefined_name_here")
        assert "NameError" in repr(failure.value)
        assert session.state == SessionState.IDLE


def test_sql_session_download_sql(service):
    with LivySession.create(service.url, auth=auth(service), kind=SessionKind.SQL) as session:
        frame = session.download_sql("SELECT id, id * 2 AS twice FROM range(4)")
        assert list(frame.columns) == ["id", "twice"]
        assert frame["twice"].tolist() == [0, 2, 4, 6]


def test_batch(service):
    batch = LivyBatch.create(
        service.url,
        auth=auth(service),
        file=str(FILES / "batch_count.py"),
        args=["42"],
        py_files=[str(FILES / "batch_helper.py")],
    )
    assert batch.wait() == SessionState.SUCCESS
    assert any("BATCH RESULT 42" in line for line in batch.log(size=-1))
