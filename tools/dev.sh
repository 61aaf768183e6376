#!/usr/bin/env bash
# One entry point for people and CI: sets up .venv from scratch when needed, then
#   bash tools/dev.sh test   -> ruff, mypy (strict, tests too), lint-imports (the layer contracts
#                               of pyproject.toml), then the whole pytest suite three ways: on the
#                               compiled codec (BATPAK_MP_REQUIRE_NATIVE=1: a broken build fails
#                               instead of falling back), on the pure-Python reference
#                               (BATPAK_MP_PURE=1), and the codec's agreement tests with the
#                               extension built under ASan/UBSan (tools/native_sanitize.sh)
#   bash tools/dev.sh test ARGS  -> the same checks, then only `pytest ARGS` on the compiled codec
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
    if [ "$#" -gt 0 ]; then
      BATPAK_MP_REQUIRE_NATIVE=1 .venv/bin/python -m pytest -q "$@"
      exit 0
    fi
    echo "== pytest, compiled codec" >&2
    BATPAK_MP_REQUIRE_NATIVE=1 .venv/bin/python -m pytest -q
    echo "== pytest, pure-Python codec (BATPAK_MP_PURE=1)" >&2
    BATPAK_MP_PURE=1 .venv/bin/python -m pytest -q
    echo "== codec agreement under ASan/UBSan" >&2
    bash tools/native_sanitize.sh
    ;;
  demo)
    exec .venv/bin/batpak-mp demo "$@"
    ;;
  *)
    echo "usage: bash tools/dev.sh test|demo [args...]" >&2
    exit 2
    ;;
esac
