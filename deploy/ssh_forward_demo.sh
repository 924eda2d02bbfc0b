#!/usr/bin/env bash
# The SSH local-forward recipe of README "Running on several machines", end to end on
# this machine: an sshd on 127.0.0.1 stands for the worker machine's SSH server, the
# worker listens on that machine's 127.0.0.1 only, and the training run reaches it
# through `ssh -N -L`, never through the worker's port itself.
#
#   deploy/ssh_forward_demo.sh          (needs sshd: Debian's openssh-server)
#
# Everything it starts listens on 127.0.0.1 and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SSHD=${SSHD:-/usr/sbin/sshd}
command -v "$SSHD" >/dev/null || { echo "error: $SSHD not found; install openssh-server to run this demo"; exit 2; }

tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
port() { "$PY" -c 'import portpicker; print(portpicker.pick_unused_port())'; }
SSH_PORT=$(port); WORKER_PORT=$(port); FORWARD_PORT=$(port)
DATA=(--num_writers=40 --median_examples=24 --data_seed=7 --cache_dir="$tmp/cache")

# The worker machine: its SSH server, and the worker on its loopback.
ssh-keygen -q -t ed25519 -N '' -f "$tmp/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/client_key"
cp "$tmp/client_key.pub" "$tmp/authorized_keys"
mkdir -p /run/sshd
"$SSHD" -D -e -f /dev/null -o ListenAddress=127.0.0.1 -o Port="$SSH_PORT" -o HostKey="$tmp/host_key" \
  -o AuthorizedKeysFile="$tmp/authorized_keys" -o StrictModes=no -o PasswordAuthentication=no \
  -o PidFile="$tmp/sshd.pid" 2>"$tmp/sshd.log" &
pids+=($!)
"$PY" -m experiments.worker --port="$WORKER_PORT" "${DATA[@]}" >"$tmp/worker.log" 2>&1 &
pids+=($!)
until grep -q "worker serving" "$tmp/worker.log"; do sleep 0.5; done
cat "$tmp/worker.log" | grep -E "serving|fingerprint"

# The coordinator: forward a local port to the worker machine's 127.0.0.1:WORKER_PORT.
ssh -N -i "$tmp/client_key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
  -o ExitOnForwardFailure=yes -p "$SSH_PORT" -L "127.0.0.1:$FORWARD_PORT:127.0.0.1:$WORKER_PORT" "$(id -un)@127.0.0.1" &
pids+=($!)
until "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $FORWARD_PORT), 1)" 2>/dev/null; do sleep 0.3; done
echo "forward 127.0.0.1:$FORWARD_PORT -> ssh 127.0.0.1:$SSH_PORT -> worker 127.0.0.1:$WORKER_PORT"

"$PY" -m experiments.train --workers="127.0.0.1:$FORWARD_PORT" "${DATA[@]}" --root_dir="$tmp/runs" \
  --clients_per_round=5 --rounds=3 --eval_every=3 --eval_clients=5 --model=linear
