"""`mount --subdir DIR`: the mount shows only that directory of the volume; its '..' is itself,
and no path, listing, symlink or extended attribute reaches the rest of the volume."""
import os
import subprocess

import pytest

import helpers
from helpers import USER, run_as


@pytest.fixture
def tree(volume, workdir):
    """workdir/team/{a/f, rel -> ../../secret/x, abs -> /secret/x} and workdir/secret/x, with an
    extended attribute on workdir (outside the subdir) and one on team."""
    def make():
        os.makedirs(os.path.join(workdir, "team", "a"))
        os.makedirs(os.path.join(workdir, "secret"))
        with open(os.path.join(workdir, "secret", "x"), "w") as f:
            f.write("outside")
        with open(os.path.join(workdir, "team", "a", "f"), "w") as f:
            f.write("inside")
        os.symlink("../../secret/x", os.path.join(workdir, "team", "rel"))
        os.symlink("/secret/x", os.path.join(workdir, "team", "abs"))
        os.setxattr(workdir, "user.where", b"outside")
        os.setxattr(os.path.join(workdir, "team"), "user.where", b"team")
    run_as(USER, make)
    return "/" + os.path.basename(workdir) + "/team"


def mount_subdir(volume, subdir, check=True):
    mnt = volume.env.dir_for(USER, f"sub-{volume.kind}")
    p = volume.env.stagefs("mount", "-d", volume.meta_url, mnt, "--subdir", subdir, "--log", os.path.join(volume.base, "sub.log"), check=check)
    return mnt, p


def test_a_subdir_mount_shows_only_its_subtree(volume, tree):
    mnt, _ = mount_subdir(volume, tree)
    try:
        def look():
            out = {}
            out["list"] = sorted(os.listdir(mnt))
            out["root-ino"] = os.stat(mnt).st_ino
            out["a-dotdot"] = os.stat(os.path.join(mnt, "a", "..")).st_ino
            out["file"] = open(os.path.join(mnt, "a", "f")).read()
            out["xattr"] = os.getxattr(mnt, "user.where")
            for name in ("rel", "abs"):
                try:
                    out[name] = open(os.path.join(mnt, name)).read()
                except OSError as e:
                    out[name] = e.errno
            # The listing's own "." of the top is the top (inode 1 to the kernel).
            ls = subprocess.run(["ls", "-fai", mnt], capture_output=True, text=True).stdout.split()
            out["dot"] = [int(ls[i]) for i in range(0, len(ls) - 1, 2) if ls[i + 1] == "."]
            out["made"] = open(os.path.join(mnt, "new"), "w").write("n")
            return out
        got = run_as(USER, look)
        assert got["list"] == ["a", "abs", "rel"], got
        assert got["root-ino"] == 1 and got["a-dotdot"] == 1, got
        assert got["file"] == "inside" and got["xattr"] == b"team", got
        # Both symlinks leave the mount (the kernel resolves ".." above its root on the host),
        # never reaching the volume's secret.
        assert got["rel"] != "outside" and got["abs"] != "outside", got
        assert got["dot"] == [1], got
        # What was made there is in the volume, under the subdir.
        assert open(volume.path(tree.lstrip("/").split("/", 1)[0], "team", "new")).read() == "n"
        # info and stage name volume paths under the subdir.
        out = volume.env.stagefs("info", os.path.join(mnt, "a", "f")).stdout
        assert "size:   6" in out, out
        cache = volume.env.dir_for(USER, "subcache")
        p = volume.env.stagefs("stage", "--cache-dir", cache, os.path.join(mnt, "a"))
        assert "staged 1 of 1 files, 6 B of 6 B" in p.stdout, p.stdout
    finally:
        volume.umount(mnt)


def test_a_subdir_that_is_not_a_directory_is_refused(volume, tree):
    for subdir, needle in ((tree + "/a/f", "is not a directory"), (tree + "/missing", "does not exist in the volume"),
                           ("team", "from its root"), (tree + "/../secret", "without '..'")):
        mnt, p = mount_subdir(volume, subdir, check=False)
        assert p.returncode != 0 and needle in p.stderr, (subdir, p.stderr)
        assert not helpers.is_mounted(mnt)
