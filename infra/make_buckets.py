"""Create the MinIO buckets named in $MINIO_BUCKETS if they are missing (MinIO starts with none).

Run by the mlflow service of tracking-compose.yaml before `mlflow server`; waits for MinIO to answer.
"""

import os
import sys
import time

import boto3
from botocore.exceptions import BotoCoreError, ClientError


def main() -> int:
    s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    names = [b.strip() for b in os.environ.get("MINIO_BUCKETS", "").split(",") if b.strip()]
    deadline = time.monotonic() + 120
    while True:
        try:
            existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            break
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                print(f"make_buckets: MinIO did not answer: {exc}", file=sys.stderr)
                return 1
            time.sleep(2)
    for name in names:
        if name not in existing:
            s3.create_bucket(Bucket=name)
            print(f"make_buckets: created s3://{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
