#!/usr/bin/env bash
# A multi-node launch: a Ray head and workers started with `ray start`, then `tilerun up --address`.
#
# On the head node (HEAD_IP reachable from the workers):
#   scripts/service/multinode.sh head
# On each worker node (with the head's token: copy ~/.ray/auth_token, or export RAY_AUTH_TOKEN):
#   HEAD=HEAD_IP:6379 scripts/service/multinode.sh worker
# Then, on the head node:
#   scripts/service/multinode.sh up cluster.yaml      # e.g. tp: 8 over two 4-GPU nodes
#
# Token authentication stays on everywhere (RAY_AUTH_MODE=token): every node and every client
# presents the same token. The dashboard stays on loopback: reach it with an SSH tunnel.
# `tilerun down` then stops the engine and its workers but not this cluster (tilerun did not
# start it): stop it with `ray stop` on each node when you are done.
set -euo pipefail
export RAY_AUTH_MODE=token
PORT="${PORT:-6379}"
case "${1:-}" in
  head)
    [ -f "$HOME/.ray/auth_token" ] || [ -n "${RAY_AUTH_TOKEN:-}" ] || ray get-auth-token --generate >/dev/null
    ray start --head --port "$PORT" --dashboard-host 127.0.0.1 --disable-usage-stats
    ;;
  worker)
    : "${HEAD:?set HEAD=head_ip:port}"
    ray start --address "$HEAD" --disable-usage-stats
    ;;
  up)
    shift
    tilerun up "$@" --address "${HEAD:-127.0.0.1:$PORT}"
    tilerun status
    ;;
  *)
    echo "usage: $0 head | worker | up CLUSTER.yaml" >&2
    exit 2
    ;;
esac
