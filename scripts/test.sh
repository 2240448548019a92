#!/usr/bin/env bash
# The whole test suite: starts (or installs) PostgreSQL, MariaDB and Redis if needed, then runs every test
# of the workspace with every feature, against those real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS= read -r line; do
  case "$line" in *=*) export "${line?}" ;; esac
done < <(bash scripts/services.sh)
exec cargo test --workspace --all-features "$@"
