#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), install jaxprune on every worker and run the
# same `jaxprune train CONFIG ...` on all of them (JAXPRUNE_DISTRIBUTED=auto). See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [--dry-run] COMMAND [ARGS ...]

Commands:
  create                       gcloud compute tpus tpu-vm create (ACCELERATOR, RUNTIME)
  setup                        on every worker: clone/update REPO_URL@BRANCH into ~/jaxprune,
                               create ~/jaxprune-venv, pip install jax[tpu] and jaxprune
  train CONFIG [KEY=VALUE ...] on every worker: JAXPRUNE_DISTRIBUTED=auto jaxprune train ...
                               (CONFIG is a path inside the repo, e.g. configs/tiny.yaml);
                               the output of each worker goes to ~/jaxprune-train.log there
  run CONFIG [KEY=VALUE ...]   create + setup + train
  ssh [COMMAND ...]            run COMMAND on every worker (default: hostname)
  delete                       delete the TPU VM

Environment (defaults in brackets):
  TPU_NAME     [jaxprune-$USER]            ZONE        [us-central2-b]
  ACCELERATOR  [v4-16]                     RUNTIME     [tpu-ubuntu2204-base]
  PROJECT      [gcloud's default project]  SPOT        [0]  (1: --spot)
  REPO_URL     [this checkout's `git remote get-url origin`]  BRANCH [main]
  JAX_VERSION  [0.10.2]

--dry-run prints the gcloud commands instead of running them.

Checkpoints: every host writes its own shards, so checkpoint.dir must be storage that all
workers see (a shared filesystem: NFS/Filestore or a gcsfuse-mounted bucket; gs:// URLs are not
supported by jaxprune.checkpoint yet), e.g. checkpoint.dir=/mnt/shared/run1.

Example:
  TPU_NAME=prune-v4 ACCELERATOR=v4-16 launch/tpu_pod.sh run configs/tiny.yaml train.steps=200
EOF
}

dry_run=0
if [[ "${1:-}" == '--dry-run' ]]; then
  dry_run=1
  shift
fi
command="${1:-}"
if [[ -z "${command}" || "${command}" == '-h' || "${command}" == '--help' || "${command}" == 'help' ]]; then
  usage
  [[ -n "${command}" ]] && exit 0
  exit 2
fi
shift

TPU_NAME="${TPU_NAME:-jaxprune-${USER:-user}}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-16}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"
SPOT="${SPOT:-0}"
REPO_URL="${REPO_URL:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}"
BRANCH="${BRANCH:-main}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"

common=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then common+=(--project="${PROJECT}"); fi

run() {
  if [[ "${dry_run}" -eq 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# One remote command on every worker of the slice, in parallel (MaxText multihost_runner style).
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${common[@]}" --worker=all --command="$1"
}

do_create() {
  local extra=()
  if [[ "${SPOT}" == 1 ]]; then extra+=(--spot); fi
  run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${common[@]}" \
    --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}" "${extra[@]+"${extra[@]}"}"
}

do_setup() {
  local remote
  if [[ -z "${REPO_URL}" ]]; then
    echo 'error: REPO_URL is empty (this checkout has no origin); set REPO_URL=https://...git' >&2
    exit 2
  fi
  remote="set -euo pipefail
if [ -d ~/jaxprune/.git ]; then git -C ~/jaxprune fetch -q origin $(printf '%q' "${BRANCH}") && git -C ~/jaxprune checkout -q FETCH_HEAD;
else git clone -q --branch $(printf '%q' "${BRANCH}") $(printf '%q' "${REPO_URL}") ~/jaxprune; fi
python3 -m venv ~/jaxprune-venv
~/jaxprune-venv/bin/pip install -q -U pip
~/jaxprune-venv/bin/pip install -q 'jax[tpu]==${JAX_VERSION}' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
~/jaxprune-venv/bin/pip install -q -e ~/jaxprune
~/jaxprune-venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
  on_all_workers "${remote}"
}

do_train() {
  if [[ $# -lt 1 ]]; then
    echo 'error: train needs a CONFIG, e.g. configs/tiny.yaml' >&2
    exit 2
  fi
  local args remote
  args="$(printf '%q ' "$@")"
  # The same command on every host; jax.distributed.initialize() auto-detects the pod topology.
  remote="set -euo pipefail; cd ~/jaxprune && JAXPRUNE_DISTRIBUTED=auto ~/jaxprune-venv/bin/jaxprune train ${args}2>&1 | tee ~/jaxprune-train.log"
  on_all_workers "${remote}"
}

case "${command}" in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train "$@" ;;
  run)
    do_create
    do_setup
    do_train "$@"
    ;;
  ssh)
    if [[ $# -eq 0 ]]; then set -- hostname; fi
    on_all_workers "$*"
    ;;
  delete) run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${common[@]}" --quiet ;;
  *)
    echo "error: unknown command ${command@Q}" >&2
    usage >&2
    exit 2
    ;;
esac
