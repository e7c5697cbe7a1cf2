#!/usr/bin/env bash
# Deletes the TPU VM, or with QUEUED=1 the queued resource together with its TPU VM.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/delete.sh [--dry-run]

Deletes TPU_NAME without asking (--quiet). With QUEUED=1 deletes the queued resource QR_ID;
--force deletes its TPU VM first, as a queued resource with a live node cannot be deleted
otherwise. Checkpoints in a gs:// WORKDIR are kept; the workers' disks, logs included, are
not (fetch the logs first: launch/logs.sh --fetch).

$COMMON_ENV_HELP
EOF
}

while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

load_common_env
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$QR_ID" "${GCLOUD_FLAGS[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
fi
