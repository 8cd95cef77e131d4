#!/bin/sh
# Entry point of the mlseg image.
#   docker run IMAGE worker [ARGS]   Prefect worker for $MLSEG_WORK_POOL (default mlseg-pool),
#                                    running at most $MLSEG_WORKER_LIMIT flow runs at once
#                                    (unset or empty: no limit; a --limit in ARGS wins)
#   docker run IMAGE mlseg ...       any mlseg command (or any other program in the image)
set -eu

if [ "$#" -eq 0 ] || [ "$1" = "worker" ]; then
  [ "$#" -eq 0 ] || shift
  limit=${MLSEG_WORKER_LIMIT:-}
  for arg in "$@"; do
    # prefect refuses a --limit given twice
    case $arg in --limit | --limit=* | -l | -l[0-9]*) limit= ;; esac
  done
  if [ -n "$limit" ]; then
    set -- --limit "$limit" "$@"
  fi
  exec prefect worker start --pool "${MLSEG_WORK_POOL:-mlseg-pool}" --type process "$@"
fi
exec "$@"
