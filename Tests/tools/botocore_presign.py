#!/usr/bin/env python3
"""Pre-signed S3 URLs made by botocore, the independent signer PresignTests checks ours against.

Usage: botocore_presign.py CASES_JSON
CASES_JSON is a JSON list of cases, each an object with: endpoint ("http(s)://host[:port]", the
service without the bucket), style ("path" or "virtual"), bucket, region, access, secret,
method ("GET" or "PUT"), key, expires (seconds) and now (seconds since the epoch, UTC).
Prints a JSON list: for each case, the URL of botocore's generate_presigned_url signed at `now`.
Exits 3 with a message when botocore is missing.
"""
import datetime
import json
import os
import sys
import unittest.mock

# Nothing of the caller's AWS set-up (keys, session token, profile, config files) may reach botocore.
for name in list(os.environ):
    if name.startswith("AWS_"):
        del os.environ[name]
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

try:
    import botocore.auth
    import botocore.session
    from botocore.config import Config
except ImportError as e:
    print(f"botocore is not installed ({e})", file=sys.stderr)
    sys.exit(3)


def frozen_clock(now):
    """Patches botocore's clock so that it signs for the instant `now`."""
    instant = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(tzinfo=None)
    if hasattr(botocore.auth, "get_current_datetime"):
        return unittest.mock.patch("botocore.auth.get_current_datetime", return_value=instant)
    # Older botocore read datetime.datetime.utcnow() in botocore.auth.
    fake = unittest.mock.MagicMock(wraps=datetime.datetime)
    fake.utcnow.return_value = instant
    return unittest.mock.patch("botocore.auth.datetime.datetime", fake)


def main():
    cases = json.loads(sys.argv[1])
    session = botocore.session.get_session()
    urls = []
    for c in cases:
        client = session.create_client(
            "s3", endpoint_url=c["endpoint"], region_name=c["region"],
            aws_access_key_id=c["access"], aws_secret_access_key=c["secret"],
            config=Config(signature_version="s3v4", s3={"addressing_style": c["style"]}))
        operation = {"GET": "get_object", "PUT": "put_object"}[c["method"]]
        with frozen_clock(c["now"]):
            urls.append(client.generate_presigned_url(
                operation, Params={"Bucket": c["bucket"], "Key": c["key"]}, ExpiresIn=c["expires"]))
    print(json.dumps(urls))


if __name__ == "__main__":
    main()
