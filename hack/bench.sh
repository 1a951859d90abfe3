#!/usr/bin/env bash
# Runs every benchmark with allocation counts; the figures in BENCHMARKS.md
# come from this command on the machine named there.
set -euo pipefail
cd "$(dirname "$0")/.."
go test -run '^$' -bench . -benchmem -count "${COUNT:-1}" ./... 2>&1 | tee .bench.log
