"""stagefs config and destroy: settings shown and changed after format (what matters asked for),
a mount taking the change; destroy refused while mounted or for another uuid, then deleting every
object and the metadata."""
import os
import time

import helpers
from helpers import USER, run_as
from test_fsck_gc import keys


def pytest_generate_tests(metafunc):
    if "kind" in metafunc.fixturenames:
        from conftest import VOLUME_KINDS
        metafunc.parametrize("kind", VOLUME_KINDS)


def test_config_shows_and_changes_settings_asking_before_what_matters(env, redis, moto, kind):
    # Mounts read the format record again every second here (STAGEFS_TRASH_INTERVAL; a minute
    # by default).
    os.environ["STAGEFS_TRASH_INTERVAL"] = "1"
    try:
        v = helpers.make_volume(env, kind, redis, moto, f"it-config-{kind}", trash_days=1)
    finally:
        del os.environ["STAGEFS_TRASH_INTERVAL"]
    run_as(USER, lambda: open(f"{v.mnt}/f", "wb").write(os.urandom(3 << 20)))
    p = env.stagefs("config", v.meta_url, user="root")
    assert "trash days:  1" in p.stdout and "capacity:    no limit" in p.stdout, p.stdout
    if kind == "redis-s3":
        assert "secret key:  (set, hidden)" in p.stdout
        assert not [l for l in p.stdout.splitlines() if l.startswith("secret") and moto.secret_key in l]
    p = env.stagefs("config", v.meta_url, "--trash-days", "7", "--capacity", "10G", user="root")
    assert "trash days 1 -> 7" in p.stderr, p.stderr
    assert "trash days:  7" in env.stagefs("config", v.meta_url, user="root").stdout
    # The mount shows the new capacity within a minute.
    helpers.wait_until(lambda: os.statvfs(v.mnt).f_blocks * os.statvfs(v.mnt).f_frsize == 10 << 30, 30, "df showing 10 GiB")
    # What matters is asked for: here without a terminal, refused unless --yes.
    for args in (["--trash-days", "0"], ["--capacity", "1M"]):
        p = env.stagefs("config", v.meta_url, *args, user="root", check=False)
        assert p.returncode == 2 and "add --yes" in p.stderr, p.stderr
    assert "trash days:  7" in env.stagefs("config", v.meta_url, user="root").stdout, "nothing changed"
    env.stagefs("config", v.meta_url, "--capacity", "1M", "--yes", user="root")
    helpers.wait_until(lambda: run_as(USER, lambda: _write_fails(f"{v.mnt}/g")), 30, "writes refused past the capacity")
    # A bucket that does not work is refused before anything is saved.
    p = env.stagefs("config", v.meta_url, "--bucket", "/nonexistent/x", "--storage", "file", "--yes", user="root", check=False)
    assert p.returncode == 1, p.stderr
    assert "/nonexistent/x" not in env.stagefs("config", v.meta_url, user="root").stdout
    v.umount(v.mnt)


def _write_fails(path):
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(2 << 20))
        os.unlink(path)
        return False
    except OSError:
        return True


def test_destroy_is_refused_while_mounted_or_for_another_uuid_then_deletes_everything(env, redis, moto, kind):
    v = helpers.make_volume(env, kind, redis, moto, f"it-destroy-{kind}", trash_days=0)
    for i in range(3):
        run_as(USER, lambda i=i: open(f"{v.mnt}/f{i}", "wb").write(os.urandom(100_000)))
    env.stagefs("backup", "now", v.meta_url, user="root")
    uuid = next(l.split()[1] for l in env.stagefs("status", v.meta_url, user="root").stdout.splitlines() if l.startswith("UUID:"))
    p = env.stagefs("destroy", v.meta_url, uuid, "--yes", user="root", check=False)
    assert p.returncode == 1 and "connected client" in p.stderr and "nothing deleted" in p.stderr, p.stderr
    v.umount(v.mnt)
    p = env.stagefs("destroy", v.meta_url, "00000000-0000-4000-8000-000000000000", "--yes", user="root", check=False)
    assert p.returncode == 1 and f"uuid {uuid}" in p.stderr, p.stderr
    assert keys(v, moto), "the blocks are still there"
    p = env.stagefs("destroy", v.meta_url, uuid, "--yes", user="root")
    assert "destroyed" in p.stderr, p.stderr
    assert not keys(v, moto)
    assert env.stagefs("backup", "list", "--bucket", v.fmt_args[v.fmt_args.index("--bucket") + 1], "--storage",
                       "file" if kind == "sqlite-local" else "s3", "--volume", v.name, user="root", check=False).stdout == ""
    p = env.stagefs("status", v.meta_url, user="root", check=False)
    assert p.returncode == 1 and "holds no StageFS volume" in p.stderr, p.stderr
