import os
import subprocess

import pytest

import helpers
from helpers import OTHER, USER


def pytest_addoption(parser):
    parser.addoption("--stagefs-bin", default=os.environ.get("STAGEFS_BIN", ".build/release/stagefs"))


@pytest.fixture(scope="session", autouse=True)
def host_setup():
    """What a normal host has: /dev/fuse usable by all, user_allow_other, and the test users."""
    os.chmod("/dev/fuse", 0o666)
    conf = "/etc/fuse.conf"
    text = open(conf).read() if os.path.exists(conf) else ""
    if not any(line.strip() == "user_allow_other" for line in text.splitlines()):
        with open(conf, "a") as f:
            f.write("\nuser_allow_other\n")
    helpers.ensure_user(USER)
    helpers.ensure_user(OTHER)


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


class Volume:
    """A formatted and mounted volume, mounted by the unprivileged test user."""

    def __init__(self, env, kind, meta_url, fmt_args, name):
        self.env, self.kind, self.meta_url, self.name = env, kind, meta_url, name
        self.base = env.dir_for(USER, kind)
        self.fmt_args = fmt_args
        env.stagefs("format", meta_url, name, *fmt_args)
        self.mnt = self.mount()

    def mount(self, *extra):
        mnt = self.env.dir_for(USER, f"mnt-{self.kind}")
        self.env.stagefs("mount", "-d", self.meta_url, mnt, "-o", "allow_other", "--log", os.path.join(self.base, "mount.log"), *extra)
        assert helpers.is_mounted(mnt)
        return mnt

    def umount(self, mnt):
        if helpers.is_mounted(mnt):
            self.env.stagefs("umount", mnt)

    def path(self, *parts):
        return os.path.join(self.mnt, *parts)


def make_volume(env, kind, redis, moto, name):
    if kind == "sqlite-local":
        base = env.dir_for(USER, "vol")
        return Volume(env, kind, f"sqlite3://{base}/meta.db", ["--bucket", f"{base}/data"], name)
    db = make_volume.next_db = getattr(make_volume, "next_db", 0) + 1
    return Volume(env, kind, redis.url(db), ["--storage", "s3", "--bucket", moto.bucket(f"{name}-bucket"),
                                            "--access-key", moto.access_key, "--secret-key", moto.secret_key], name)


@pytest.fixture(scope="module", params=["sqlite-local", "redis-s3"])
def volume(request, env, redis, moto):
    v = make_volume(env, request.param, redis, moto, f"it-{request.param}-{request.module.__name__.replace('_', '-')}"[:60])
    yield v
    v.umount(v.mnt)


@pytest.fixture
def workdir(volume):
    """A fresh directory in the volume, owned by the test user, open to the second user."""
    name = f"w{os.urandom(4).hex()}"
    path = volume.path(name)
    helpers.run_as(USER, os.mkdir, path, 0o755)
    return path
