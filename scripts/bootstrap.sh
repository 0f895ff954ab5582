#!/usr/bin/env bash
# Idempotent environment setup, for a fresh machine (CI: root, clean clone) or a dev box.
#   - creates .venv with python3 (>= 3.11) if it is missing or broken;
#   - runs `pip install -e '.[dev]'` only when pyproject.toml changed since the last successful
#     install (sha256 stamp in .venv/.stockrx-install-stamp); otherwise a fast no-op.
#   - as root with apt-get, installs Debian's `chromium` if missing (the browser test in
#     tests/stockrx_patches/test_ui.py; it skips without it), Debian's `postgresql` server if no initdb is
#     found and Debian's `mariadb-server` (MariaDB 10.11) if no mariadbd is found (the tests start
#     throwaway servers), and `openssl` if missing (the test MariaDB's TLS certificate). Failure to
#     install is a warning, not an error.
# Env: PYTHON=python3.12 (interpreter for a new venv), BOOTSTRAP_FORCE=1 (reinstall anyway),
#      BOOTSTRAP_NO_CHROMIUM=1 (never install chromium).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv
STAMP="$VENV/.stockrx-install-stamp"
log() { echo "[bootstrap] $*"; }
die() { echo "[bootstrap] ERROR: $*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

# Serialize concurrent runs (two `make test` at once) so they don't both pip install.
if command -v flock >/dev/null 2>&1; then
    exec 9>"${TMPDIR:-/tmp}/stockrx-bootstrap-$(id -u)-$(pwd | cksum | cut -d' ' -f1).lock"
    flock 9
fi

find_python() {
    local c
    for c in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
        if command -v "$c" >/dev/null 2>&1 && py_ok "$c"; then command -v "$c"; return 0; fi
    done
    return 1
}

# 1. The virtualenv.
if [ -x "$VENV/bin/python" ] && py_ok "$VENV/bin/python"; then
    :
else
    if [ -e "$VENV" ]; then
        log "$VENV exists but its python is missing, broken or < 3.11: recreating it"
        rm -rf "$VENV"
    fi
    if ! PY=$(find_python); then
        if is_root && command -v apt-get >/dev/null 2>&1; then
            log "no python >= 3.11 found: apt-get install -y python3 python3-venv"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv
            PY=$(find_python) || die "python >= 3.11 still not found after apt-get install"
        else
            die "python >= 3.11 not found (set PYTHON=/path/to/python3.11)"
        fi
    fi
    log "creating $VENV with $PY ($("$PY" -V 2>&1))"
    if ! "$PY" -m venv "$VENV"; then
        rm -rf "$VENV"
        if is_root && command -v apt-get >/dev/null 2>&1; then
            log "venv failed (Debian without python3-venv?): apt-get install -y python3-venv"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
            "$PY" -m venv "$VENV" || die "cannot create $VENV with $PY"
        else
            die "cannot create $VENV with $PY (install the venv module, e.g. python3-venv)"
        fi
    fi
fi

# 1b. Headless Chromium for the UI browser test: only as root with apt-get, only when missing.
# With a CJK font (fonts-noto-cjk): without one, Japanese text renders as boxes in screenshots.
if [ -z "${BOOTSTRAP_NO_CHROMIUM:-}" ] && is_root && command -v apt-get >/dev/null 2>&1 \
        && { ! command -v chromium >/dev/null 2>&1 || ! dpkg -s fonts-noto-cjk >/dev/null 2>&1; }; then
    log "chromium or fonts-noto-cjk missing: apt-get install -y chromium fonts-noto-cjk (for tests/stockrx_patches/test_ui.py; once)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk; } \
            >/tmp/stockrx-bootstrap-chromium.log 2>&1; then
        log "WARNING: could not install chromium (see /tmp/stockrx-bootstrap-chromium.log):" \
            "the browser test will be skipped"
    fi
fi

# 1c. PostgreSQL server binaries for the tests' throwaway server (tests/support/postgres.py):
# installed here, once, rather than by each parallel test worker.
have_pg() {
    command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
if [ -z "${STOCKRX_TEST_PG_URL:-}" ] && ! have_pg && is_root && command -v apt-get >/dev/null 2>&1; then
    log "PostgreSQL server missing: apt-get install -y postgresql (for the tests; once)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } \
            >/tmp/stockrx-bootstrap-postgresql.log 2>&1; then
        log "WARNING: could not install postgresql (see /tmp/stockrx-bootstrap-postgresql.log)"
    fi
fi

# 1d. MariaDB server binaries for the tests' throwaway MySQL-compatible server
# (tests/support/mysql.py). mariadbd lives in /usr/sbin, often not on a non-root PATH.
have_mariadb() {
    command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]
}
if [ -z "${STOCKRX_TEST_MYSQL_URL:-}" ] && ! have_mariadb && is_root && command -v apt-get >/dev/null 2>&1; then
    log "MariaDB server missing: apt-get install -y mariadb-server (for the tests; once)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server; } \
            >/tmp/stockrx-bootstrap-mariadb.log 2>&1; then
        log "WARNING: could not install mariadb-server (see /tmp/stockrx-bootstrap-mariadb.log)"
    fi
fi
# openssl makes the test MariaDB's certificate, so it offers TLS as MySQL 8 does (without it the
# server offers none and the test of a URL that requires TLS skips).
if [ -z "${STOCKRX_TEST_MYSQL_URL:-}" ] && ! command -v openssl >/dev/null 2>&1 && is_root \
        && command -v apt-get >/dev/null 2>&1; then
    log "openssl missing: apt-get install -y openssl (the test MariaDB's TLS certificate)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl; } \
            >/tmp/stockrx-bootstrap-openssl.log 2>&1; then
        log "WARNING: could not install openssl (see /tmp/stockrx-bootstrap-openssl.log)"
    fi
fi

# 2. The project and its dev dependencies, only when pyproject.toml changed.
want=$("$VENV/bin/python" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
have=$(cat "$STAMP" 2>/dev/null || true)
if [ "$want" = "$have" ] && [ -z "${BOOTSTRAP_FORCE:-}" ]; then
    log "$VENV up to date (pyproject.toml unchanged since last install): nothing to do"
    exit 0
fi
if [ -z "$have" ]; then reason="no install stamp yet"; else reason="pyproject.toml changed"; fi
[ -n "${BOOTSTRAP_FORCE:-}" ] && reason="BOOTSTRAP_FORCE set"
log "$reason: $VENV/bin/python -m pip install -e '.[dev]'"
t0=$(date +%s)
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -e '.[dev]'
# `pip check` cannot see integrations that fail on import (see notes): import them.
log "checking imports (dagster, dagster_postgres, dagster_slack, sqlalchemy, psycopg, pymysql)"
"$VENV/bin/python" -c 'import dagster, dagster_postgres, dagster_slack, sqlalchemy, psycopg, pymysql' \
    || die "installed packages fail to import"
echo "$want" > "$STAMP"
log "installed in $(( $(date +%s) - t0 ))s; stamp written to $STAMP"
