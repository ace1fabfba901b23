"""A real orchestrator on loopback (uvicorn in a thread, SQLite on disk) shared by the API tests."""

import time

import pytest

from hepopt.client import Client
from orchestrator.config import Settings
from orchestrator.server import EmbeddedServer

#: Small limits so the tests exercise them quickly.
CHECKPOINT_LIMIT = 1024
FAST = {"steering_interval": 0.1, "reaper_interval": 0.1, "retry_after": 0.05, "steering_backoff": 3600.0,
        "checkpoint_max_bytes": CHECKPOINT_LIMIT, "allow_steering_exec": True}
SPACE = {"x": {"method": "uniform", "dimension": {"low": 0, "high": 1}},
         "n": {"method": "categorical", "dimension": {"categories": [1, 2, 3, 4]}}}


def task_doc(**overrides):
    hepopt = {"method": "random", "seed": 7, **overrides.pop("hepopt", {})}
    return {"evaluationExec": "python train.py", "searchSpace": SPACE, "maxPoints": 4, "hepopt": hepopt, **overrides}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with EmbeddedServer(Settings(data_dir=tmp_path_factory.mktemp("orchestrator"), **FAST)) as srv:
        yield srv


@pytest.fixture(scope="module")
def alice(server):
    with Client(server.url, server.storage.create_token("alice"), retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def bob(server):
    with Client(server.url, server.storage.create_token("bob"), retries=0) as client:
        yield client


@pytest.fixture
def wait_for():
    def wait(predicate, timeout=10.0, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    return wait


@pytest.fixture
def make_task():
    return task_doc
