#!/usr/bin/env bash
# Streams one worker's log of a run started by run.sh, or copies every worker's log to this machine.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/logs.sh [--dry-run] [--worker=N] [--lines=N]
       launch/logs.sh [--dry-run] --fetch[=DIR]

Without --fetch: follows ~/$REMOTE_LOG_ROOT/RUN_NAME/worker-*.log on worker N (default 0, whose
process writes the metrics), starting with its last --lines lines (default 100).
Ctrl-C stops following; the run goes on.

--fetch: copies ~/$REMOTE_LOG_ROOT/RUN_NAME from all workers into DIR/RUN_NAME/ on this machine
(DIR defaults to ./$REMOTE_LOG_ROOT); each worker's file has its own name, so none overwrites
another.

$COMMON_ENV_HELP
  RUN_NAME          the run (default: the last component of WORKDIR)
  WORKDIR           as given to run.sh; only used to derive RUN_NAME
EOF
}

worker=0
lines=100
fetch_dir=""
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --worker=*) worker="${1#*=}" ;;
    --lines=*) lines="${1#*=}" ;;
    --fetch) fetch_dir="$REMOTE_LOG_ROOT" ;;
    --fetch=*) fetch_dir="${1#*=}" ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ "$worker" =~ ^[0-9]+$ ]] || die "--worker must be a worker index (0, 1, ...), got '$worker'"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$lines'"

load_common_env
run="$(run_name)"
remote_dir="$REMOTE_LOG_ROOT/$run"

if [[ -n "$fetch_dir" ]]; then
  run mkdir -p "$fetch_dir"
  run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$remote_dir" "$fetch_dir" --worker=all \
    "${GCLOUD_FLAGS[@]}"
  [[ "$DRY_RUN" == 1 ]] || echo "logs of $run are in $fetch_dir/$run/" >&2
else
  # A worker holds only its own log, so the glob finds it whatever id worker.sh gave it.
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker="$worker" "${GCLOUD_FLAGS[@]}" \
    --command="tail -n $lines -F $remote_dir/worker-*.log"
fi
