#!/usr/bin/env bash
# Runs on each TPU VM worker, called over ssh by launch/run.sh: starts one command in the
# background, detached from the ssh session, with its output in ~/k15_logs/RUN/worker-N.log, or
# stops it. Runs from the code directory (~/k15) so that `python -m k15.main` finds the package.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/worker.sh start RUN_NAME [--restart] [--attach] -- COMMAND...
       launch/worker.sh stop RUN_NAME

start  runs COMMAND with the virtual environment's bin/ first on PATH, output appended to
       $K15_LOG_ROOT/RUN_NAME/worker-N.log, in a new session under nohup so that it outlives
       the ssh connection. Refuses if RUN_NAME is already running on this worker, unless
       --restart (which stops it first). --attach runs in the foreground instead, output
       also on stdout (via tee).
stop   sends SIGTERM to the run's process group, SIGKILL to what is left after 30 s.

Environment:
  K15_VENV       virtual environment (default ~/k15_venv)
  K15_LOG_ROOT   log directory (default ~/k15_logs)
  TPU_WORKER_ID  this worker's index; read from the TPU VM metadata server when unset
EOF
}

die() {
  echo "error: $*" >&2
  exit 1
}

# This worker's index in the slice: the TPU metadata attribute that JAX itself reads, falling
# back to the host name so the log file name is unique either way.
worker_id() {
  local id
  if [[ -n "${TPU_WORKER_ID:-}" ]]; then
    echo "$TPU_WORKER_ID"
  elif id="$(curl -sf -m 2 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null)" && [[ "$id" =~ ^[0-9]+$ ]]; then
    echo "$id"
  else
    hostname
  fi
}

# group_alive PGID: whether any process of the group is still running (zombies, which init may be
# slow to reap, do not count).
group_alive() {
  ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

running_pid() {
  local pid
  [[ -f "$pid_file" ]] || return 1
  pid="$(<"$pid_file")"
  [[ "$pid" =~ ^[0-9]+$ ]] && group_alive "$pid" && echo "$pid"
}

stop_run() {
  local pid i
  if ! pid="$(running_pid)"; then
    echo "worker $id: $run is not running"
    return 0
  fi
  # The supervisor leads its own process group (setsid), so this reaches python and tee too.
  kill -TERM -- "-$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    group_alive "$pid" || break
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pid_file"
  echo "=== $(date -u +%FT%TZ) worker $id: stopped" >>"$log"
  echo "worker $id: stopped $run (pid $pid)"
}

# Internal: the detached process. Records its own pid (the process group id) and the exit status.
if [[ "${1:-}" == _supervise ]]; then
  log="$2" pid_file="$3"
  shift 3
  echo "$$" >"$pid_file"
  status=0
  "$@" >>"$log" 2>&1 || status=$?
  echo "=== $(date -u +%FT%TZ) exited with status $status" >>"$log"
  rm -f "$pid_file"
  exit "$status"
fi

(($# >= 1)) || { usage >&2; exit 2; }
case "$1" in
  -h | --help) usage; exit 0 ;;
  start | stop) action="$1" ;;
  *) die "unknown action '$1' (see --help)" ;;
esac
(($# >= 2)) || die "missing RUN_NAME (see --help)"
run="$2"
shift 2
restart=0
attach=0
while (($#)); do
  case "$1" in
    --restart) restart=1 ;;
    --attach) attach=1 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

id="$(worker_id)"
log_dir="${K15_LOG_ROOT:-$HOME/k15_logs}/$run"
log="$log_dir/worker-$id.log"
pid_file="$log_dir/worker-$id.pid"
mkdir -p "$log_dir"

if [[ "$action" == stop ]]; then
  stop_run
  exit 0
fi

(($#)) || die "missing COMMAND after '--' (see --help)"
if pid="$(running_pid)"; then
  ((restart)) || die "worker $id: $run is already running (pid $pid); pass --restart to replace it"
  stop_run
fi

venv="${K15_VENV:-$HOME/k15_venv}"
if [[ -d "$venv/bin" ]]; then
  export VIRTUAL_ENV="$venv"
  export PATH="$venv/bin:$PATH"
fi
# Without a terminal, python would hold its output in a buffer and the log would lag.
export PYTHONUNBUFFERED=1

echo "=== $(date -u +%FT%TZ) worker $id ($(hostname)) starts in $PWD: $(printf '%q ' "$@")" >>"$log"
if ((attach)); then
  "$@" 2>&1 | tee -a "$log"
  exit "${PIPESTATUS[0]}"
fi
setsid nohup bash "${BASH_SOURCE[0]}" _supervise "$log" "$pid_file" "$@" \
  </dev/null >/dev/null 2>&1 &
echo "worker $id: started $run in the background, log: $log"
