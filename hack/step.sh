#!/usr/bin/env bash
# step.sh runs one phase of `make demo` or `make test` so that a newcomer
# never waits in silence: it names the phase, and while the command prints
# nothing it says every 15 seconds that the phase is still running and for
# how long. At the end it says how long the phase took.
#
#   hack/step.sh [--count WHAT | --quiet] LABEL -- COMMAND [ARG...]
#
# Without an option the command's output passes through as it comes. With
# --count its output (e.g. `go build -v`, one line per package compiled) is
# kept aside and counted instead, the count shown in the progress lines as
# "N WHAT"; with --quiet it is kept aside and only its last line shown at
# the end. Either way the whole output is printed when the command fails.
# A build that finds everything cached ends within a second and says so.
set -euo pipefail

count=""
quiet=0
if [[ "${1:-}" == "--count" ]]; then
	count="$2"
	shift 2
elif [[ "${1:-}" == "--quiet" ]]; then
	quiet=1
	shift
fi
label="$1"
shift
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then
	echo "step.sh: no command for \"$label\"" >&2
	exit 2
fi

# counted prints how many lines of the log are not the go command's own
# notes ("go: downloading ..."): with `go build -v`, the packages compiled.
counted() { grep -vc '^go: ' "$log" || true; }

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
start=$SECONDS
echo "==> $label" >&2

# The command runs in the background with its output in $log; a reader
# copies new lines to stdout as they come (pass-through mode), and the loop
# below watches the log's size to tell whether it has been quiet.
"$@" >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; rm -f "$log"' EXIT
trap 'exit 130' INT TERM
if [[ -z "$count" && $quiet == 0 ]]; then
	tail -n +1 -f --pid "$pid" "$log" &
fi

last_size=0
quiet_since=$SECONDS
last_note=$SECONDS
while kill -0 "$pid" 2>/dev/null; do
	sleep 1
	size=$(stat -c %s "$log")
	if [[ -z "$count" && $quiet == 0 && $size != "$last_size" ]]; then
		last_size=$size
		quiet_since=$SECONDS
		continue
	fi
	if ((SECONDS - quiet_since >= 15 && SECONDS - last_note >= 15)); then
		last_note=$SECONDS
		if [[ -n "$count" ]]; then
			echo "    ... $label: $(counted) $count, $((SECONDS - start))s" >&2
		else
			echo "    ... $label: still running, $((SECONDS - start))s" >&2
		fi
	fi
done
rc=0
wait "$pid" || rc=$?
wait 2>/dev/null || true # the pass-through reader ends with the command
trap - EXIT INT TERM

elapsed=$((SECONDS - start))
if [[ $rc != 0 ]]; then
	if [[ -n "$count" || $quiet == 1 ]]; then
		cat "$log" >&2
	fi
	rm -f "$log"
	echo "==> $label: failed (exit $rc) after ${elapsed}s" >&2
	exit "$rc"
fi
if [[ -n "$count" ]]; then
	n=$(counted)
	if [[ $n == 0 ]]; then
		echo "    $label: done in ${elapsed}s (everything from the Go build cache)" >&2
	else
		echo "    $label: done in ${elapsed}s ($n $count, the rest from the Go build cache)" >&2
	fi
elif [[ $quiet == 1 ]]; then
	echo "    $label: done in ${elapsed}s: $(grep . "$log" | tail -1)" >&2
else
	echo "    $label: done in ${elapsed}s" >&2
fi
rm -f "$log"
