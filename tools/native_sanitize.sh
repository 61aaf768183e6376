#!/usr/bin/env bash
# The C codec under AddressSanitizer and UndefinedBehaviorSanitizer:
#   bash tools/native_sanitize.sh [pytest args...]
# builds batpak_mp/_native/_codec.c with -fsanitize=address,undefined into a copy of the
# package in a temporary directory (the normal in-place build in the tree is not touched),
# then runs tests/unit/test_native_agrees.py against that build with libasan preloaded
# (python itself is not instrumented) and PYTHONMALLOC=malloc (so every Python object is a
# malloc block ASan can see the edges of: a read past a bytes object is caught).
# Exits non-zero when the build fails, a test fails, or any sanitizer report appears (ASan
# writes reports to files, so one from a subprocess counts too; UBSan's are read from the
# output). CPython "leaks" at exit by
# design, so leak detection is off. BATPAK_MP_NATIVE_EXAMPLES=N sets hypothesis examples.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
CC=${CC:-gcc}
SRC=${BATPAK_MP_NATIVE_SRC:-$ROOT/batpak_mp/_native/_codec.c}  # another source: to prove this catches a planted bug
WORK=$(mktemp -d "${TMPDIR:-/tmp}/batpak-native-sanitize.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

cp -r "$ROOT/batpak_mp" "$ROOT/tests" "$ROOT/pyproject.toml" "$WORK/"
find "$WORK" \( -name '__pycache__' -o -name '.hypothesis' \) -prune -exec rm -rf {} +
rm -f "$WORK"/batpak_mp/_native/_codec*.so

INCLUDE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
SHA=$(sha256sum "$SRC" | cut -d' ' -f1)
cp "$SRC" "$WORK/batpak_mp/_native/_codec.c"  # the loader checks the build against the source beside it
"$CC" -shared -fPIC -std=c11 -Wall -Wextra -Werror -DBATPAK_MP_CODEC_SHA256="\"$SHA\"" \
  -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g \
  -I"$INCLUDE" "$SRC" -o "$WORK/batpak_mp/_native/_codec$SUFFIX"

LIBASAN=$("$CC" -print-file-name=libasan.so)
[ -e "$LIBASAN" ] || { echo "native_sanitize: $CC has no libasan.so ($LIBASAN)" >&2; exit 2; }
REPORTS="$WORK/sanitizer-report"
export LD_PRELOAD="$LIBASAN"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$REPORTS"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$REPORTS"
export PYTHONMALLOC=malloc
export BATPAK_MP_REQUIRE_NATIVE=1  # a build that does not load fails, never falls back
unset BATPAK_MP_PURE

cd "$WORK"  # python puts the working directory first on sys.path: the copy is what imports
"$PY" -c '
import sys
import batpak_mp._native as native
import batpak_mp._native._codec as codec
assert codec.__file__.startswith(sys.argv[1] + "/"), f"imported {codec.__file__}, not the sanitized build"
assert native.BACKEND == "native", native.UNAVAILABLE
print("native_sanitize: testing", codec.__file__)
' "$WORK"

# --capture=sys: pytest must not swallow fd 2, where UBSan (combined with ASan it ignores
# log_path) writes its report before it stops the process
LOG="$WORK/pytest.log"
set +e
"$PY" -m pytest -q -p no:cacheprovider --capture=sys tests/unit/test_native_agrees.py "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
if compgen -G "$REPORTS*" >/dev/null || grep -qE "runtime error:|ERROR: AddressSanitizer|SUMMARY: [A-Za-z]+Sanitizer" "$LOG"; then
  echo "native_sanitize: sanitizer reports:" >&2
  cat "$REPORTS"* 2>/dev/null >&2 || true
  grep -E -A12 "runtime error:|ERROR: AddressSanitizer" "$LOG" >&2 || true
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "native_sanitize: tests failed (exit $status)" >&2
  exit "$status"
fi
echo "native_sanitize: clean (ASan + UBSan, no reports)"
