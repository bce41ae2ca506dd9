#!/usr/bin/env bash
# Run one jaxprune job as N JAX processes on this machine (CPU, simulated devices per process),
# joined by jax.distributed through a coordinator on 127.0.0.1. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh [-n PROCS] [-d DEVICES] [-p PORT] [-l LOG_DIR] CONFIG [KEY=VALUE ...]
       launch/local_multiprocess.sh [options] -e COMMAND [ARG ...]

Starts PROCS processes (default 2), each with DEVICES simulated CPU devices (default 4), so the
job sees PROCS*DEVICES devices across PROCS processes -- the same code path as a multi-host
TPU/GPU run. Every process gets:
  JAX_PLATFORMS=cpu  XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES
  JAXPRUNE_COORDINATOR=127.0.0.1:PORT  JAXPRUNE_NUM_PROCESSES=PROCS  JAXPRUNE_PROCESS_ID=i
and runs `jaxprune train CONFIG KEY=VALUE ...` (or, with -e, COMMAND ARG ...).

Options:
  -n PROCS     number of processes (default 2)
  -d DEVICES   simulated CPU devices per process (default 4)
  -p PORT      coordinator port (default: a random free port)
  -l LOG_DIR   per-process logs proc<i>.log (default: a new temp dir)
  -e           treat the arguments as a command instead of a config for `jaxprune train`
  -h           this help

Process 0's output is shown live; all logs stay in LOG_DIR. If any process fails, the others are
stopped, the tail of the failing log is printed and the exit status is non-zero.
Environment: JAXPRUNE_BIN (default: jaxprune) is the command used for `train`.

Example:
  launch/local_multiprocess.sh -n 2 -d 4 configs/tiny.yaml run_dir=runs/tiny-2proc
EOF
}

procs=2
devices=4
port=''
log_dir=''
exec_mode=0
if [[ "${1:-}" == '--help' ]]; then usage; exit 0; fi
while getopts ':n:d:p:l:eh' opt; do
  case "${opt}" in
    n) procs="${OPTARG}" ;;
    d) devices="${OPTARG}" ;;
    p) port="${OPTARG}" ;;
    l) log_dir="${OPTARG}" ;;
    e) exec_mode=1 ;;
    h) usage; exit 0 ;;
    :) echo "error: -${OPTARG} needs a value" >&2; usage >&2; exit 2 ;;
    *) echo "error: unknown option -${OPTARG}" >&2; usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -lt 1 ]]; then
  echo 'error: pass a CONFIG (or -e COMMAND)' >&2
  usage >&2
  exit 2
fi
for v in procs devices; do
  if ! [[ "${!v}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: ${v}=${!v} must be a positive integer" >&2
    exit 2
  fi
done

if [[ -z "${port}" ]]; then
  # A random port nobody listens on (bash's /dev/tcp connect fails on a closed port).
  for _ in $(seq 1 50); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then break; fi
  done
fi
if [[ -z "${log_dir}" ]]; then
  log_dir="$(mktemp -d -t jaxprune-local-XXXXXX)"
fi
mkdir -p "${log_dir}"

if [[ "${exec_mode}" -eq 1 ]]; then
  cmd=("$@")
else
  cmd=("${JAXPRUNE_BIN:-jaxprune}" train "$@")
fi

pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "${pid}" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "local_multiprocess: ${procs} processes x ${devices} CPU devices, coordinator 127.0.0.1:${port}, logs in ${log_dir}" >&2
for ((i = 0; i < procs; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
  JAXPRUNE_COORDINATOR="127.0.0.1:${port}" \
  JAXPRUNE_NUM_PROCESSES="${procs}" \
  JAXPRUNE_PROCESS_ID="${i}" \
    "${cmd[@]}" >"${log_dir}/proc${i}.log" 2>&1 &
  pids+=("$!")
done

# Show process 0 live; stop following when it exits.
tail -n +1 -f "${log_dir}/proc0.log" --pid="${pids[0]}" 2>/dev/null &
tail_pid=$!

status=0
failed=()
remaining=("${!pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  still=()
  for i in "${remaining[@]}"; do
    if kill -0 "${pids[i]}" 2>/dev/null; then
      still+=("${i}")
    else
      rc=0
      wait "${pids[i]}" || rc=$?
      if [[ "${rc}" -ne 0 ]]; then
        failed+=("${i}:${rc}")
        status="${rc}"
      fi
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  if [[ ${#failed[@]} -gt 0 ]]; then
    break  # one process died: the others would wait for it forever
  fi
  if [[ ${#remaining[@]} -gt 0 ]]; then sleep 0.2; fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  cleanup
  kill "${tail_pid}" 2>/dev/null || true
  wait 2>/dev/null || true
  for f in "${failed[@]}"; do
    i="${f%%:*}"
    echo "local_multiprocess: process ${i} exited with status ${f#*:}; last lines of ${log_dir}/proc${i}.log:" >&2
    tail -n 40 "${log_dir}/proc${i}.log" >&2
  done
  exit "${status}"
fi
wait "${tail_pid}" 2>/dev/null || true
echo "local_multiprocess: all ${procs} processes finished; logs in ${log_dir}" >&2
