#!/usr/bin/env bash
# Sets up everything p3b-fx needs on a fresh Debian machine: the offline dataset package and a
# virtual environment (.venv) with the pinned packages and the project itself (editable).
# Idempotent: a second run only checks. Usage: bash tools/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian package dataset-fashion-mnist" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
stamp=.venv/.p3b-setup-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    echo "setup: installing pinned packages into .venv (a few minutes on a fresh machine)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev,simplify]"
    rm -f .venv/.p3b-setup-*
    touch "$stamp"
fi
