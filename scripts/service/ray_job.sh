#!/usr/bin/env bash
# Ray Jobs with tilerun as the entrypoint: `ray job submit` runs `tilerun` commands on the
# head node of a cluster that `tilerun up` started (or attached to), against its task store.
#
#   scripts/service/ray_job.sh [HOME]          # default HOME: $TILERUN_HOME or ~/.tilerun
#
# The job's driver runs on the head node, where the task store lives, so `tilerun submit` and
# `tilerun result --wait` inside the job reach the same service as a shell there would.
# Ray's token authentication stays on: `ray job submit` sends ~/.ray/auth_token (or
# RAY_AUTH_TOKEN) to the dashboard, which refuses requests without it.
set -euo pipefail
HOME_DIR="${1:-${TILERUN_HOME:-$HOME/.tilerun}}"
export RAY_AUTH_MODE=token
if ! tilerun dashboard --home "$HOME_DIR" --json >/dev/null 2>&1; then
  tilerun up --home "$HOME_DIR" --model demo-small --device cpu
fi
DASH=$(tilerun dashboard --home "$HOME_DIR" --json | python -c 'import json,sys; print(json.load(sys.stdin)["ray_dashboard"])')
echo "submitting a Ray job to $DASH"
ray job submit --address "$DASH" -- \
  bash -c "id=\$(tilerun submit --home '$HOME_DIR' --prompt 'Once upon a time, in a tiled attention kernel,' --max-new-tokens 16) && tilerun result \$id --wait --home '$HOME_DIR' --json"
