#!/usr/bin/env bash
# Installs what mtcpshim and its tests need on a fresh Debian machine, then
# builds the project in place (the cffi modules and the preload library).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(lighttpd wrk apache2-utils curl wget nftables iproute2 iputils-ping tcpdump iperf3 gcc procps pypy3 pypy3-dev
          redis-server redis-tools nginx haproxy postgresql memcached socat)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    # Installing lighttpd, nginx, redis or PostgreSQL must not start a system-wide
    # server: keep services down.
    policy=/usr/sbin/policy-rc.d
    added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && added_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ "$added_policy" = 1 ] && rm -f "$policy"
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "Running pip as the 'root' user" || true
python3 -c "import mtcpshim._shm, mtcpshim.stack._netfast" 
test -f mtcpshim/libmtcpshim_preload.so
