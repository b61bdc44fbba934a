#!/usr/bin/env bash
# Equality look-ups on a searchable encrypted column, against the same look-up on an indexed
# plaintext column, over 1,000,000 rows of 100 organisations. A shortcut for
# `SCENARIOS=search benches/run.sh`; see run.sh for the options (SEARCH_ROWS, SEARCH_MODES, …).
set -euo pipefail
export SCENARIOS=search
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" "$@"
