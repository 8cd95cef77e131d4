#!/bin/sh
# Entry point of the mlseg image.
#   docker run IMAGE worker [ARGS]   Prefect worker for $MLSEG_WORK_POOL (default mlseg-pool)
#   docker run IMAGE mlseg ...       any mlseg command (or any other program in the image)
set -eu

if [ "$#" -eq 0 ] || [ "$1" = "worker" ]; then
  [ "$#" -eq 0 ] || shift
  exec prefect worker start --pool "${MLSEG_WORK_POOL:-mlseg-pool}" --type process "$@"
fi
exec "$@"
