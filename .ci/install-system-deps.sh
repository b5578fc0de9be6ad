#!/usr/bin/env bash
# Install the system binaries that the integration tests run for real (Debian 12 / apt):
#   prometheus, promtool       <- prometheus
#   prometheus-pushgateway     <- prometheus-pushgateway
#   chromium                   <- chromium (headless screenshots of TensorBoard)
# Idempotent: installs only the packages whose binaries are missing. Quiet on success;
# prints apt's output and exits non-zero on failure. Needs root (or passwordless sudo).
set -euo pipefail

declare -A package_of=(
    [prometheus]=prometheus
    [promtool]=prometheus
    [prometheus-pushgateway]=prometheus-pushgateway
    [chromium]=chromium
)

missing=()
for binary in "${!package_of[@]}"; do
    if ! command -v "$binary" >/dev/null 2>&1; then
        missing+=("${package_of[$binary]}")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-system-deps: prometheus, promtool, prometheus-pushgateway, chromium already present"
    exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo -n)
    else
        echo "install-system-deps: need root (or sudo) to apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
echo "install-system-deps: apt-get install ${missing[*]}"
if ! { "${sudo[@]}" apt-get update -qq &&
       "${sudo[@]}" apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 \
           "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-system-deps: apt-get failed for: ${missing[*]}" >&2
    exit 1
fi

# On a machine with systemd, the packages start their services on 0.0.0.0:9090/9091; the
# tests start their own servers on 127.0.0.1, so stop those (no-op in containers).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    "${sudo[@]}" systemctl disable --now prometheus prometheus-pushgateway >/dev/null 2>&1 || true
fi

status=0
for binary in "${!package_of[@]}"; do
    if ! command -v "$binary" >/dev/null 2>&1; then
        echo "install-system-deps: $binary is still missing after the install" >&2
        status=1
    fi
done
exit "$status"
