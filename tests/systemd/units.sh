#!/usr/bin/env bash
# Runs inside tests/systemd/sandbox.sh (a real systemd user manager):
# installs systemd/monodon.{service,socket} with a drop-in that points at the
# freshly built binary, then checks start (READY), STATUS=, reload (a new
# generation), socket activation, the control CLI and a clean stop.
# Usage: units.sh REPO BIN PORT
set -euo pipefail
repo=$1 bin=$2 port=$3
units="$XDG_CONFIG_HOME/systemd/user"
mkdir -p "$units/monodon.service.d" "$units/monodon.socket.d"
cp "$repo/systemd/monodon.service" "$repo/systemd/monodon.socket" "$units/"
cat > "$units/monodon.service.d/test.conf" <<CONF
[Service]
# A user manager has no users to switch to, and inside the sandbox it
# cannot build the mount namespaces the file-system hardening needs.
User=
Group=
ProtectSystem=no
ProtectHome=no
PrivateTmp=no
PrivateDevices=no
ProtectKernelTunables=no
ProtectKernelModules=no
ProtectControlGroups=no
ExecStart=
# %L is the manager's log root: /var/log for the system, under
# \$XDG_STATE_HOME for a user manager; LogsDirectory= creates monodon/ in it.
ExecStart=$bin serve --app echo --workers 2 --graceful-timeout 5s --access-log %L/monodon/access.log
TimeoutStopSec=20
CONF
cat > "$units/monodon.socket.d/test.conf" <<CONF
[Socket]
ListenStream=
ListenStream=127.0.0.1:$port
CONF
systemctl --user daemon-reload

fail() { echo "FAIL: $*"; systemctl --user status monodon.service --no-pager || true; exit 1; }
get() { curl -sS --max-time 10 "http://127.0.0.1:$port$1"; }
generation() { get /gen | sed -n 's/.*"generation":\([0-9]*\).*/\1/p'; }

# Start: Type=notify, so this returns once monodon said READY=1.
systemctl --user start monodon.service || { systemctl --user status monodon.service --no-pager; tail -30 "$SANDBOX_LOG"; exit 1; }
[ "$(systemctl --user is-active monodon.service)" = active ] || fail "not active after start"
[ "$(generation)" = 1 ] || fail "generation 1 does not answer"
echo "ok: started, generation 1 serves"

# LogsDirectory= made the access log's directory, and both the workers and
# the supervisor write there.
logs=$(systemctl --user show -p LogsDirectory --value monodon.service)
[ "$logs" = monodon ] || fail "LogsDirectory=$logs"
# A user manager's log root is $XDG_CONFIG_HOME/log up to systemd 254,
# $XDG_STATE_HOME/log after.
access_log() {
  for f in "$XDG_STATE_HOME/log/monodon/access.log" "$XDG_CONFIG_HOME/log/monodon/access.log"; do
    [ -f "$f" ] && { echo "$f"; return; }
  done
  echo /nonexistent
}
get /logged >/dev/null
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET /refused HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n' >&3
timeout 5 cat <&3 >/dev/null || true
exec 3<&-
# A worker writes its line just after its response: poll for both.
logged() { grep -qs '"GET /logged HTTP/1.1" 200' "$(access_log)" && grep -qs '"GET /refused HTTP/1.1" 400' "$(access_log)"; }
for _ in $(seq 1 100); do logged && break; sleep 0.1; done
log=$(access_log)
[ -f "$log" ] || fail "no access log under LogsDirectory="
grep -q '"GET /logged HTTP/1.1" 200' "$log" || fail "no line of a worker's in $log"
grep -q '"GET /refused HTTP/1.1" 400' "$log" || fail "the supervisor's 400 is not in $log"
echo "ok: access log in LogsDirectory= ($log)"

# STATUS= is kept current.
status_line=$(systemctl --user show -p StatusText --value monodon.service)
case "$status_line" in *"generation 1"*workers*) ;; *) fail "StatusText: $status_line" ;; esac
echo "ok: StatusText=$status_line"

# Reload: ExecReload sends HUP; a new generation takes over.
systemctl --user reload monodon.service
for _ in $(seq 1 100); do [ "$(generation)" = 2 ] && break; sleep 0.1; done
[ "$(generation)" = 2 ] || fail "generation 2 did not take over"
[ "$(systemctl --user is-active monodon.service)" = active ] || fail "not active after reload"
echo "ok: reloaded, generation 2 serves"

# The control socket lives in RuntimeDirectory=.
control="$XDG_RUNTIME_DIR/monodon/control.sock"
"$bin" status --control "$control" | grep -q "generation 2" || fail "monodon status"
"$bin" status --json --control "$control" | grep -q "\"127.0.0.1:$port\"" || fail "inherited listener not in status"
echo "ok: monodon status through \$RUNTIME_DIRECTORY"

# Stop: SIGTERM to the supervisor, a clean exit.
systemctl --user stop monodon.service
[ "$(systemctl --user show -p Result --value monodon.service)" = success ] || fail "stop result"
[ "$(systemctl --user show -p ExecMainStatus --value monodon.service)" = 0 ] || fail "exit status"
[ "$(systemctl --user is-active monodon.service)" = inactive ] || fail "still running"
echo "ok: stopped cleanly"

# Socket activation: the socket unit still listens; a request starts the service.
[ "$(systemctl --user is-active monodon.socket)" = active ] || fail "socket unit not active"
[ "$(generation)" = 1 ] || fail "socket activation did not serve"
[ "$(systemctl --user is-active monodon.service)" = active ] || fail "not activated by the socket"
echo "ok: socket activation"
systemctl --user stop monodon.service monodon.socket
echo "all systemd checks passed"
