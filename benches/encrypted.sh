#!/usr/bin/env bash
# Encrypted workload only. A shortcut for `SCENARIOS=encrypted benches/run.sh`; see run.sh.
set -euo pipefail
export SCENARIOS=encrypted
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" "$@"
