#!/usr/bin/env bash
# `make ui`: the Dagster UI (`dagster dev`: webserver + daemon) on http://127.0.0.1:3000 with
# workspace.yaml, against the demo database by default. Stop it with Ctrl-C.
#   - the port: if UI_HOST:UI_PORT is taken (another `make ui`?), exit 1 at once, saying so
#     (`dagster dev` would go on with the daemon and no UI);
#   - database: UI_DATABASE_URL, else the demo SQLite database var/demo/stockrx.db (the one
#     `make demo` uses), seeded with DEMO_ITEMS (100,000) items if it does not exist yet. An
#     STOCKRX_DATABASE_URL already in your shell is deliberately NOT used: the UI can launch
#     real runs, and the default must never be someone's real database;
#   - schedules and sensors start STOPPED (STOCKRX_AUTOMATION=off): a demo never starts a run by
#     itself (batch_expiry_update's schedule would make a real run at the next window). Turn
#     one on in the UI (Automation), or all of them with UI_AUTOMATION=on;
#   - DAGSTER_HOME: UI_DAGSTER_HOME, else var/dagster_home; its dagster.yaml is
#     `stockrx-patches instance-config` (the repo's dagster.yaml plus the run-queue limit of every
#     patch table), rewritten when that output changed (a new patch, an edited dagster.yaml).
#     `dagster dev` runs in that folder, so the repo's dagster.yaml (a template) is not in its
#     current folder to warn about;
#   - audit key for real runs: $STOCKRX_AUDIT_KEYS / $STOCKRX_AUDIT_KEY_FILE if set, else a demo
#     key in ~/.config/stockrx-patches/demo-audit.key (created if missing, as `make demo` does;
#     outside the repository, where key files are refused).
# Env: UI_DATABASE_URL, UI_HOST (127.0.0.1), UI_PORT (3000), DEMO_ITEMS (100000),
#      UI_AUTOMATION (off), UI_DAGSTER_HOME (var/dagster_home).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
DEMO_DIR=$ROOT/var/demo
DEMO_DB=$DEMO_DIR/stockrx.db
HOME_DIR=$(realpath -m "${UI_DAGSTER_HOME:-$ROOT/var/dagster_home}")  # must be absolute
HOST=${UI_HOST:-127.0.0.1}
PORT=${UI_PORT:-3000}
AUTOMATION=${UI_AUTOMATION:-off}
log() { echo "[ui] $*"; }
die() { echo "[ui] error: $*" >&2; exit 1; }

case "$AUTOMATION" in on|off) ;; *) die "UI_AUTOMATION must be on or off, got '$AUTOMATION'";; esac
# The port first, before seeding or writing anything: a taken port is a clear error, not a
# daemon running without its UI.
if ! "$VENV/bin/python" - "$HOST" "$PORT" <<'PY'
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
    try:
        s.bind((host, port))
    except OSError as e:
        print(f"{host}:{port}: {e.strerror}", file=sys.stderr)
        sys.exit(1)
PY
then
    die "port $PORT on $HOST is not free (another \`make ui\`?): stop what uses it, or choose another port: make ui UI_PORT=3001"
fi

mkdir -p "$DEMO_DIR" "$HOME_DIR"
url=${UI_DATABASE_URL:-sqlite:///$DEMO_DB}
if [ -z "${UI_DATABASE_URL:-}" ] && [ ! -s "$DEMO_DB" ]; then
    log "no demo database yet: seeding $DEMO_DB with ${DEMO_ITEMS:-100000} items"
    "$VENV/bin/stockrx-patches" seed-demo --database-url "$url" --items "${DEMO_ITEMS:-100000}"
fi

instance_config=$("$VENV/bin/stockrx-patches" instance-config)
if [ "$instance_config" != "$(cat "$HOME_DIR/dagster.yaml" 2>/dev/null)" ]; then
    printf '%s\n' "$instance_config" > "$HOME_DIR/dagster.yaml"
    log "wrote $HOME_DIR/dagster.yaml (stockrx-patches instance-config)"
fi

if [ -z "${STOCKRX_AUDIT_KEYS:-}" ] && [ -z "${STOCKRX_AUDIT_KEY_FILE:-}" ]; then
    # outside the repository: key files inside it are refused (patch_ops/audit/keys.py)
    demo_key=${XDG_CONFIG_HOME:-$HOME/.config}/stockrx-patches/demo-audit.key
    if [ ! -s "$demo_key" ]; then
        mkdir -p "$(dirname "$demo_key")"
        (umask 077; "$VENV/bin/python" -c "from patch_ops.audit import AuditKeyring; \
print(AuditKeyring.new_entry('demo'))" > "$demo_key")
    fi
    export STOCKRX_AUDIT_KEY_FILE=$demo_key
fi

export STOCKRX_DATABASE_URL=$url
export DAGSTER_HOME=$HOME_DIR
export STOCKRX_AUTOMATION=$AUTOMATION
export STOCKRX_UI_BASE_URL=${STOCKRX_UI_BASE_URL:-http://$HOST:$PORT}
safe_url=$("$VENV/bin/python" -c "import sys; from resources.database import redact_url; \
print(redact_url(sys.argv[1]))" "$url")
log "database: $safe_url"
log "DAGSTER_HOME: $DAGSTER_HOME"
log "schedules and sensors: $( [ "$AUTOMATION" = on ] && echo "running by default" || echo "stopped by default (turn one on in Automation, or UI_AUTOMATION=on)")"
log "UI: http://$HOST:$PORT  (Jobs → a patch → Launchpad; dry_run is true unless you say false)"
cd "$HOME_DIR"
exec "$VENV/bin/dagster" dev -h "$HOST" -p "$PORT" -w "$ROOT/workspace.yaml"
