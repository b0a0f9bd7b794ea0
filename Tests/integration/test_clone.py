"""Clones and copy_file_range through real mounts, as ordinary users: a clone of a 100 MiB file,
and a cp of one, add no object to the bucket; writes to either side change only that side;
deleting both removes every object exactly once; a tree clones whole, and an interrupted clone
leaves nothing; permissions are the caller's."""
import hashlib
import os
import signal
import subprocess
import time

import pytest

import helpers
from helpers import USER, run_as, wait_until

MiB = 1 << 20


@pytest.fixture(scope="module")
def cvol(env, redis, moto, request):
    v = helpers.make_volume(env, request.param, redis, moto, f"it-clone-{request.param}", trash_days=0)
    v.moto = moto
    yield v
    v.umount(v.mnt)


def pytest_generate_tests(metafunc):
    if "cvol" in metafunc.fixturenames:
        from conftest import VOLUME_KINDS
        metafunc.parametrize("cvol", VOLUME_KINDS, indirect=True, scope="module")


def object_keys(v):
    """The block keys of the volume's bucket, as the bucket lists them."""
    return {k for k in helpers.volume_keys(v, v.moto) if "_" in k.rsplit("/", 1)[-1]}


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def clone(v, *args, user=USER, check=True):
    return v.env.stagefs("clone", *args, user=user, check=check)


def udir(v, name):
    path = v.path(name)
    run_as(USER, os.mkdir, path, 0o755)
    return path


def test_a_clone_of_100_mib_stores_nothing_diverges_and_frees_each_object_once(cvol):
    d = udir(cvol, "big")
    src, dst = os.path.join(d, "model.bin"), os.path.join(d, "model-copy.bin")
    payload = os.urandom(100 * MiB)
    empty = object_keys(cvol)
    run_as(USER, lambda: open(src, "wb").write(payload))
    before = object_keys(cvol)
    assert len(before - empty) >= 25, "the source's 100 MiB are in the bucket"
    p = clone(cvol, src, dst)
    assert "1 file(s)" in p.stderr and "100.0 MiB shared" in p.stderr, p.stderr
    assert object_keys(cvol) == before, "a clone stores no object"
    assert run_as(USER, sha, dst) == hashlib.sha256(payload).hexdigest()
    st = os.stat(dst)
    assert st.st_size == 100 * MiB and st.st_uid == os.stat(src).st_uid and st.st_ino != os.stat(src).st_ino

    # Writes to either side change that side only.
    def diverge():
        with open(dst, "r+b") as f:
            f.seek(5 * MiB)
            f.write(b"clone side")
        with open(src, "r+b") as f:
            f.seek(50 * MiB)
            f.write(b"source side")
        return sha(src), sha(dst)
    s, c = run_as(USER, diverge)
    want_src = bytearray(payload)
    want_src[50 * MiB:50 * MiB + 11] = b"source side"
    want_dst = bytearray(payload)
    want_dst[5 * MiB:5 * MiB + 10] = b"clone side"
    assert (s, c) == (hashlib.sha256(want_src).hexdigest(), hashlib.sha256(want_dst).hexdigest())
    # Deleting one side keeps every object the other reads; deleting both removes them all.
    written = object_keys(cvol)
    run_as(USER, os.unlink, src)
    wait_until(lambda: len(object_keys(cvol)) == len(written) - 1, 30, "the source's own new object to go")
    assert run_as(USER, sha, dst) == hashlib.sha256(want_dst).hexdigest()
    run_as(USER, os.unlink, dst)
    # Nothing leaks: the bucket is as it was before the source was written.
    wait_until(lambda: object_keys(cvol) == empty, 30, "every object of the two files to go")


