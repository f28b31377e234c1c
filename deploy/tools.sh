#!/usr/bin/env bash
# Fetches the command-line tools the deploy tests need that no Python package ships:
# promtool, from Debian's `prometheus` package. The .deb is only unpacked (nothing is
# installed, no service starts), into .cache/tools/bin (or $1). Safe to run repeatedly.
#   bash deploy/tools.sh            # then tests/test_deploy.py finds .cache/tools/bin/promtool
# hadolint, shellcheck, yamllint, kubernetes-validate and the Helm SDK come from the dev
# extra (PyPI wheels).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/.cache/tools/bin}"
mkdir -p "$dest"

if [ -x "$dest/promtool" ] && "$dest/promtool" --version >/dev/null 2>&1; then
    exit 0
fi
if command -v promtool >/dev/null 2>&1; then
    ln -sf "$(command -v promtool)" "$dest/promtool"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
download() { (cd "$work" && apt-get download -q prometheus >/dev/null 2>&1); }
if ! download; then
    # No package lists yet (a fresh machine): refresh them when allowed to, then retry.
    if [ "$(id -u)" = "0" ]; then
        apt-get update -q >/dev/null
    fi
    download || { echo "deploy/tools.sh: cannot download Debian's prometheus package" >&2; exit 1; }
fi
dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
install -m 0755 "$work/x/usr/bin/promtool" "$dest/promtool"
"$dest/promtool" --version | head -n 1
