#!/usr/bin/env bash
# MLflow tracking server for runs from several machines (make mlflow-server).
#   MLFLOW_HOST       bind address, 127.0.0.1 by default (reach it through an SSH tunnel; 0.0.0.0 exposes it
#                     unauthenticated to the whole network)
#   MLFLOW_PORT       5000
#   MLFLOW_BACKEND    backend store: sqlite:///<project>/mlflow/server.db by default, or postgresql+psycopg://...
#   MLFLOW_ARTIFACTS  where artifacts go, passed to --artifacts-destination untouched: any URI MLflow knows
#                     (s3://bucket/prefix, gs://..., file:///abs/path); default <project>/mlflow/server-artifacts.
#                     Clients upload through the server (mlflow-artifacts:/), so they need no bucket credentials.
# Clients: MLFLOW_TRACKING_URI=http://127.0.0.1:5000 make train ... (or logger.tracking_uri=http://...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
BACKEND="${MLFLOW_BACKEND:-sqlite:///$ROOT/mlflow/server.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS:-$ROOT/mlflow/server-artifacts}"
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || (( PORT < 1 || PORT > 65535 )); then
  echo "error: MLFLOW_PORT=$PORT is not a port number (1-65535)" >&2; exit 1
fi
if [[ "$BACKEND" == sqlite:///* ]]; then mkdir -p "$(dirname "${BACKEND#sqlite:///}")"; fi
# a local folder is made absolute (the server may be started from anywhere); a URI is left as given
if ! [[ "$ARTIFACTS" =~ ^[A-Za-z][A-Za-z0-9+.-]+: ]]; then mkdir -p "$ARTIFACTS"; ARTIFACTS="$(cd "$ARTIFACTS" && pwd)"; fi
exec "$PY" -m mlflow server --host "$HOST" --port "$PORT" --backend-store-uri "$BACKEND" \
  --artifacts-destination "$ARTIFACTS" --workers "${MLFLOW_WORKERS:-2}" "$@"
