"""Mountpoints: a non-empty directory is refused unless -o nonempty; a /dev/fuse descriptor
mounted by a supervisor and passed as /dev/fd/N is served (how Apptainer's --fusemount hands a
mount to a program); umount names the process whose working directory keeps a mount busy."""
import ctypes
import os
import pwd
import subprocess

import helpers
from helpers import USER, is_mounted, run_as, wait_until

MS_NOSUID, MS_NODEV = 2, 4


def sqlite_volume(env, name):
    base = env.dir_for(USER, "vol")
    url = f"sqlite3://{base}/meta.db"
    env.stagefs("format", url, name, "--bucket", f"{base}/data")
    return url


def test_a_non_empty_mountpoint_is_refused_unless_nonempty(env):
    url = sqlite_volume(env, "nonempty")
    m = env.dir_for(USER, "m")
    run_as(USER, lambda: open(os.path.join(m, "mine.txt"), "w").write("under the mount\n"))
    p = env.stagefs("mount", "-d", url, m, check=False)
    assert p.returncode == 1 and not is_mounted(m), p.stderr
    assert f"mountpoint {m} is not empty (it holds 'mine.txt')" in p.stderr and "-o nonempty" in p.stderr, p.stderr
    env.stagefs("mount", "-d", url, m, "-o", "nonempty")
    try:
        assert is_mounted(m)
        assert run_as(USER, os.listdir, m) == [], "the volume is shown, its files hide the directory's"
    finally:
        env.stagefs("umount", m)
    assert open(os.path.join(m, "mine.txt")).read() == "under the mount\n"


def test_a_premounted_dev_fd_mountpoint(env):
    """Root opens /dev/fuse and mounts it (as a supervisor does); the unprivileged user's
    `stagefs mount URL /dev/fd/N` serves that mount; unmounting ends the process."""
    url = sqlite_volume(env, "fdmount")
    target = env.dir_for("root", "fdtarget")
    pw = pwd.getpwnam(USER)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/dev/fuse", os.O_RDWR)
    opts = f"fd={fd},rootmode=40000,user_id={pw.pw_uid},group_id={pw.pw_gid},allow_other,default_permissions"
    rc = libc.mount(b"stagefs", target.encode(), b"fuse.stagefs", MS_NOSUID | MS_NODEV, opts.encode())
    assert rc == 0, os.strerror(ctypes.get_errno())
    proc = None
    try:
        log = os.path.join(env.dir_for(USER, "log"), "fd.log")
        proc = subprocess.Popen([env.bin, "mount", url, f"/dev/fd/{fd}", "--cache-dir", env.dir_for(USER, "c"), "--log", log],
                                pass_fds=(fd,), user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(fd)
        fd = -1

        def serves():
            try:
                return os.statvfs(target).f_blocks > 0 and proc.poll() is None
            except OSError:
                return False
        wait_until(lambda: serves() or proc.poll() is not None, 60, "the /dev/fd mount to answer")
        assert proc.poll() is None, proc.communicate()
        run_as(USER, lambda: open(os.path.join(target, "through-fd"), "w").write("written through /dev/fd\n"))
        assert os.stat(os.path.join(target, "through-fd")).st_uid == pw.pw_uid
    finally:
        if fd >= 0:
            os.close(fd)
        libc.umount2(target.encode(), 2)  # MNT_DETACH
        if proc:
            out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)
    # The file is in the volume: an ordinary mount sees it.
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m)
    try:
        assert run_as(USER, lambda: open(os.path.join(m, "through-fd")).read()) == "written through /dev/fd\n"
    finally:
        env.stagefs("umount", m)


def test_dev_fd_mountpoint_errors(env):
    url = sqlite_volume(env, "fdbad")
    p = env.stagefs("mount", url, "/dev/fd/77", check=False)
    assert p.returncode == 1 and "descriptor 77 is not open" in p.stderr, p.stderr
    p = subprocess.run(["runuser", "-u", USER, "--", "sh", "-c", f"exec 5</dev/null; {env.bin} mount {url} /dev/fd/5"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "descriptor 5 is not /dev/fuse" in p.stderr, p.stderr


def test_umount_names_the_working_directory_inside(env):
    url = sqlite_volume(env, "busycwd")
    m = env.dir_for(USER, "m")
    env.stagefs("mount", "-d", url, m)
    run_as(USER, os.mkdir, os.path.join(m, "work"))
    shell = subprocess.Popen(["runuser", "-u", USER, "--", "sh", "-c", f"cd {m}/work && read x"], stdin=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: helpers.processes_in(os.path.join(m, "work")), 30, "the shell to enter the mount")
        p = env.stagefs("umount", m, check=False)
        assert p.returncode == 1 and is_mounted(m)
        assert f"the working directory {m}/work of process" in p.stderr and "(sh)" in p.stderr, p.stderr
        assert "files are still open" not in p.stderr
    finally:
        shell.communicate("\n", timeout=30)
    env.stagefs("umount", m)
