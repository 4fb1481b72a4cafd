#!/usr/bin/env bash
# `make run`: migrate, make sure an admin login exists and the demo's gateway key, find (or
# start) Redis, then run a Celery worker with embedded beat and the web server (uvicorn
# serving the project's ASGI app, so the gateway streams) until Ctrl-C.
#
# Every long-running child gets a session of its own, so Ctrl-C in the terminal reaches
# only this script, which then stops the children in order (web, worker, Redis last so
# the worker can shut down cleanly). On Linux the children also get SIGTERM from the
# kernel if this script is killed without a chance to clean up (kill -9).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=$ROOT/.venv/bin/python
RUN=$ROOT/.run
HOST=127.0.0.1
PORT=${RUN_PORT:-8000}
# settings.py points the gateway's default upstream (the demo's fake LLM) at this port.
export RUN_PORT=$PORT

WEB_PID='' CELERY_PID='' REDIS_PID='' TAIL_PID='' SLEEP_PID='' CLEANING=''

say() { printf 'run: %s\n' "$*"; }
die() { printf 'run: %s\n' "$*" >&2; exit 1; }
# Never echo a Redis password to the terminal.
shown() { printf '%s' "$1" | sed -E 's#(://)[^@/]*@#\1***@#'; }

[ -x "$PY" ] || die ".venv/bin/python is missing: use 'make run', which creates .venv and installs requirements.txt."
mkdir -p "$RUN"

# --- process control ------------------------------------------------------------------

LAUNCH='
import ctypes, os, signal, sys
os.setsid()
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass  # not Linux: the EXIT trap of run.sh is the only guard
if os.getppid() != int(os.environ.pop("RUN_PARENT")):
    sys.exit("run: parent exited before the child started")
os.execvp(sys.argv[1], sys.argv[1:])
'
# spawn CMD...: start CMD in the background in its own session; its pid is $!.
spawn() { RUN_PARENT=$$ "$PY" -c "$LAUNCH" "$@" & }

