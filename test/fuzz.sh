#!/usr/bin/env bash
# Runs every fuzz target of the module for a short time (FUZZTIME, default
# 5s): the seeds always run under go test; this explores a little beyond
# them on every CI run. A crasher is written to the package's
# testdata/fuzz/FuzzX/ directory and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-5s}
go=${GO:-go}
n=0
for pkg in $($go list ./...); do
	dir=$($go list -f '{{.Dir}}' "$pkg")
	grep -qs '^func Fuzz' "$dir"/*_test.go || continue
	for target in $($go test -list '^Fuzz' "$pkg" | grep '^Fuzz'); do
		echo "fuzz: $pkg $target ($fuzztime)"
		if ! $go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg" >/tmp/doppel-fuzz.$$ 2>&1; then
			# On a loaded machine the fuzz deadline can expire while the
			# workers still run the seed corpus ("context deadline
			# exceeded", no failing input): that is not a finding, retry once.
			if grep -q 'context deadline exceeded' /tmp/doppel-fuzz.$$ && ! grep -q 'Failing input' /tmp/doppel-fuzz.$$; then
				echo "fuzz: $target: deadline hit during warm-up, retrying"
				$go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg" >/tmp/doppel-fuzz.$$ 2>&1 || {
					cat /tmp/doppel-fuzz.$$; rm -f /tmp/doppel-fuzz.$$; exit 1; }
			else
				cat /tmp/doppel-fuzz.$$; rm -f /tmp/doppel-fuzz.$$; exit 1
			fi
		fi
		n=$((n + 1))
	done
done
rm -f /tmp/doppel-fuzz.$$
echo "fuzz: $n targets, $fuzztime each, no failure"
