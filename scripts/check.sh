#!/usr/bin/env bash
# The checks that are not tests: formatting, lints, docs as docs.rs builds them, a declared MSRV
# no lower than any locked dependency declares (no older toolchain can be installed here to build
# with it), packaging, and no unused dependencies. Run by CI before the test suite; each failure names its cause.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "check: $*" >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path tests/fuzz/Cargo.toml -- --check

step "cargo clippy (all targets, all features, warnings are errors)"
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings

step "every feature of the published crates alone, warning-free (cargo check per feature)"
for spec in \
  "idempotent-core:sqlite postgres mysql redis tls testing utoipa" \
  "idempotent-axum:sqlite postgres mysql redis tls utoipa" \
  "idempotent-actix:sqlite postgres mysql redis tls utoipa" \
  "idempotent-nats:sqlite postgres mysql redis" \
  "idempotent-rabbitmq:sqlite postgres mysql redis"; do
  crate=${spec%%:*}
  for feature in "" ${spec#*:}; do
    out=$(cargo check -q -p "$crate" --no-default-features ${feature:+--features "$feature"} --message-format short 2>&1 || true)
    if echo "$out" | grep -qE '^(warning|error)|: (warning|error)'; then
      echo "$out" >&2
      echo "check: $crate with ${feature:-no} feature(s) does not build warning-free" >&2
      exit 1
    fi
  done
done

step "cargo doc (all features, warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --quiet

step "rust-version covers every locked dependency"
bash scripts/msrv.sh

step "the published crates package (cargo package, without the demo and the tests)"
cargo package --workspace --exclude payments-demo --exclude idempotent-tests --no-verify --allow-dirty --quiet

step "no unused dependencies (cargo-machete)"
if ! command -v cargo-machete >/dev/null 2>&1; then
  cargo install cargo-machete --locked --quiet
fi
cargo machete
