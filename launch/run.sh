#!/usr/bin/env bash
# Runs `python -m k15.main` on all workers of the TPU VM at once, in the background, one log per
# worker. Relaunching after a preemption or a crash is the same command: k15.main resumes from the
# latest checkpoint in WORKDIR.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/run.sh [--dry-run] [--restart] [--attach] [--] K15_MAIN_ARGS...
       launch/run.sh [--dry-run] --stop

Runs on every worker (gcloud compute tpus tpu-vm ssh --worker=all):
  K15_DISTRIBUTED=1 python -m k15.main K15_MAIN_ARGS... --workdir=\$WORKDIR
from ~/$REMOTE_CODE_DIR in ~/$REMOTE_VENV_DIR (see setup.sh), detached from the ssh session, output
appended to ~/$REMOTE_LOG_ROOT/RUN_NAME/worker-N.log on each worker (see logs.sh).
K15_DISTRIBUTED=1 makes k15 call jax.distributed.initialize(), which finds the other workers
by itself on a TPU VM.

Preemption: k15.main resumes from the latest checkpoint in WORKDIR, so after a preemption
recreate the TPU VM (delete.sh, create.sh, setup.sh) and run the same command again. Use a
gs:// WORKDIR: a worker's disk does not survive a preemption and is not shared between workers.

  --restart   stop RUN_NAME first if it is still running (otherwise a second start is refused)
  --attach    stay in the foreground and stream every worker's output (Ctrl-C stops the run)
  --stop      stop RUN_NAME on all workers

Example:
  WORKDIR=gs://my-bucket/k15/qwen-1.5b launch/run.sh --config=configs/tiny_cpu.py

$COMMON_ENV_HELP
  WORKDIR           checkpoints, metrics and outputs (gs://bucket/path for multi-host)
  RUN_NAME          names the log directory (default: the last component of WORKDIR)
  COMPILATION_CACHE_DIR
                    JAX's persistent compilation cache, passed as
                    --config.compilation_cache_dir (default: \$WORKDIR/xla_cache; "" = off)
  LIBTPU_INIT_ARGS  XLA TPU flags for the workers (default: the collective/compute overlap
                    flags of launch/README.md; "" = none)
EOF
}

# Collectives overlapped with compute; launch/README.md ("XLA flags") says what each flag does.
DEFAULT_LIBTPU_INIT_ARGS="--xla_tpu_enable_async_collective_fusion=true
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
--xla_tpu_enable_async_collective_fusion_multiple_steps=true
--xla_tpu_overlap_compute_collective_tc=true
--xla_enable_async_all_gather=true
--xla_tpu_enable_data_parallel_all_reduce_opt=true
--xla_tpu_data_parallel_opt_different_sized_ops=true"

action=start
worker_flags=()
main_args=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --restart | --attach) worker_flags+=("$1") ;;
    --stop) action=stop ;;
    --workdir | --workdir=*) die "set WORKDIR in the environment instead of passing $1" ;;
    --) shift; main_args+=("$@"); break ;;
    *) main_args+=("$1") ;;
  esac
  shift
done

load_common_env
run="$(run_name)"

if [[ "$action" == stop ]]; then
  remote="cd $REMOTE_CODE_DIR && bash launch/worker.sh stop $(quote "$run")"
else
  require WORKDIR
  [[ "$WORKDIR" == gs://* ]] ||
    warn "WORKDIR=$WORKDIR is on each worker's own disk: checkpoints are not shared between workers and are lost with a preempted VM; use gs://"
  # The cache lives next to the checkpoints by default: a VM recreated after a preemption finds
  # the executables there instead of compiling again, which a worker's own disk would not allow.
  cache_dir="${COMPILATION_CACHE_DIR-${WORKDIR%/}/xla_cache}"
  cache_args=()
  if [[ -n "$cache_dir" && " ${main_args[*]-} " != *" --config.compilation_cache_dir="* ]]; then
    cache_args=("--config.compilation_cache_dir=$cache_dir")
  fi
  command=(python -m k15.main ${main_args[@]+"${main_args[@]}"}
           ${cache_args[@]+"${cache_args[@]}"} "--workdir=$WORKDIR")
  libtpu_args="${LIBTPU_INIT_ARGS-$DEFAULT_LIBTPU_INIT_ARGS}"
  libtpu_args="${libtpu_args//$'\n'/ }"
  remote="cd $REMOTE_CODE_DIR && K15_DISTRIBUTED=1"
  [[ "$libtpu_args" != *"'"* ]] || die "LIBTPU_INIT_ARGS may not contain a single quote"
  [[ -z "$libtpu_args" ]] || remote+=" LIBTPU_INIT_ARGS='$libtpu_args'"
  remote+=" bash launch/worker.sh start $(quote "$run")"
  remote+=" $(quote_all ${worker_flags[@]+"${worker_flags[@]}"} -- "${command[@]}")"
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_FLAGS[@]}" \
  --command="$remote"
