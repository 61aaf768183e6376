#!/usr/bin/env bash
# One entry point for people and CI: sets up .venv from scratch when needed, then
#   bash tools/dev.sh test   -> ruff, mypy (strict, tests too), lint-imports (the layer contracts
#                               of pyproject.toml), then the whole pytest suite three ways: on the
#                               compiled codec (BATPAK_MP_REQUIRE_NATIVE=1: a broken build fails
#                               instead of falling back) and on the pure-Python reference
#                               (BATPAK_MP_PURE=1), the two side by side, and the codec's agreement tests with the
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
    # The two passes run side by side: the suite spends most of its time waiting (fsync,
    # child processes, sleeps), so two share 2 cores well (one after the other took ~16 min
    # on 2 cores; side by side ~10). Each has its own temporary root; the logs follow.
    runs=$(mktemp -d)
    echo "== pytest, compiled codec and pure-Python codec (BATPAK_MP_PURE=1), side by side" >&2
    set -m  # job control: a background job of a script otherwise starts with SIGINT ignored, which the
            # tests that interrupt a child (Ctrl-C) would inherit
    BATPAK_MP_REQUIRE_NATIVE=1 .venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 \
      --basetemp="$runs/native" > "$runs/native.log" 2>&1 &
    native=$!
    BATPAK_MP_PURE=1 .venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 \
      --basetemp="$runs/pure" > "$runs/pure.log" 2>&1 &
    pure=$!
    failed=0
    wait "$native" || failed=1
    wait "$pure" || failed=1
    set +m
    echo "== pytest, compiled codec" >&2
    cat "$runs/native.log"
    echo "== pytest, pure-Python codec (BATPAK_MP_PURE=1)" >&2
    cat "$runs/pure.log"
    rm -rf "$runs"
    if [ "$failed" -ne 0 ]; then
      echo "== pytest failed (see above)" >&2
      exit 1
    fi
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
