#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers and canonicalisers (tests/fuzz, cargo fuzz and libFuzzer;
# see docs/fuzzing.md). Builds every target once in release mode, with overflow checks, then runs
# each one in turn from its committed seeds and its working corpus. A crash or a failed property
# fails the script and names the input that shows it.
#
#   bash scripts/fuzz.sh                       # the short run of scripts/test.sh: 5 s per target
#   bash scripts/fuzz.sh --long                # the campaign: 10 minutes per target, AddressSanitizer
#   bash scripts/fuzz.sh --time 60 json_canonical   # 60 s, one target
#
# Options: --time SECONDS (per target), --long (600 s and `--sanitizer address`), --sanitizer
# none|address, then target names (default: every file in tests/fuzz/fuzz_targets). Each run's
# libFuzzer output is in tests/fuzz/runs/<target>.log, the inputs it found in tests/fuzz/runs/<target>/.
#
# Toolchain: the nightly one when rustup has it; otherwise stable, where `-s none` needs nothing
# more and AddressSanitizer needs RUSTC_BOOTSTRAP=1 (set here) and the sanitizer runtime that
# stable's standard library ships on x86_64 Linux. cargo-fuzz is installed from crates.io when
# missing. When fuzzing cannot run at all (no rustup, no C++ compiler for libFuzzer, cargo-fuzz
# cannot be installed) the script says so loudly and skips, or fails when CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

fuzz_dir=tests/fuzz
seconds=5
sanitizer=none
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --long) seconds=600; sanitizer=address ;;
    --time) seconds="${2:?--time needs a number of seconds}"; shift ;;
    --sanitizer) sanitizer="${2:?--sanitizer needs none or address}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "fuzz: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1") ;;
  esac
  shift
done
if [ ${#targets[@]} -eq 0 ]; then
  for file in "$fuzz_dir"/fuzz_targets/*.rs; do
    targets+=("$(basename "$file" .rs)")
  done
fi
case "$sanitizer" in
  none|address) ;;
  *) echo "fuzz: --sanitizer is none or address, not $sanitizer" >&2; exit 2 ;;
esac
for target in "${targets[@]}"; do
  if [ ! -f "$fuzz_dir/fuzz_targets/$target.rs" ]; then
    echo "fuzz: no target $target (the targets are the files in $fuzz_dir/fuzz_targets)" >&2
    exit 2
  fi
done

cannot_run() {
  echo "" >&2
  echo "################################################################################" >&2
  echo "fuzz: CANNOT FUZZ: $*" >&2
  echo "fuzz: the fuzz targets did NOT run." >&2
  echo "################################################################################" >&2
  if [ "${CI:-}" = "true" ]; then
    exit 1
  fi
  exit 0
}

command -v rustup >/dev/null 2>&1 || cannot_run "rustup is not installed (cargo fuzz selects a toolchain through it)"
command -v c++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 ||
  cannot_run "no C++ compiler (c++, clang++ or g++) to build libFuzzer"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io" >&2
  cargo install cargo-fuzz --locked --quiet || cannot_run "cargo install cargo-fuzz --locked failed"
fi

# FUZZ_TOOLCHAIN=stable tries the path of a machine without nightly.
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
  toolchain=$FUZZ_TOOLCHAIN
elif rustup toolchain list | grep -q '^nightly'; then
  toolchain=nightly
else
  toolchain=stable
fi
if [ "$toolchain" != nightly ]; then
  if [ "$sanitizer" != none ]; then
    # The stable compiler takes -Zsanitizer only with this; its std ships the runtime.
    export RUSTC_BOOTSTRAP=1
    host=$(rustc "+$toolchain" -vV | sed -n 's/^host: //p')
    if ! ls "$(rustc "+$toolchain" --print sysroot)/lib/rustlib/$host/lib/"librustc-*_rt.asan.a >/dev/null 2>&1; then
      echo "fuzz: the $toolchain toolchain ships no AddressSanitizer runtime for $host; fuzzing without it" >&2
      sanitizer=none
    fi
  fi
fi

# One build for every target; the runs below reuse it. A sanitized build lives in a target
# directory of its own, so switching between the short run and the campaign rebuilds nothing.
build=(--fuzz-dir "$fuzz_dir" --release --debug-assertions --sanitizer "$sanitizer")
if [ "$sanitizer" != none ]; then
  build+=(--target-dir "$fuzz_dir/target/$sanitizer")
fi
echo "fuzz: building every target (cargo +$toolchain fuzz, sanitizer $sanitizer)" >&2
start=$SECONDS
mkdir -p "$fuzz_dir/runs"
if ! cargo "+$toolchain" fuzz build "${build[@]}" >"$fuzz_dir/runs/build.log" 2>&1; then
  grep -v -E '^ *(Compiling|Downloaded|Downloading) ' "$fuzz_dir/runs/build.log" | tail -n 60 >&2
  echo "fuzz: the fuzz targets do not build (the whole log: $fuzz_dir/runs/build.log)" >&2
  exit 1
fi
echo "fuzz: built in $((SECONDS - start)) s" >&2

status=0
for target in "${targets[@]}"; do
  work="$fuzz_dir/runs/$target"
  seeds="$fuzz_dir/corpus/$target"
  log="$fuzz_dir/runs/$target.log"
  mkdir -p "$work" "$seeds"
  args=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1)
  if [ -f "$fuzz_dir/dict/$target.dict" ]; then
    args+=(-dict="$fuzz_dir/dict/$target.dict")
  fi
  # New inputs go to the first corpus directory: the working one, never the committed seeds.
  if cargo "+$toolchain" fuzz run "${build[@]}" "$target" "$work" "$seeds" -- "${args[@]}" >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
    cov=$(sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([^ ]*\) .*/cov \1, features \2, corpus \3/p' <<<"$last")
    echo "fuzz: $target: ${runs:-?} runs in $seconds s, $cov, no failure" >&2
  else
    status=1
    echo "fuzz: $target FAILED:" >&2
    grep -m 1 -A 4 'panicked at' "$log" >&2 || true
    echo "fuzz: the end of $log:" >&2
    grep -v -E '^#[0-9]+.*(NEW|REDUCE|pulse)' "$log" | tail -n 30 >&2
  fi
done
echo "fuzz: build and runs took $((SECONDS - start)) s" >&2
exit $status
