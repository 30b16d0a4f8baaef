#!/usr/bin/env bash
# Runs the README's test command with no network but loopback: in a network namespace of its own, where only
# 127.0.0.1 answers (the GCS emulator the tests start listens there). A test that reached a package index, the
# Hugging Face hub or any other host would fail. Run it in the virtualenv the README's install made; extra
# arguments go to pytest. Needs util-linux's unshare and iproute2's ip, as root or with unprivileged user
# namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
# the README's test command: its pytest part (the installs before it need the network)
pytest_command=$(grep -m1 -o 'python -m pytest -q -n 2$' README.md)
# shellcheck disable=SC2086
exec unshare --net --map-root-user sh -c 'ip link set lo up && python -c "
import socket
try:
    socket.create_connection((\"pypi.org\", 443), timeout=5)
except OSError as error:
    print(\"no network but loopback:\", error)
else:
    raise SystemExit(\"the network is reachable: this run would prove nothing\")
" && exec "$@"' sh $pytest_command "$@"
