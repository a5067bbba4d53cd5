#!/usr/bin/env bash
# Installs Debian's SLURM (slurmctld, slurmd, client) and munge for the local-cluster tests
# (tests/slurm_cluster.py starts the daemons itself; nothing is enabled or started here), and
# iproute2 (`tc`, `ip`) for the shaped-link benchmark test (`lrpt bench --link`).
# Idempotent and quick when already installed. Needs root (CI runs as root).
set -euo pipefail
pkgs=(slurmctld slurmd slurm-client munge iproute2)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-slurm: ${pkgs[*]} already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-slurm: missing ${missing[*]} and not root; run as root or install them" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Update the package lists only when they are absent or when an install without them fails.
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
    apt-get update -qq
fi
# policy-rc.d 101: packages must not start their daemons (there may be no systemd, and the
# tests start their own with their own config).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
fi
trap 'if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
apt_install() { apt-get install -y -qq --no-install-recommends "${missing[@]}"; }
apt_install || { apt-get update -qq && apt_install; }
echo "install-slurm: installed ${missing[*]}"
