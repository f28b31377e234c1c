#!/bin/sh
# Starts one node of the chart's Redis Cluster: redis-server with the arguments given,
# after refreshing the peers' addresses in nodes.conf.
#
# A node remembers its peers in nodes.conf by IP, and a pod gets a new IP when it restarts:
# after every pod restarted at once, no node could reach another. Each node also announces
# a stable hostname (cluster-announce-hostname: its StatefulSet DNS name), which nodes.conf
# keeps beside the IP (`ip:port@cport,hostname[,aux...]`), so every peer's IP is looked up
# again by that name first. A peer whose name does not resolve yet keeps its old IP: once it
# starts it reaches the others itself, and they learn its new address from it.
set -eu

conf="${REDIS_NODES_CONF:?the cluster-config-file to refresh}"

if [ -s "$conf" ]; then
  fresh="$conf.refresh"
  while IFS=' ' read -r id addr rest; do
    case "$addr" in
      *,*)
        endpoint="${addr%%,*}"
        extra="${addr#*,}"
        host="${extra%%,*}"
        if [ -n "$host" ]; then
          ip="$(getent hosts "$host" | awk 'NR == 1 { print $1 }')"
          if [ -n "$ip" ]; then
            addr="$ip:${endpoint##*:},$extra"
          fi
        fi
        ;;
    esac
    printf '%s %s %s\n' "$id" "$addr" "$rest"
  done <"$conf" >"$fresh"
  mv "$fresh" "$conf"
fi

exec redis-server "$@"
