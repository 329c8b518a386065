#!/usr/bin/env bash
# Set up everything a fresh machine needs, then run the service or the tests.
#   ./dev.sh up [ppml-serve up options]   serve the demo model (managed TLS Redis, dev certs, local KMS)
#   ./dev.sh test [pytest options]         ruff, mypy, the Rust checks, the docs site and the test suite (starts its own servers)
set -euo pipefail
cd "$(dirname "$0")"

VENV=${PPML_VENV:-.venv}

need_redis() {
    if command -v redis-server >/dev/null 2>&1; then return; fi
    echo "installing redis-server (Debian package)..." >&2
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
}

need_rust() {
    if command -v cargo >/dev/null 2>&1; then return; fi
    echo "error: cargo not found: the native data plane (native/) is Rust; install the Rust" \
         "toolchain (rustup, or Debian's cargo >= 1.88)" >&2
    exit 1
}

need_venv() {  # $1: what to install (the service alone, or with the test tools); $2: its marker
    local spec=$1 marker="$VENV/.installed-${2}"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    # pyproject.toml or the Rust crate changed since: install (and build) again
    if [ ! -f "$marker" ] || [ pyproject.toml -nt "$marker" ] \
            || [ -n "$(find native -newer "$marker" \( -name '*.rs' -o -name 'Cargo.*' \) \
                       -not -path '*/target/*' -print -quit)" ]; then
        echo "installing $spec and its dependencies into $VENV..." >&2
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install -q -e "$spec"
        touch "$marker"
    fi
}

need_checkov() {  # the Kubernetes policy checker, in a venv of its own (pinned dependencies)
    local marker=.venv-checkov/.installed
    if [ ! -f "$marker" ] || [ deploy/checkov-requirements.txt -nt "$marker" ]; then
        echo "installing checkov into .venv-checkov..." >&2
        python3 -m venv .venv-checkov
        .venv-checkov/bin/python -m pip install -q --upgrade pip >/dev/null
        .venv-checkov/bin/python -m pip install -q -r deploy/checkov-requirements.txt
        touch "$marker"
    fi
}

command=${1:-}
shift || true
case "$command" in
    up)
        need_redis
        need_rust
        need_venv . run
        exec "$VENV/bin/ppml-serve" up "$@"
        ;;
    test)
        need_redis
        need_rust
        need_venv '.[dev,convert]' dev
        need_checkov
        "$VENV/bin/ruff" check src tests scripts
        "$VENV/bin/mypy"
        NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --quiet --site-dir "$(mktemp -d)"
        (cd native && cargo fmt --check && cargo clippy --all-targets -q -- -D warnings \
            && cargo test -q -p ppml-core -p ppml-front \
            && (cd fuzz && cargo fmt --check) && fuzz/run.sh "${PPML_FUZZ_SECONDS:-10}")
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        sed -n '2,4p' "$0" >&2
        exit 2
        ;;
esac
