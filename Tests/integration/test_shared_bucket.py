"""A `file` bucket shared by several users (a directory on NFS/Lustre/GPFS): `format
--bucket-group` sets it up, two ordinary users write, rewrite and delete each other's files in
one volume, and a mount that could not write is refused with what to run."""
import grp
import hashlib
import os
import pwd
import subprocess

import helpers
from helpers import OTHER, SHARED_GROUP, USER, run_as, wait_until


def objects(bucket):
    return {os.path.join(d, f) for d, _, fs in os.walk(bucket) for f in fs if "_" in f}


def mount_with_umask(env, user, url, mnt, log, umask="077"):
    """`stagefs mount -d` as `user` under a strict umask, as a careful user has."""
    p = subprocess.run(["runuser", "-u", user, "--", "sh", "-c",
                        f"umask {umask}; exec {env.bin} mount -d {url} {mnt} --log {log} --cache-size 0"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert helpers.is_mounted(mnt)


# (The volumes here keep no trash: the tests see old objects deleted by the other user's mount.)
def test_two_users_write_one_volume_on_a_shared_file_bucket(env, redis):
    url = redis.url(redis.new_db())
    bucket = os.path.join(env.dir_for("root", "shared"), "bucket")
    p = env.stagefs("format", url, "sharedb", "--bucket", bucket, "--bucket-group", SHARED_GROUP, "--trash-days", "0", user="root")
    assert f"shared by group {SHARED_GROUP} (mode 2770)" in p.stdout, p.stdout
    st = os.stat(bucket)
    assert st.st_uid == 0 and grp.getgrgid(st.st_gid).gr_name == SHARED_GROUP and st.st_mode & 0o7777 == 0o2770
    logs = env.dir_for("root", "logs")
    os.chmod(logs, 0o1777)
    m1, m2 = env.dir_for(USER, "m1"), env.dir_for(OTHER, "m2")
    mount_with_umask(env, USER, url, m1, os.path.join(logs, "1.log"))
    mount_with_umask(env, OTHER, url, m2, os.path.join(logs, "2.log"))
    try:
        a1 = os.urandom(6 << 20)
        run_as(USER, os.mkdir, os.path.join(m1, "team"))
        run_as(USER, os.chmod, os.path.join(m1, "team"), 0o777)
        run_as(USER, lambda: open(os.path.join(m1, "team", "a"), "wb").write(a1))
        before = objects(bucket)
        assert before, "the first user's data is in the bucket"
        # The second user writes a file of their own, rewrites the first user's file (its old
        # objects are deleted by the second user's mount) and reads what the first one wrote.
        b = os.urandom(5 << 20)
        run_as(OTHER, lambda: open(os.path.join(m2, "team", "b"), "wb").write(b))
        a2 = os.urandom(3 << 20)

        def rewrite():
            with open(os.path.join(m2, "team", "a"), "wb") as f:
                f.write(a2)
        run_as(USER, os.chmod, os.path.join(m1, "team", "a"), 0o666)
        run_as(OTHER, rewrite)
        wait_until(lambda: not (before & objects(bucket)), 60, "the second user's mount to delete the first user's old objects")
        assert run_as(USER, lambda: hashlib.sha256(open(os.path.join(m1, "team", "b"), "rb").read()).digest()) == hashlib.sha256(b).digest()
        assert run_as(OTHER, lambda: open(os.path.join(m2, "team", "a"), "rb").read()) == a2
        run_as(USER, os.unlink, os.path.join(m1, "team", "b"))
        # Every directory and object belongs to the group, group-writable or -readable.
        for d, dirs, files in os.walk(bucket):
            for n in dirs:
                s = os.stat(os.path.join(d, n))
                assert grp.getgrgid(s.st_gid).gr_name == SHARED_GROUP and s.st_mode & 0o2070 == 0o2070, (d, n, oct(s.st_mode))
            for n in files:
                s = os.stat(os.path.join(d, n))
                assert grp.getgrgid(s.st_gid).gr_name == SHARED_GROUP and s.st_mode & 0o040, (d, n, oct(s.st_mode))
    finally:
        for m, u in ((m1, USER), (m2, OTHER)):
            env.stagefs("umount", m, user=u, check=False)
    for log in ("1.log", "2.log"):
        text = open(os.path.join(logs, log)).read()
        assert "Permission denied" not in text and "EIO" not in text, text


def test_a_bucket_written_before_it_was_shared_is_refused_then_repaired(env, redis):
    """The issue's case: the first user's writes made directories only they can write; the second
    user's mount is refused with what to run; `format --bucket-group` as root repairs it."""
    url = redis.url(redis.new_db())
    bucket = os.path.join(env.dir_for(USER, "private"), "bucket")
    env.stagefs("format", url, "unshared", "--bucket", bucket, "--trash-days", "0")
    m1, m2 = env.dir_for(USER, "m1"), env.dir_for(OTHER, "m2")
    env.stagefs("mount", "-d", url, m1, "--cache-size", "0")
    try:
        run_as(USER, lambda: open(os.path.join(m1, "a"), "wb").write(os.urandom(1 << 20)))
        run_as(USER, os.chmod, os.path.join(m1, "a"), 0o666)
    finally:
        env.stagefs("umount", m1)
    os.chmod(os.path.dirname(bucket), 0o755)
    p = env.stagefs("mount", "-d", url, m2, "--cache-size", "0", user=OTHER, check=False)
    assert p.returncode == 1 and not helpers.is_mounted(m2), p.stderr
    assert f"{bucket} is not writable by uid {pwd.getpwnam(OTHER).pw_uid}" in p.stderr, p.stderr
    assert "--bucket-group" in p.stderr and "-o ro" in p.stderr, p.stderr
    # Reading only is fine.
    env.stagefs("mount", "-d", url, m2, "--cache-size", "0", "-o", "ro", user=OTHER)
    try:
        assert len(run_as(OTHER, lambda: open(os.path.join(m2, "a"), "rb").read())) == 1 << 20
    finally:
        env.stagefs("umount", m2, user=OTHER)
    # A planted link in the bucket is not followed by root's repair.
    victim = env.dir_for("root", "victim")
    os.chmod(victim, 0o700)
    run_as(USER, os.symlink, victim, os.path.join(bucket, "unshared", "link"))
    p = env.stagefs("format", url, "unshared", "--bucket", bucket, "--bucket-group", SHARED_GROUP, "--trash-days", "0", user="root")
    assert "entries given to the group" in p.stdout
    vs = os.stat(victim)
    assert vs.st_gid == 0 and vs.st_mode & 0o7777 == 0o700, "the link's target was left alone"
    env.stagefs("mount", "-d", url, m2, "--cache-size", "0", user=OTHER)
    try:
        before = objects(bucket)
        run_as(OTHER, lambda: open(os.path.join(m2, "a"), "wb").write(b"rewritten by the second user\n"))
        wait_until(lambda: not (before & objects(bucket)), 60, "the old objects of the first user to be deleted")
    finally:
        env.stagefs("umount", m2, user=OTHER)


def test_root_format_without_a_group_says_how_to_share(env, redis):
    url = redis.url(redis.new_db())
    bucket = os.path.join(env.dir_for("root", "rootonly"), "bucket")
    p = env.stagefs("format", url, "rootonly", "--bucket", bucket, user="root")
    assert "only root can write this volume's data" in p.stderr and "--bucket-group GROUP" in p.stderr, p.stderr
    p = env.stagefs("format", url, "rootonly", "--bucket", bucket, "--bucket-group", "no-such-group-x", user="root", check=False)
    assert p.returncode == 1 and "no such group 'no-such-group-x'" in p.stderr, p.stderr


def test_a_user_outside_the_group_is_refused_even_read_only(env, redis):
    """A non-member can read no block of a 2770 bucket: the mount is refused, -o ro included,
    and the message does not suggest -o ro."""
    outsider = "stagefs-nogroup"
    helpers.ensure_user(outsider)
    url = redis.url(redis.new_db())
    bucket = os.path.join(env.dir_for("root", "members"), "bucket")
    env.stagefs("format", url, "members", "--bucket", bucket, "--bucket-group", SHARED_GROUP, user="root")
    m = env.dir_for(outsider, "m")
    for extra in ([], ["-o", "ro"]):
        p = env.stagefs("mount", "-d", url, m, "--cache-size", "0", *extra, user=outsider, check=False)
        assert p.returncode == 1 and not helpers.is_mounted(m), p.stderr
        assert f"{bucket} is not readable by uid {pwd.getpwnam(outsider).pw_uid}" in p.stderr, p.stderr
        assert f"is not in the bucket's group {SHARED_GROUP}: ask to be added" in p.stderr and "-o ro" not in p.stderr, p.stderr


def test_format_refuses_a_bucket_whose_parent_is_missing(env, redis):
    """A bucket on a shared file system that is not mounted here must not land on local disk."""
    missing = os.path.join(env.root, "not-mounted", "stagefs", "bucket")
    p = env.stagefs("format", redis.url(redis.new_db()), "nomount", "--bucket", missing, user="root", check=False)
    assert p.returncode == 1 and "does not exist: is its file system mounted on this node?" in p.stderr, p.stderr
    assert not os.path.exists(os.path.dirname(missing))


def test_a_member_cannot_make_root_s_mount_read_through_a_planted_link(env, redis):
    """A node-wide mount by root of a volume on a shared bucket, entered by users (allow_other).
    A member of the bucket's group replaces the object of their own file with a link to a root
    0600 file, and a chunk directory with a link to a root directory: reading the file through
    root's mount fails with EIO instead of handing over root's file, and root's writes never
    land in the linked directory."""
    url = redis.url(redis.new_db())
    bucket = os.path.join(env.dir_for("root", "sharedlink"), "bucket")
    env.stagefs("format", url, "sharedlink", "--bucket", bucket, "--bucket-group", SHARED_GROUP, user="root")
    secret_dir = env.dir_for("root", "rootonly")
    os.chmod(secret_dir, 0o700)
    secret = os.path.join(secret_dir, "shadow")
    with open(secret, "w") as f:
        f.write("root-secret-line\n" * 64)
    os.chmod(secret, 0o600)
    logs = env.dir_for("root", "linklogs")
    os.chmod(logs, 0o1777)
    mine = env.dir_for(USER, "mine")
    mount_with_umask(env, USER, url, mine, os.path.join(logs, "u.log"))
    root_mnt = env.dir_for("root", "rootmnt")
    p = env.stagefs("mount", "-d", url, root_mnt, "-o", "allow_other", "--cache-size", "0", "--memory-cache-size", "0",
                    "--log", os.path.join(logs, "root.log"), user="root", check=False)
    assert p.returncode == 0, p.stderr
    try:
        run_as(USER, lambda: open(os.path.join(mine, "f"), "wb").write(b"m" * 1000))
        (obj,) = objects(bucket)
        run_as(USER, os.unlink, obj)
        run_as(USER, os.symlink, secret, obj)

        def read_through_root():
            try:
                return open(os.path.join(root_mnt, "f"), "rb").read()
            except OSError as e:
                return e.errno
        got = run_as(USER, read_through_root)
        assert not (isinstance(got, bytes) and b"root-secret" in got), "root's mount read the planted link's target"
        assert got == 5, got  # EIO
        # A chunk directory of the next slices replaced by a link to root's directory.
        chunks = os.path.join(bucket, "sharedlink", "chunks")
        for top in os.listdir(chunks):
            run_as(USER, subprocess.run, ["rm", "-rf", os.path.join(chunks, top)], check=True)
        for top in range(0, 64):
            run_as(USER, os.symlink, secret_dir, os.path.join(chunks, str(top)))
        data = os.urandom(1 << 20)
        try:
            run_as(USER, lambda: open(os.path.join(root_mnt, "g"), "wb").write(data))
        except OSError:
            pass
        assert os.listdir(secret_dir) == ["shadow"], os.listdir(secret_dir)
        assert open(secret).read() == "root-secret-line\n" * 64
    finally:
        for m in (root_mnt, mine):
            if helpers.is_mounted(m):
                env.stagefs("umount", m, "--force", user="root" if m == root_mnt else USER, check=False)


def test_a_write_waits_for_a_directory_another_member_is_opening_up(env, redis):
    """Another member's mount has just made a chunk directory under umask 077 and not yet opened
    it up to the group: a write that needs to pass through it waits the moment and succeeds."""
    import threading
    url = redis.url(redis.new_db())
    bucket = os.path.join(env.dir_for("root", "sharedwait"), "bucket")
    env.stagefs("format", url, "sharedwait", "--bucket", bucket, "--bucket-group", SHARED_GROUP, user="root")
    logs = env.dir_for("root", "waitlogs")
    os.chmod(logs, 0o1777)
    m2 = env.dir_for(OTHER, "wait-m2")
    mount_with_umask(env, OTHER, url, m2, os.path.join(logs, "2.log"))
    try:
        chunks = os.path.join(bucket, "sharedwait", "chunks")
        top = os.path.join(chunks, "0")
        run_as(USER, lambda: (os.makedirs(chunks, exist_ok=True), os.mkdir(top), os.chmod(top, 0o2700)))
        opener = threading.Timer(0.3, lambda: run_as(USER, os.chmod, top, 0o2770))
        opener.start()
        data = os.urandom(5000)
        run_as(OTHER, lambda: open(os.path.join(m2, "w"), "wb").write(data))
        opener.join()
        assert run_as(OTHER, lambda: open(os.path.join(m2, "w"), "rb").read()) == data
    finally:
        if helpers.is_mounted(m2):
            env.stagefs("umount", m2, "--force", user=OTHER, check=False)
