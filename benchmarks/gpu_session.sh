#!/usr/bin/env bash
# Everything a GPU machine should run, in ONE call of at most 8 minutes:
#
#   bash benchmarks/gpu_session.sh OUT            # = python3 benchmarks/gpu_run.py OUT
#   bash benchmarks/gpu_session.sh OUT --dry-run  # the same steps on CPU (Triton interpreter)
#   OUT=DIR bash benchmarks/gpu_session.sh test   # (the former stage names still work: the whole run)
#
# The steps, their order and time limits, and the (at most 7) files written to OUT are described
# in benchmarks/gpu_run.py. It uses the machine's own torch and Triton ($PYTHON, else python3) and
# downloads nothing. Copy OUT's report.json / report.md to benchmarks/results/ and commit them.
set -u
case "${1:-}" in
  test|report|tuned)  # the former three stages (OUT=DIR ... test|report|tuned): now one run does all
    echo "gpu_session.sh: '$1' is no longer a stage of its own; running the whole GPU run into \$OUT" >&2
    shift
    set -- "${OUT:-}" "$@"
    ;;
esac
out=${1:-${OUT:-}}
if [ -z "$out" ]; then
  echo "usage: bash benchmarks/gpu_session.sh OUT [gpu_run.py options]" >&2
  exit 2
fi
shift || true
cd "$(dirname "$0")/.." || exit 2
exec "${PYTHON:-python3}" -u benchmarks/gpu_run.py "$out" "$@"
