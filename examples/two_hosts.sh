#!/usr/bin/env bash
# LoRA fine-tuning over two hosts as one JAX program (multi-controller): run this script on
# each host, with the same coordinator (process 0's address and a free port) and its own
# process id. The 2x8 mesh's batch axis spans the hosts (8 accelerators each) and tensor
# parallelism stays inside each: each host reads its own half of every global batch, and only
# process 0 writes logs and the adapter.
#
#   host A, 10.0.0.1:  examples/two_hosts.sh 10.0.0.1:1234 0
#   host B:            examples/two_hosts.sh 10.0.0.1:1234 1
#
# Arguments after the process id go to `python -m keras_tune.fit` and override the defaults
# below (the last of a repeated flag wins), e.g. `--preset gemma_7b_en --data imdb --steps 500`.
# Checkpoints are written by every process: keep --output-dir on storage both hosts see.
# Try it on one machine with simulated CPU devices (4 a process):
#
#   flags="--preset gemma_tiny --mesh 2x4 --simulate-devices 4 --steps 4 --data text --data-path notes.txt"
#   examples/two_hosts.sh 127.0.0.1:1234 0 $flags & examples/two_hosts.sh 127.0.0.1:1234 1 $flags
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 HOST:PORT PROCESS_ID [python -m keras_tune.fit flags...]" >&2
  exit 2
fi
coordinator=$1
process_id=$2
shift 2

exec "${PYTHON:-python}" -m keras_tune.fit \
  --coordinator "$coordinator" --num-processes 2 --process-id "$process_id" \
  --preset gemma2_9b_en --mesh 2x8 --data mtnt --output-dir runs/two_hosts \
  "$@"
