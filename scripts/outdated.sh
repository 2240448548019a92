#!/usr/bin/env bash
# Lists the direct dependencies of the workspace's crates that are a major version behind the
# newest stable release on crates.io (for 0.x crates the minor is the major). Information for a
# maintainer, never a CI failure: the registry moves under us. Needs cargo, python3 and curl.
#
#   bash scripts/outdated.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --no-deps | python3 -c '
import json, re, sys, subprocess

def index_path(name):
    n = name.lower()
    if len(n) <= 2:
        return f"{len(n)}/{n}"
    if len(n) == 3:
        return f"3/{n[0]}/{n}"
    return f"{n[:2]}/{n[2:4]}/{n}"

def parse(v):
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)$", v)
    return tuple(int(x) for x in m.groups()) if m else None

def major(v):
    # Cargo compatibility: 1.x.y -> (1,), 0.x.y -> (0, x), 0.0.z -> (0, 0, z).
    if v[0] > 0:
        return (v[0],)
    if v[1] > 0:
        return (0, v[1])
    return v

def required(req):
    m = re.search(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", req)
    if not m:
        return None
    return tuple(int(x) if x else 0 for x in m.groups())

meta = json.load(sys.stdin)
deps = {}
for pkg in meta["packages"]:
    for d in pkg["dependencies"]:
        if d.get("source") and d["source"].startswith("registry+"):
            deps.setdefault(d["name"], set()).add(d["req"])

rows = []
for name in sorted(deps):
    raw = subprocess.run(["curl", "-fsS", "--max-time", "20", "https://index.crates.io/" + index_path(name)],
                         capture_output=True, text=True)
    if raw.returncode != 0:
        rows.append((name, ", ".join(sorted(deps[name])), "?", "registry did not answer"))
        continue
    versions = []
    for line in raw.stdout.splitlines():
        entry = json.loads(line)
        v = parse(entry["vers"])
        if v and not entry.get("yanked"):
            versions.append(v)
    if not versions:
        continue
    latest = max(versions)
    for req in sorted(deps[name]):
        have = required(req)
        if have and major(have) < major(latest):
            rows.append((name, req, ".".join(map(str, latest)), "behind"))

if not rows:
    print("every direct dependency is on the newest stable major")
else:
    print("{:<24} {:<14} {:<14}".format("crate", "required", "newest stable"))
    for name, req, latest, note in rows:
        print("{:<24} {:<14} {:<14} {}".format(name, req, latest, "" if note == "behind" else note))
'
