#!/usr/bin/env bash
# Instructions per request of the in-process path (tests/benches/instructions.rs), counted by
# callgrind: a bare axum handler, a protected first execution and a replay, on the memory store.
# Repeatable on a busy machine, unlike wall time. Usage: bash scripts/instructions.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
command -v valgrind >/dev/null 2>&1 || { echo "instructions: valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
bin=$(cargo bench -p idempotent-tests --bench instructions --no-run --message-format json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "instructions" and m.get("executable"):
        print(m["executable"])' | tail -n 1)
[ -x "$bin" ] || { echo "instructions: the benchmark did not build" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
declare -A total sha
for mode in bare first replay; do
  valgrind --tool=callgrind --callgrind-out-file="$out/$mode" --toggle-collect='instructions::measure' \
    "$bin" "$mode" "$n" >/dev/null 2>"$out/$mode.log"
  total[$mode]=$(awk '/^summary:/ {print $2; exit}' "$out/$mode")
  # SHA-256's compression function, as valgrind runs it (in software).
  sha[$mode]=$(callgrind_annotate --inclusive=yes "$out/$mode" 2>/dev/null \
    | awk '/sha2::sha256::compress256 \[/ && !done {gsub(",","",$1); print $1; done=1}')
done
printf 'instructions per request, %s requests each (callgrind, counted inside `measure`)\n' "$n"
printf '  %-28s %10s %12s %14s\n' "" "total" "of which SHA" "added to bare"
for mode in bare first replay; do
  t=$(( ${total[$mode]} / n )); s=$(( ${sha[$mode]:-0} / n )); b=$(( ${total[bare]} / n ))
  printf '  %-28s %10d %12d %14s\n' "$mode" "$t" "$s" "$([ "$mode" = bare ] && echo - || echo $(( t - b )))"
done
