#!/usr/bin/env bash
# The test command of the README (via `make test`): formatting, vet, then
# every Go test verbosely. Kernel and end-to-end tests need root; when run as
# root (as CI does) a skipped privileged test is a failure, so that a green
# run always means the kernel paths were exercised.
set -euo pipefail
cd "$(dirname "$0")/.."

unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change:"; echo "$unformatted"; exit 1
fi
./hack/step.sh "go vet (compiles every package: about 3 minutes on a first run, seconds later)" -- go vet ./...
./hack/step.sh "staticcheck (honnef.co/go/tools v0.8.2)" -- go run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

# deploy/'s tests need kubectl; testenv/build-k8s.sh builds one where the
# machine has none.
if ! command -v kubectl >/dev/null 2>&1 && [ -x testenv/.cache/bin/kubectl ]; then
  export KUBECTL="$PWD/testenv/.cache/bin/kubectl"
fi

log=.test.log
set +e
./hack/step.sh "running every test (about 7 minutes on 2 cores, compiling the test binaries included)" -- \
  go test -count=1 -v -timeout 30m ./... 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# Bounded fuzzing of the parsers that face untrusted input: request
# decoding (the wire contract and the whole ingest handler), the static
# endpoints file, and the durable state read back after a crash (a
# corrupted write-ahead log, journal records, checkpoint bodies).
# FUZZTIME=0 skips it.
#
# The budget is a count of executions per target, not a duration: with a
# duration, Go 1.26's fuzzing coordinator can fail a clean run with
# "context deadline exceeded" when the deadline fires while a worker is
# mid-call (go.dev/issue/75804, fixed in Go 1.27). A count has no deadline
# to race. 10,000 executions take 3-15 s per target on 2 cores.
#
# Inputs that find new coverage are not minimized (-fuzzminimizetime 0):
# minimizing runs the target uncounted for up to a minute per input and
# sometimes ends in "fuzzing process hung or terminated unexpectedly while
# minimizing"; a crasher is still written, only unminimized.
#
# The targets' temporary files go to a tmpfs where there is one: the log
# fuzzer writes and fsyncs a log per input.
fuzztime=${FUZZTIME:-10000x}
if [ "$fuzztime" != "0" ] && [ "$status" -eq 0 ]; then
  fuzztmp=""
  if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    fuzztmp=$(mktemp -d /dev/shm/kubezonnet-fuzz.XXXXXX)
    trap 'rm -rf "$fuzztmp"' EXIT
  fi
  for target in "FuzzDecode ./internal/wire" "FuzzIngest ./server" "FuzzParseStaticEndpoints ./server/resolve" \
    "FuzzLogReplay ./server/state" "FuzzReplay ./server/aggregate" "FuzzRestore ./server/aggregate"; do
    set -- $target
    # Quiet: the output is shown whole on failure (a crasher's input path
    # and the failure), its last line on success. The first run compiles
    # the package and its dependencies again with coverage instrumentation.
    if ! TMPDIR=${fuzztmp:-${TMPDIR:-/tmp}} ./hack/step.sh --quiet "fuzzing $1 in $2 (budget $fuzztime)" -- \
      go test -run '^$' -fuzz "^$1\$" -fuzztime "$fuzztime" -fuzzminimizetime 0 "$2"; then
      status=1
    fi
  done
fi

passed=$(grep -c -- '^\s*--- PASS' "$log" || true)
failed=$(grep -c -- '^\s*--- FAIL' "$log" || true)
skipped=$(grep -c -- '^\s*--- SKIP' "$log" || true)
if [ "$(id -u)" -eq 0 ] && grep -q 'SKIP-PRIVILEGED' "$log"; then
  echo "privileged tests were skipped although running as root:"
  grep -B1 'SKIP-PRIVILEGED' "$log" | grep -- '--- SKIP' || true
  status=1
fi
echo "tests: ${passed} passed, ${failed} failed, ${skipped} skipped"
exit "$status"
