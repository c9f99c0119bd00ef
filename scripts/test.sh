#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then runs it.
# Real clients are part of the suite: libiscsi (iscsi-test-cu), QEMU's iSCSI driver and tgt.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends libiscsi-bin qemu-utils qemu-block-extra tgt \
        nftables iproute2 >/dev/null
fi
python3 -m pip install -q -e '.[test]'
exec python3 -m pytest -q -p no:cacheprovider "$@"
