import os
import subprocess

import pytest

import helpers
from helpers import OTHER, USER


def pytest_addoption(parser):
    parser.addoption("--stagefs-bin", default=os.environ.get("STAGEFS_BIN", ".build/release/stagefs"))


@pytest.fixture(scope="session", autouse=True)
def host_setup():
    helpers.host_setup()


@pytest.fixture(scope="session")
def env(request):
    binary = os.path.abspath(request.config.getoption("--stagefs-bin"))
    assert os.path.exists(binary), f"build stagefs first: {binary} is missing"
    e = helpers.Env(binary)
    yield e
    e.cleanup()


@pytest.fixture(scope="session")
def redis(env):
    r = helpers.Redis(env.root)
    yield r
    r.stop()


@pytest.fixture(scope="session")
def moto():
    m = helpers.Moto()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def radosgw():
    g = helpers.Radosgw()
    yield g
    g.stop()


# Volume kinds the volume tests run on (STAGEFS_IT_VOLUMES, comma-separated, to pick some):
# SQLite with a local directory, Redis with S3.
VOLUME_KINDS = os.environ.get("STAGEFS_IT_VOLUMES", "sqlite-local,redis-s3").split(",")


@pytest.fixture(scope="module", params=VOLUME_KINDS)
def volume(request, env, redis, moto):
    v = helpers.make_volume(env, request.param, redis, moto, f"it-{request.param}-{request.module.__name__.replace('_', '-')}"[:60])
    yield v
    v.umount(v.mnt)


@pytest.fixture
def workdir(volume):
    """A fresh directory in the volume, owned by the test user, open to the second user."""
    name = f"w{os.urandom(4).hex()}"
    path = volume.path(name)
    helpers.run_as(USER, os.mkdir, path, 0o755)
    return path
