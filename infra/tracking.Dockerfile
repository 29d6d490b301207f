# The MLflow server of tracking-compose.yaml: the official image at constraints.txt's mlflow pin, plus
# the PostgreSQL driver and boto3 (for the S3 artifact proxy), installed once at build time instead of
# at every container start.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN python -m pip install --no-cache-dir psycopg2-binary==2.9.10 boto3==1.43.11
COPY make_buckets.py /opt/sweeper/make_buckets.py
