#!/usr/bin/env bash
# Installs vsand and runs it on the built-in default config: one target on 127.0.0.1:3260,
# LUN 0 a 1 GiB sparse file under ./vsand-data, open to any initiator.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .
exec python3 -m vsand run "$@"
