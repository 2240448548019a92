#!/usr/bin/env bash
# The whole test suite: a short fuzzing run of the parsers (scripts/fuzz.sh, a few seconds per
# target), then starts (or installs) PostgreSQL, MariaDB and Redis if needed and runs every test
# of the workspace with every feature, against those real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fuzz.sh
while IFS= read -r line; do
  case "$line" in *=*) export "${line?}" ;; esac
done < <(bash scripts/services.sh)
exec cargo test --workspace --all-features "$@"