# stop PID SECONDS: SIGTERM, wait up to SECONDS, then SIGKILL whatever is left in its group
# (pool processes, a stuck child).
stop() {
  local pid=$1 seconds=$2 i
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < seconds * 10; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  kill -KILL -- "-$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

cleanup() {
  [ -n "$CLEANING" ] && return
  CLEANING=1
  trap '' INT TERM HUP  # a second Ctrl-C must not cut the shutdown short (it is bounded)
  if [ -n "$WEB_PID$CELERY_PID$REDIS_PID" ]; then say "stopping..."; fi
  stop "$WEB_PID" 5
  stop "$CELERY_PID" 20  # warm shutdown: lets a running aggregation commit
  stop "$TAIL_PID" 1
  stop "$REDIS_PID" 5
  stop "$SLEEP_PID" 1
  if [ -n "$WEB_PID$CELERY_PID$REDIS_PID" ]; then say "stopped everything it started."; fi
}
trap cleanup EXIT
trap 'exit 0' INT TERM HUP

py_ok() { "$PY" -c "$@" >/dev/null 2>&1; }
redis_ok() {
  py_ok 'import sys, redis; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1, socket_timeout=1).ping()' "$1"
}
listening() {
  py_ok 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close()' "$1" "$2"
}
free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- preflight: the web port --------------------------------------------------------------

if listening "$HOST" "$PORT"; then
  die "something already listens on $HOST:$PORT (another 'make run'?). Stop it, or use another port: RUN_PORT=8001 make run"
fi

# --- Redis --------------------------------------------------------------------------------

export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
if redis_ok "$REDIS_URL"; then
  say "Redis: using $(shown "$REDIS_URL")"
elif command -v redis-server >/dev/null 2>&1; then
  redis_port=$(free_port) || die "could not find a free port for a private Redis"
  mkdir -p "$RUN/redis"
  say "Redis: nothing answers at $(shown "$REDIS_URL");" \
      "starting a private redis-server on 127.0.0.1:$redis_port (files in .run/redis/, nothing persisted)"
  spawn redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
    --dir "$RUN/redis" --logfile "$RUN/redis/redis.log"
  REDIS_PID=$!
  # Everything that would have used the dead Redis now uses the private one.
  export REDIS_URL="redis://127.0.0.1:$redis_port/0"
  for _ in $(seq 50); do redis_ok "$REDIS_URL" && break; sleep 0.2; done
  redis_ok "$REDIS_URL" || { tail -n 20 "$RUN/redis/redis.log" >&2; die "the private redis-server did not start (log above)"; }
  broker=${CELERY_BROKER_URL:-}
  if [ -z "$broker" ] || { [ "${broker#redis}" != "$broker" ] && ! redis_ok "$broker"; }; then
    [ -n "$broker" ] && say "Celery broker: $(shown "$broker") does not answer either; using the private Redis"
    export CELERY_BROKER_URL="redis://127.0.0.1:$redis_port/1"
  fi
  unset broker
else
  die "Redis is required and nothing answers at $(shown "$REDIS_URL"), and redis-server is not installed.
  Install it:  sudo apt-get install redis-server   (Debian/Ubuntu)
               brew install redis                  (macOS)
  then run 'make run' again (it starts a private Redis under .run/ by itself),
  or point REDIS_URL at a running Redis:  REDIS_URL=redis://HOST:6379/0 make run"
fi

# --- database and admin login -------------------------------------------------------------

"$PY" manage.py migrate --noinput || die "migrate failed (database: ${DATABASE_URL:-SQLite db.sqlite3}); see above"

# The password is generated once per checkout and kept in .run/admin_password (git-ignored);
# if the admin user exists with another password, it is reset to the stored one so that
# what we print always works.
admin_note=$("$PY" - <<'PYEOF'
import os
import secrets
from pathlib import Path

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django.setup()
from django.contrib.auth import get_user_model  # noqa: E402

path = Path(".run/admin_password")
password = path.read_text().strip() if path.exists() else ""
if not password:
    password = secrets.token_urlsafe(12)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
path.chmod(0o600)

User = get_user_model()
user = User.objects.filter(username="admin").first()
if user is None:
    User.objects.create_superuser(username="admin", email="", password=password)
    print("created")
elif user.check_password(password) and user.is_active and user.is_staff and user.is_superuser:
    print("reused")
else:
    user.set_password(password)
    user.is_active = user.is_staff = user.is_superuser = True
    user.save()
    print("existing user; password reset to the one in .run/admin_password")
PYEOF
) || die "could not create the admin user (see above)"
ADMIN_PASSWORD=$(cat "$RUN/admin_password")
say "admin login: $admin_note"

# The demo's gateway key: kept in .run/demo_gateway_key (git-ignored), its hash in the
# database; made once, re-used afterwards (project/demo/gateway_key.py).
"$PY" manage.py demo_gateway_key >/dev/null || die "could not create the demo gateway key (see above)"

# --- Celery worker + beat, then the web server --------------------------------------------

[ -f "$RUN/celery.log" ] && mv -f "$RUN/celery.log" "$RUN/celery.previous.log"
: >"$RUN/celery.log"
# Show the worker's log here too, each line marked (a Python follower rather than
# tail | awk: one process, which the kernel stops if this script dies).
FOLLOW='
import sys, time
with open(sys.argv[1], errors="replace") as log:
    line = ""
    while True:
        chunk = log.readline()
        if not chunk:
            time.sleep(0.2)
            continue
        line += chunk
        if line.endswith("\n"):
            sys.stdout.write("[celery] " + line)
            sys.stdout.flush()
            line = ""
'
spawn "$PY" -c "$FOLLOW" "$RUN/celery.log"
TAIL_PID=$!
spawn "$PY" -m celery -A project worker -B --schedule "$RUN/celerybeat-schedule" \
  --loglevel INFO --concurrency 2 --hostname "ragcache-demo@%h" --without-gossip --without-mingle \
  >>"$RUN/celery.log" 2>&1
CELERY_PID=$!

# uvicorn serves ASGI, so the gateway streams token by token (runserver is WSGI: it would
# deliver each stream whole). project/demo/asgi.py adds the admin's static files with
# Django's own ASGIStaticFilesHandler (no collectstatic, no extra package). No --reload:
# one process to stop; a short graceful shutdown so open streams never hold up Ctrl-C.
spawn "$PY" -m uvicorn project.demo.asgi:application --host "$HOST" --port "$PORT" --lifespan off \
  --timeout-graceful-shutdown 3 --log-level info
WEB_PID=$!

for _ in $(seq 150); do
  kill -0 "$WEB_PID" 2>/dev/null || die "the web server exited (see above)"
  kill -0 "$CELERY_PID" 2>/dev/null || die "the Celery worker exited (see .run/celery.log)"
  listening "$HOST" "$PORT" && grep -q ' ready\.' "$RUN/celery.log" && break
  sleep 0.2
done
listening "$HOST" "$PORT" || die "the web server did not start listening on $HOST:$PORT"
grep -q ' ready\.' "$RUN/celery.log" || say "the Celery worker is not ready yet; see .run/celery.log"

cat <<EOF

==============================================================================
 ragcache demo is running
   Demo page:  http://$HOST:$PORT/demo/
   Gateway:    http://$HOST:$PORT/v1  (OpenAI-compatible; demo key in .run/demo_gateway_key)
   Admin:      http://$HOST:$PORT/admin/
               username: admin
               password: $ADMIN_PASSWORD
               (kept in .run/admin_password; delete it to get a new one)
   Health:     http://$HOST:$PORT/ragcache/health    Metrics: http://$HOST:$PORT/metrics
   Redis:      $(shown "$REDIS_URL")$([ -n "$REDIS_PID" ] && printf ' (private, stopped on exit)')
   Celery:     worker + beat, log in .run/celery.log
 Press Ctrl-C to stop everything.
==============================================================================

EOF
"$PY" manage.py demo_gateway_key --snippet "http://$HOST:$PORT/v1" || say "could not print the gateway snippets"
echo

# Wait for a signal; if a child dies on its own, stop the others and fail.
while :; do
  for entry in "web server:$WEB_PID" "Celery worker:$CELERY_PID" ${REDIS_PID:+"private Redis:$REDIS_PID"}; do
    if ! kill -0 "${entry##*:}" 2>/dev/null; then
      say "the ${entry%:*} stopped unexpectedly; stopping the rest"
      exit 1
    fi
  done
  sleep 1 &
  SLEEP_PID=$!
  wait "$SLEEP_PID"  # returns at once when a signal arrives, so the trap runs without delay
  SLEEP_PID=
done
