#!/bin/sh
# Installs what StageFS needs to build and test on Debian 12: the C libraries, FUSE, Redis, Slurm
# and munge (the SPANK plugin and its end-to-end test) and the Python tools (moto's S3 server,
# pytest, boto3). The benchmarks install JuiceFS themselves.
set -eu
if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: run as root (it uses apt-get and pip)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    libfuse3-dev fuse3 libhiredis-dev libcurl4-openssl-dev libsqlite3-dev \
    redis-server attr procps util-linux pkg-config ca-certificates \
    slurm-wlm munge libslurm-dev libmunge-dev gcc make >/dev/null
PIP="python3 -m pip"
$PIP install -q --disable-pip-version-check 'moto[server]' pytest boto3 2>&1 | grep -v "Running pip as the 'root' user" || true
# A normal host lets every user open /dev/fuse; containers often do not.
if [ -e /dev/fuse ]; then chmod 0666 /dev/fuse; fi
