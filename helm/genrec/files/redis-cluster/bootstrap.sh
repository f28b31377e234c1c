#!/bin/sh
# Forms the chart's Redis Cluster once: waits until every node answers, then, unless a node
# already belongs to a cluster, runs `redis-cli --cluster create` over all of them and waits
# for `cluster_state:ok`. It runs after every install and upgrade (a Helm hook): a cluster
# that is already formed is left as it is.
#
# REDIS_NODES: the nodes as host:port, one a line (their StatefulSet DNS names).
# REDIS_CLUSTER_REPLICAS: replicas per primary. REDISCLI_AUTH: the password, if any.
set -eu

nodes="${REDIS_NODES:?the nodes as host:port, one a line}"
replicas="${REDIS_CLUSTER_REPLICAS:-1}"
pause="${REDIS_POLL_S:-2}"

cli() {
  node="$1"
  shift
  redis-cli -h "${node%:*}" -p "${node##*:}" "$@"
}

info() {
  cli "$1" cluster info | tr -d '\r' | awk -F: -v key="$2" '$1 == key { print $2 }'
}

wait_ok() {
  until [ "$(info "$1" cluster_state)" = "ok" ]; do
    echo "waiting for $1 to report cluster_state:ok"
    sleep "$pause"
  done
}

for node in $nodes; do
  until [ "$(cli "$node" ping 2>/dev/null)" = "PONG" ]; do
    echo "waiting for $node"
    sleep "$pause"
  done
done

for node in $nodes; do
  known="$(info "$node" cluster_known_nodes)"
  if [ "${known:-0}" -gt 1 ]; then
    echo "$node already belongs to a cluster: not creating one"
    wait_ok "$node"
    echo "cluster_state:ok"
    exit 0
  fi
done

# CLUSTER MEET takes IP addresses: resolve the stable names once, for the handshake only.
addresses=""
for node in $nodes; do
  ip="$(getent hosts "${node%:*}" | awk 'NR == 1 { print $1 }')"
  addresses="$addresses ${ip:?cannot resolve ${node%:*}}:${node##*:}"
done

# shellcheck disable=SC2086 # one argument per node
redis-cli --cluster create $addresses --cluster-replicas "$replicas" --cluster-yes
for node in $nodes; do
  wait_ok "$node"
done
echo "cluster_state:ok"
