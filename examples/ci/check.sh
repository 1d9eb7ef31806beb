#!/usr/bin/env bash
# Run `lcbench check` and turn its exit code (README "Exit codes (for CI)") into the CI verdict, with
# a line saying which kind of failure it was. Arguments go to `lcbench check` unchanged.
#   usage: bash check.sh [lcbench check options]     e.g. bash check.sh --baseline results/baselines
set -uo pipefail
lcbench check "$@"
code=$?
case "$code" in
  0)       echo "lcbench check passed: every run matches its baseline." ;;
  1)       echo "lcbench check FAILED: a run regressed, is incomplete or failed (see the table and reasons above)." >&2 ;;
  2)       echo "lcbench check could not run: bad input (baseline folder, flags, spec); the message above names the fix." >&2 ;;
  130|143) echo "lcbench check was stopped by a signal; re-run it to resume." >&2 ;;
  *)       echo "lcbench check crashed (exit $code): a bug, see the traceback above." >&2 ;;
esac
exit "$code"
