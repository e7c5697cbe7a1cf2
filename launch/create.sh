#!/usr/bin/env bash
# Creates the TPU VM, directly or as a queued resource (QUEUED=1), and waits until it is usable.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/create.sh [--dry-run] [--no-wait] [-- EXTRA_GCLOUD_FLAGS...]

Creates TPU_NAME with 'gcloud compute tpus tpu-vm create', or with QUEUED=1 requests it with
'gcloud compute tpus queued-resources create' and polls 'describe' until the request is ACTIVE
(--no-wait returns at once). Flags after '--' go to the create command unchanged, e.g.
'-- --reserved' or '-- --network=my-net'.

$COMMON_ENV_HELP
  ACCELERATOR_TYPE  e.g. v4-8, v5litepod-8, v5p-64, v6e-8
  RUNTIME_VERSION   TPU software version (default from ACCELERATOR_TYPE: v4 and older
                    tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                    v6e v2-alpha-tpuv6e)
  SPOT=1            Spot VM: cheaper, can be preempted at any time
  PREEMPTIBLE=1     preemptible TPU VM (not with QUEUED=1; use SPOT=1 there)
  POLL_SECONDS      seconds between queued resource state checks (default 30)
EOF
}

wait_for_queued=1
extra=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --no-wait) wait_for_queued=0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

load_common_env
require ACCELERATOR_TYPE
if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  RUNTIME_VERSION="$(default_runtime_version "$ACCELERATOR_TYPE")" ||
    die "no default TPU software version for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION"
fi

pricing=()
if flag_on SPOT && flag_on PREEMPTIBLE; then
  die "set one of SPOT=1 and PREEMPTIBLE=1, not both"
elif flag_on SPOT; then
  pricing=(--spot)
elif flag_on PREEMPTIBLE; then
  ((QUEUED == 0)) || die "PREEMPTIBLE=1 does not apply to queued resources; use SPOT=1"
  pricing=(--preemptible)
fi

if ((QUEUED == 0)); then
  # Returns once the node is READY.
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${pricing[@]+"${pricing[@]}"} ${extra[@]+"${extra[@]}"}
  exit 0
fi

run gcloud compute tpus queued-resources create "$QR_ID" "${GCLOUD_FLAGS[@]}" \
  --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
  --runtime-version="$RUNTIME_VERSION" \
  ${pricing[@]+"${pricing[@]}"} ${extra[@]+"${extra[@]}"}
((wait_for_queued)) || exit 0

# The request waits in a queue (WAITING_FOR_RESOURCES, PROVISIONING) until capacity is free,
# possibly for hours; the node can be used once the request is ACTIVE.
describe=(gcloud compute tpus queued-resources describe "$QR_ID" "${GCLOUD_FLAGS[@]}"
  "--format=value(state.state)")
if ((DRY_RUN)); then
  run "${describe[@]}"
  exit 0
fi
while true; do
  # A failed describe (a network blip during an hours-long wait) is retried, not fatal.
  state="$(run "${describe[@]}")" || state="unknown (describe failed)"
  case "$state" in
    ACTIVE)
      echo "queued resource $QR_ID is ACTIVE: TPU VM $TPU_NAME is ready" >&2
      exit 0
      ;;
    FAILED | SUSPENDING | SUSPENDED | DELETING)
      die "queued resource $QR_ID is $state; see 'gcloud compute tpus queued-resources describe $QR_ID --zone=$ZONE --project=$PROJECT'"
      ;;
  esac
  echo "$(date -u +%H:%M:%S) queued resource $QR_ID is ${state:-unknown}; checking again in ${POLL_SECONDS:-30}s" >&2
  sleep "${POLL_SECONDS:-30}"
done
