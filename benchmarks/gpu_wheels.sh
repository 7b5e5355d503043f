#!/usr/bin/env bash
# Download into .whl/ the wheels the H200 image lacks (run here, where PyPI is reachable; the H200 machine has no
# network): dqar's runtime dependencies and diffusers (the version installed in .venv), then, wheel by wheel, every
# need their METADATA names (markers for Python 3.12 on x86-64 Linux; `extra` needs skipped) that the image has no
# package for (benchmarks/gpu_image_packages.txt). One version of each package is kept. Fails if .whl/ plus the git
# working tree pass 64 MiB (what one device call may carry). Then: benchmarks/gpu_install.sh on the GPU machine.
# Usage: bash benchmarks/gpu_wheels.sh     (PY=python to use another interpreter; it needs pip and packaging)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WHEELS=.whl
LIMIT=$((64 * 1024 * 1024))
mkdir -p "$WHEELS"
for round in 1 2 3 4 5 6 7 8; do
  mapfile -t specs < <("$PY" benchmarks/gpu_wheels.py todo "$WHEELS")
  [ -z "${specs[*]}" ] && break
  for spec in "${specs[@]}"; do
    echo "download $spec"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "$spec"
  done
  "$PY" benchmarks/gpu_wheels.py prune "$WHEELS"
done
[ -n "$("$PY" benchmarks/gpu_wheels.py todo "$WHEELS")" ] && { echo "gpu_wheels: needs still unresolved after 8 rounds" >&2; exit 1; }
ls -l "$WHEELS"/*.whl 2>/dev/null | awk '{printf "  %s  %d bytes\n", $NF, $5}'
whl=$(cat "$WHEELS"/*.whl 2>/dev/null | wc -c)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((whl + tree))
echo "wheels $((whl / 1024)) KiB + working tree $((tree / 1024)) KiB = $((total / 1024)) KiB (limit $((LIMIT / 1024)) KiB)"
[ "$total" -le "$LIMIT" ] || { echo "gpu_wheels: $((total / 1024)) KiB is over the 64 MiB a device call may carry" >&2; exit 1; }