def test_cp_on_the_mount_adds_no_object(cvol):
    d = udir(cvol, "cp")
    src = os.path.join(d, "a")
    run_as(USER, lambda: open(src, "wb").write(os.urandom(20 * MiB + 12345)))
    before = object_keys(cvol)
    t = time.monotonic()
    subprocess.run(["runuser", "-u", USER, "--", "cp", src, os.path.join(d, "b")], check=True)
    took = time.monotonic() - t
    assert object_keys(cvol) == before
    assert run_as(USER, sha, os.path.join(d, "b")) == run_as(USER, sha, src)
    print(f"cp of 20 MiB on the mount: {took * 1000:.0f} ms, no object stored")


def test_a_tree_clones_whole_and_permissions_are_the_callers(cvol):
    top = udir(cvol, "tree")

    def make():
        for i in range(20):
            sub = os.path.join(top, f"d{i}")
            os.mkdir(sub)
            for j in range(50):
                with open(os.path.join(sub, f"f{j}"), "wb") as f:
                    f.write(os.urandom(100 + j))
        os.symlink("d0/f0", os.path.join(top, "link"))
        os.mkdir(os.path.join(top, "ro"), 0o555)
        os.chmod(os.path.join(top, "d1", "f1"), 0o600)
    run_as(USER, make)
    before = object_keys(cvol)
    p = clone(cvol, top, cvol.path("tree-copy"))
    assert "1001 file(s), 21 directories" in p.stderr, p.stderr
    assert object_keys(cvol) == before

    def compare():
        out = []
        for d, ds, fs in os.walk(top):
            rel = os.path.relpath(d, top)
            other = os.path.join(cvol.path("tree-copy"), rel)
            assert sorted(os.listdir(other)) == sorted(ds + fs), rel
            for f in fs:
                a, b = os.path.join(d, f), os.path.join(other, f)
                if os.path.islink(a):
                    out.append(os.readlink(a) == os.readlink(b))
                else:
                    out.append(open(a, "rb").read() == open(b, "rb").read() and os.stat(a).st_mode == os.stat(b).st_mode)
        return all(out), len(out)
    assert run_as(USER, compare) == (True, 1001)
    assert os.stat(cvol.path("tree-copy", "ro")).st_mode & 0o777 == 0o555
    # Not what the caller cannot read, not into a directory the caller cannot write (root's here).
    secret = cvol.path("root-only")
    with open(secret, "w") as f:
        f.write("root's\n")
    os.chmod(secret, 0o600)
    p = clone(cvol, secret, os.path.join(top, "stolen"), check=False)
    assert p.returncode == 1 and "permission denied" in p.stderr.lower(), p.stderr
    closed = cvol.path("root-dir")
    os.mkdir(closed, 0o755)
    p = clone(cvol, os.path.join(top, "d2"), os.path.join(closed, "d2"), check=False)
    assert p.returncode == 1 and "permission denied" in p.stderr.lower(), p.stderr
    assert os.listdir(closed) == []
    # Into itself, over an existing name: refused.
    p = clone(cvol, top, os.path.join(top, "d0", "inside"), check=False)
    assert p.returncode == 1 and "into itself" in p.stderr, p.stderr
    p = clone(cvol, os.path.join(top, "d0", "f0"), os.path.join(top, "d0", "f1"), check=False)
    assert p.returncode == 1 and "exists" in p.stderr, p.stderr


def test_an_interrupted_clone_leaves_nothing(cvol):
    top = udir(cvol, "many")

    def make():
        for i in range(10):
            sub = os.path.join(top, f"d{i}")
            os.mkdir(sub)
            for j in range(300):
                open(os.path.join(sub, f"f{j}"), "wb").close()
    run_as(USER, make)
    proc = subprocess.Popen(["runuser", "-u", USER, "--", cvol.env.bin, "clone", top, cvol.path("many-copy")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hidden = lambda: [n for n in os.listdir(cvol.mnt) if n.startswith(".many-copy.clone-")]  # noqa: E731
    wait_until(lambda: hidden() or proc.poll() is not None, 60, "the clone to start")
    assert proc.poll() is None, "the clone ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    subprocess.run(["pkill", "-INT", "-f", f"{cvol.env.bin} clone {top}"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted" in err, err
    assert hidden() == [] and not os.path.exists(cvol.path("many-copy"))
