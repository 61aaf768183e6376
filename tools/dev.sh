#!/usr/bin/env bash
# One entry point for people and CI: sets up .venv from scratch when needed, then
#   bash tools/dev.sh test   -> ruff, mypy (strict, tests too), lint-imports (the layer contracts
#                               of pyproject.toml), the whole pytest suite (tests/rules included)
#   bash tools/dev.sh demo   -> the demo (see README)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
cmd=${1:-test}
shift || true
case "$cmd" in
  test)
    .venv/bin/ruff check batpak_mp supervisor tests tools examples
    .venv/bin/mypy
    .venv/bin/lint-imports --no-cache --no-logo  # no cache: several runs may share one tree
    .venv/bin/python -m pytest -q "$@"
    ;;
  demo)
    exec .venv/bin/batpak-mp demo "$@"
    ;;
  *)
    echo "usage: bash tools/dev.sh test|demo [args...]" >&2
    exit 2
    ;;
esac
