#!/usr/bin/env bash
# sandbox.sh COMMAND [ARG...]: runs COMMAND beside a private systemd user
# manager, so the unit files can be tested under a real systemd on a
# machine that did not boot with it.
#
# Everything happens in a new mount namespace: a tmpfs over /run/systemd
# (where the manager keeps its state) and a scratch directory for the
# manager's runtime, config and state ($XDG_RUNTIME_DIR, $XDG_CONFIG_HOME,
# $XDG_STATE_HOME), removed afterwards. Unit files go in
# $XDG_CONFIG_HOME/systemd/user/. The manager, and every unit it started,
# is stopped when COMMAND ends; the exit status is COMMAND's.
#
# Needs root (unshare, mount) and systemd (/lib/systemd/systemd).
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: sandbox.sh COMMAND [ARG...]" >&2; exit 2; }

if [[ "${MONODON_SANDBOXED:-}" != 1 ]]; then
  [[ $(id -u) -eq 0 ]] || { echo "sandbox.sh: needs root" >&2; exit 2; }
  [[ -x /lib/systemd/systemd ]] || { echo "sandbox.sh: needs systemd" >&2; exit 2; }
  MONODON_SANDBOXED=1 exec unshare --mount --propagation private "$0" "$@"
fi

scratch=$(mktemp -d /tmp/monodon-systemd.XXXXXX)
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/system "$scratch/runtime" "$scratch/config/systemd/user" "$scratch/state"
chmod 700 "$scratch/runtime"
export XDG_RUNTIME_DIR="$scratch/runtime" XDG_CONFIG_HOME="$scratch/config" XDG_STATE_HOME="$scratch/state"
export SANDBOX_LOG="$scratch/manager.log"

/lib/systemd/systemd --user --log-target=console >"$SANDBOX_LOG" 2>&1 &
manager=$!
finish() {
  kill -TERM "$manager" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$manager" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$manager" 2>/dev/null || true
  rm -rf "$scratch"
}
trap finish EXIT

# Up once it answers (a unit that failed leaves it "degraded": up as well).
for _ in $(seq 1 100); do
  case "$(systemctl --user is-system-running 2>/dev/null || true)" in
    running|degraded) break ;;
  esac
  sleep 0.1
done
systemctl --user show-environment >/dev/null 2>&1 || { echo "sandbox.sh: no user manager:" >&2; cat "$SANDBOX_LOG" >&2; exit 1; }

set +e
"$@"
status=$?
set -e
exit "$status"
