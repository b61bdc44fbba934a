#!/usr/bin/env bash
# ORM look-ups only: the tenant look-up of an UPDATE by primary key with no tenant known, and the
# key draw of an INSERT leaving a row-bound bigserial key out. A shortcut for
# `SCENARIOS=orm benches/run.sh`; see run.sh for the options.
set -euo pipefail
export SCENARIOS=orm
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" "$@"
