#!/usr/bin/env bash
# Installs Debian's redis-server and postgresql where their binaries are missing: the tests start servers of
# their own from them (tests/services.py). Idempotent and quiet: nothing to do, nothing said; `apt-get update`
# only when something is missing. It starts and enables nothing: a policy-rc.d keeps apt from starting the
# services, and the packages it installed are taken off the boot sequence again. Needs root (sudo otherwise).
# Called by `make services` and by CI's .ci/run.
set -euo pipefail

need=()
command -v redis-server >/dev/null || need+=(redis-server)
if ! command -v initdb >/dev/null && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  need+=(postgresql)
fi
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "$0: installing ${need[*]} needs root (or sudo)" >&2; exit 1; }
  exec sudo "$0" "$@"
fi
echo "installing ${need[*]} (Debian packages: the servers the tests start)"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
policy=/usr/sbin/policy-rc.d
cleanup=(rm -f "$log")
if [ ! -e "$policy" ]; then  # 101: "action forbidden": the packages' scripts start no service
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
  cleanup+=("$policy")
fi
trap '"${cleanup[@]}"' EXIT
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  exit 1
fi
for service in "${need[@]}"; do  # not at boot either (each package's service has its name)
  if command -v systemctl >/dev/null; then  # systemd's links, and SysV's through systemd-sysv-install
    systemctl disable --quiet "$service.service" >/dev/null 2>&1 || true
  else
    update-rc.d "$service" disable >/dev/null 2>&1 || true
  fi
done
