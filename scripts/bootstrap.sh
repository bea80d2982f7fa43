# Sourced by scripts/serve and scripts/test: make .venv with the project installed.
# Usage: bootstrap_python [extra]   (extra: "test" installs the test dependencies too)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "error: Python >= 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

bootstrap_python() {
    local extra="${1:-}" stamp
    if [ ! -x "$VENV/bin/python" ]; then
        "$(find_python)" -m venv "$VENV"
    fi
    # Reinstall only when pyproject.toml (or the wanted extra) changed since the last run.
    stamp="$VENV/.installed-$(sha256sum <"$ROOT/pyproject.toml" | cut -c1-16)-${extra:-base}"
    if [ ! -f "$stamp" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet -e "$ROOT${extra:+[$extra]}"
        touch "$stamp"
    fi
}

# Install Debian packages that provide the given commands, when they are missing.
# Usage: need_commands command:package ...
need_commands() {
    local pair cmd pkg missing=()
    for pair in "$@"; do
        cmd="${pair%%:*}" pkg="${pair#*:}"
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "error: missing ${missing[*]}; install them (Debian: apt-get install -y ${missing[*]})" >&2
        return 1
    fi
    echo "installing ${missing[*]} (Debian packages) ..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
