#!/bin/sh
# Regenerate constraints.txt (the exact versions CI tests) from the packages installed in a venv.
# Usage: scripts/lock.sh [PYTHON] [OUT]   (defaults: .venv/bin/python constraints.txt; `make lock` runs it)
# Left out: evoprune itself (editable) and the two local model wheels the Makefile installs with --no-deps.
# A local build tag (torch's "+cpu") is dropped: "torch==2.13.0" is met by the CPU wheel on local disk and
# by a CUDA build of the same release on a GPU node.
set -eu
PY=${1:-.venv/bin/python}
OUT=${2:-constraints.txt}
TMP="$OUT.tmp.$$"
trap 'rm -f "$TMP"' EXIT
{
  echo "# Exact versions of every third-party package in the tested environment (pip constraints file)."
  echo "# \`make setup\` installs with -c constraints.txt, so Ray workers and fresh installs get these versions;"
  echo "# a constraint only pins a package when something requires it (pip install -c constraints.txt ...)."
  echo "# Frozen on $(uname -sm), $("$PY" -c 'import platform; print(platform.python_implementation(), platform.python_version())'), $(date -u +%Y-%m-%d)."
  echo "# Refresh: \`make clean && make setup CONSTRAINTS= && make test && make lock\` (newest versions pyproject allows),"
  echo "# or upgrade packages in .venv and run \`make lock\` (scripts/lock.sh). Do not edit by hand."
  "$PY" -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -viE '^(evoprune|llm[-_.]smollm2|gt[-_.]all[-_.]minilm[-_.]l6[-_.]v2)==' \
    | grep -vE '^(-e |#)| @ ' \
    | sed -E 's/^([^=]+==[^+]+)\+.*$/\1/' \
    | LC_ALL=C sort -f
} > "$TMP"
mv "$TMP" "$OUT"
trap - EXIT
echo "wrote $OUT ($(grep -vc '^#' "$OUT") pins)" >&2
