"""The gateway's pre-signed block URLs against an S3 server that checks them: Ceph's radosgw
(helpers.Radosgw), where moto takes any URL. A URL the gateway signed reads its block; the same URL
with its signature, its key or its expiry changed is refused, and so is one past its expiry (the
gateway made to sign ten minutes in the past with faketime)."""
import os
import re
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

import pytest

import gwproto
import helpers
from helpers import OTHER, USER, Gateway, run_as, wait_until


@pytest.fixture(scope="module")
def site(env, redis, radosgw):
    url = redis.url(redis.new_db())
    env.stagefs("format", url, "rgwvol", "--storage", "s3", "--bucket", radosgw.bucket("rgwvol"), "--access-key", radosgw.access_key,
                "--secret-key", radosgw.secret_key, user="root")
    sockets = env.dir_for("root", "rgw-run")
    os.chmod(sockets, 0o755)
    gw = Gateway(env, url, os.path.join(sockets, "rgw.sock"))
    logs = env.dir_for("root", "rgw-logs")
    os.chmod(logs, 0o1777)
    s = dict(gw=gw, logs=logs, mnt=env.dir_for(USER, "rgw-mnt"))
    # The volume's root open to the test users, as /tmp is.
    top = env.dir_for("root", "rgw-root-mnt")
    env.stagefs("mount", "-d", gw.url, top, "--log", os.path.join(logs, "root.log"), user="root")
    os.chmod(top, 0o1777)
    env.stagefs("umount", top, user="root")
    yield s
    if helpers.is_mounted(s["mnt"]):
        env.stagefs("umount", s["mnt"])
    gw.stop()


def get(url):
    """(HTTP status, body) of a GET of `url`."""
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def s3_code(body):
    m = re.search(rb"<Code>([^<]*)</Code>", body)
    return m.group(1).decode() if m else body[:200]


def block_url(socket_path, name):
    """As the calling user: the gateway's URL for the first block of file `name` (in the root)
    and the block's key."""
    c = gwproto.Raw(socket_path)
    sid, sid_tag = c.new_session()
    ino, tag, _ = c.lookup(1, 0, name.encode())
    _, slices = c.open(ino, tag, os.O_RDONLY, sid, sid_tag)
    slice_id, size, btag = slices[0]
    key = f"rgwvol/chunks/{slice_id // 1000000}/{slice_id // 1000}/{slice_id}_0_{size}"
    url = c.presign_block(key, btag)
    c.close()
    return url, key


def write_public(mnt, name, body):
    def make():
        with open(os.path.join(mnt, name), "wb") as f:
            f.write(body)
        os.chmod(os.path.join(mnt, name), 0o644)
    run_as(USER, make)


def signed_gets(radosgw):
    """The pre-signed GETs of blocks that radosgw took as its user's (the signature checked) and
    served (200, or 206 for a range)."""
    signed = re.compile(r' - stagefs \[[^]]*\] "GET /rgwvol/rgwvol/chunks/\S*[?&]X-Amz-Signature=[0-9a-f]{64} HTTP/1\.1" 20[06] ')
    return [r for r in radosgw.requests() if signed.search(r)]


def test_a_mount_reads_its_blocks_from_urls_the_server_checks(env, site, radosgw):
    """Written through the gateway, read back cold (no cache, after a remount): the blocks come
    from radosgw through URLs the gateway signed for them, which radosgw checked."""
    gw, mnt = site["gw"], site["mnt"]
    log = os.path.join(site["logs"], "mount.log")
    env.stagefs("mount", "-d", gw.url, mnt, "--cache-size", "0", "--log", log)
    body = os.urandom(9 << 20)  # three blocks
    write_public(mnt, "big", body)
    env.stagefs("umount", mnt)
    before = len(signed_gets(radosgw))
    env.stagefs("mount", "-d", gw.url, mnt, "--cache-size", "0", "--log", log)
    assert run_as(USER, lambda: open(os.path.join(mnt, "big"), "rb").read()) == body
    env.stagefs("umount", mnt)
    wait_until(lambda: len(signed_gets(radosgw)) >= before + 3, 10, "radosgw to log three signed block GETs")


def test_a_changed_url_is_refused(env, site):
    """The URL as signed reads the block; changing its signature, its key (to another block of
    the volume) or its expiry gets 403 SignatureDoesNotMatch."""
    gw, mnt = site["gw"], site["mnt"]
    env.stagefs("mount", "-d", gw.url, mnt, "--log", os.path.join(site["logs"], "mount.log"))
    one, two = os.urandom(5000), os.urandom(7000)
    write_public(mnt, "one", one)
    write_public(mnt, "two", two)
    env.stagefs("umount", mnt)
    url, key = run_as(OTHER, block_url, gw.socket, "one")
    _, key2 = run_as(OTHER, block_url, gw.socket, "two")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=300&" in url, url
    assert get(url) == (200, one)

    sig = re.search(r"X-Amz-Signature=([0-9a-f]{64})", url).group(1)
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    changed = {
        "signature": url.replace(sig, flipped),
        "key": url.replace(key, key2),
        "expiry": url.replace("X-Amz-Expires=300&", "X-Amz-Expires=3000&"),
    }
    for what, bad in changed.items():
        assert bad != url, what
        status, body = get(bad)
        assert (what, status, s3_code(body)) == (what, 403, "SignatureDoesNotMatch")
    # The block the key was changed to is there, for its own URL.
    assert get(run_as(OTHER, block_url, gw.socket, "two")[0]) == (200, two)


def test_an_expired_url_is_refused(env, site):
    """The gateway run with its clock set back (faketime; the clock it times with is left alone):
    one minute back, its URL is still within its 300 s and reads the block; ten minutes back,
    the URL is past them and gets 403 AccessDenied."""
    gw, mnt = site["gw"], site["mnt"]
    env.stagefs("mount", "-d", gw.url, mnt, "--log", os.path.join(site["logs"], "mount.log"))
    body = os.urandom(6000)
    write_public(mnt, "old", body)
    env.stagefs("umount", mnt)

    def signed(back):
        gw.stop()
        gw.wrapper, gw.environment = ["faketime", "-f", f"-{back}"], {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        gw.start()
        url, _ = run_as(OTHER, block_url, gw.socket, "old")
        stamp = re.search(r"X-Amz-Date=(\d{8}T\d{6}Z)", url).group(1)
        age = time.time() - datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
        assert back - 5 < age < back + 30, (back, age, url)  # signed that long ago
        return url

    try:
        assert get(signed(60)) == (200, body)
        status, answer = get(signed(600))
        assert (status, s3_code(answer)) == (403, "AccessDenied")
    finally:
        gw.stop()
        gw.wrapper, gw.environment = [], {}
        gw.start()
