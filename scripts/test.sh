#!/usr/bin/env bash
# The one command that runs dcron's whole test suite against real servers:
#   scripts/test.sh [cargo test args...]
# Installs what is missing, starts Redis / etcd / ZooKeeper / Consul on
# loopback (scripts/services.sh up), runs `cargo test`, and stops the servers
# again whatever happens.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SERVICES=$PWD/scripts/services.sh
export DCRON_TEST_DIR=${DCRON_TEST_DIR:-$PWD/.dcron-test}
mkdir -p "$DCRON_TEST_DIR"

# Two runs in one tree would share the servers, and the second `up` would
# stop the first run's ones: take turns. (fd 9 is closed for the children so
# that no server keeps the lock.)
exec 9>"$DCRON_TEST_DIR/test.lock"
if ! flock -n 9; then
    echo "[test.sh] another scripts/test.sh is running in this tree; waiting for it" >&2
    flock 9
fi

# Servers that this run's tests start are tagged with the session, so that
# its final `down` stops them (even if a test died without stopping them)
# and leaves alone those of someone running `cargo test` by hand meanwhile.
export DCRON_TEST_SESSION="test.sh-$$-$EPOCHSECONDS"

bash "$SERVICES" install 9>&-
trap 'bash "$SERVICES" down 9>&-' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
bash "$SERVICES" up 9>&- >/dev/null
# shellcheck source=/dev/null
source "$DCRON_TEST_DIR/env"
# A test whose server variable is missing fails instead of skipping.
export DCRON_REQUIRE_SERVICES=1
cargo test --workspace --all-features "$@" 9>&-
