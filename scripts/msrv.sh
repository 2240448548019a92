#!/usr/bin/env bash
# Checks that the workspace's declared `rust-version` is at least what every locked dependency
# declares, so the MSRV in Cargo.toml is true. Fails (exit 1) naming the dependencies that need a
# newer Rust. Needs cargo and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
cargo metadata --format-version 1 --all-features --locked --filter-platform "$host" | python3 -c '
import json, sys

def parse(v):
    return tuple(int(x) for x in (v.split(".") + ["0", "0"])[:3])

meta = json.load(sys.stdin)
members = set(meta["workspace_members"])
declared = {p["name"]: p.get("rust_version") for p in meta["packages"] if p["id"] in members}
ours = {v for v in declared.values() if v}
if len(ours) != 1:
    sys.exit("msrv: workspace members declare {} rust-version; expected one".format(sorted(ours) or "no"))
msrv = ours.pop()
above = sorted(
    (parse(p["rust_version"]), p["name"], p["version"])
    for p in meta["packages"]
    if p["id"] not in members and p.get("rust_version") and parse(p["rust_version"]) > parse(msrv)
)
if above:
    for need, name, version in above:
        print("msrv: {} {} needs Rust {}".format(name, version, ".".join(map(str, need))), file=sys.stderr)
    sys.exit(f"msrv: the declared rust-version {msrv} is lower than the locked dependencies need")
print(f"msrv: rust-version {msrv} covers every locked dependency")
'
