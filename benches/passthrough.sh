#!/usr/bin/env bash
# Pass-through only: pgbench -S through nothing, pgbouncer and pgenvelope (with and without an
# engine). A shortcut for `SCENARIOS=passthrough benches/run.sh`; see run.sh for the options.
set -euo pipefail
export SCENARIOS=passthrough
export PT_TARGETS=${PT_TARGETS:-"direct pgbouncer pgenvelope pgenvelope-rules"}
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" "$@"
