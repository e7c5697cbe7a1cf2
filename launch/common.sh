# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this file
# Sourced by the launch/*.sh scripts: configuration read from environment variables, shell quoting,
# and `run`, which executes a command or, in a dry run, prints it.
#
# Every command a script would run is printed as one line, `+ ` followed by the command quoted so
# that it can be pasted back into a shell: with --dry-run (or DRY_RUN=1) on stdout instead of
# running it, otherwise on stderr just before it runs.

K15_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Fixed layout on every TPU VM worker, relative to the remote user's home directory.
readonly REMOTE_CODE_DIR="k15"       # the code: copied or cloned by setup.sh
readonly REMOTE_VENV_DIR="k15_venv"  # the virtual environment, kept when the code is replaced
readonly REMOTE_LOG_ROOT="k15_logs"  # <run name>/worker-<N>.log, written by worker.sh

readonly COMMON_ENV_HELP="Environment (all scripts):
  TPU_NAME          name of the TPU VM (the node), e.g. k15-v4-8
  ZONE              e.g. us-central2-b
  PROJECT           Google Cloud project id
  QUEUED=1          the TPU VM was (or is to be) requested as a queued resource
  QR_ID             queued resource id (default: TPU_NAME)
  DRY_RUN=1         same as --dry-run: print the commands instead of running them"

die() {
  echo "error: $*" >&2
  exit 1
}

warn() {
  echo "warning: $*" >&2
}

# require VAR...: fails with one message naming every variable that is unset or empty.
require() {
  local var missing=()
  for var in "$@"; do
    [[ -n "${!var:-}" ]] || missing+=("$var")
  done
  if ((${#missing[@]})); then
    die "missing environment variable(s): ${missing[*]} (see --help)"
  fi
}

# flag_on VAR: succeeds when VAR is 1/true/yes, fails when unset or 0/false/no, dies otherwise.
flag_on() {
  case "${!1:-}" in
    1 | true | yes) return 0 ;;
    '' | 0 | false | no) return 1 ;;
    *) die "$1 must be 1 or 0, got '${!1}'" ;;
  esac
}

# quote ARG: ARG as one shell word for a human to read and for sh or bash to parse: bare when
# that is safe, else in single quotes, or in double quotes when it holds single quotes and
# nothing that double quotes would expand. A --flag= prefix stays outside the quotes, as typed.
quote() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$' flag='^(--[A-Za-z0-9._-]+=)(.+)$'
  if [[ "$1" =~ $safe ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ $flag ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  elif [[ "$1" != *"'"* ]]; then
    printf "'%s'" "$1"
  elif [[ "$1" != *[\$\`\"\\!]* ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# quote_all ARG...: the arguments quoted and joined with single spaces.
quote_all() {
  local arg sep=""
  for arg in "$@"; do
    printf '%s' "$sep"
    quote "$arg"
    sep=" "
  done
}

# run CMD...: prints CMD; runs it unless this is a dry run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote_all "$@")"
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# default_runtime_version ACCELERATOR_TYPE: the TPU software version documented for JAX on that
# TPU generation (cloud.google.com/tpu/docs/runtimes); fails for an unknown generation.
default_runtime_version() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    *) return 1 ;;
  esac
}

# run_name: RUN_NAME, or the last component of WORKDIR; names the per-run log directory.
run_name() {
  local name="${RUN_NAME:-}"
  if [[ -z "$name" && -n "${WORKDIR:-}" ]]; then
    name="${WORKDIR%/}"
    name="${name##*/}"
  fi
  [[ -n "$name" ]] || die "missing environment variable(s): RUN_NAME or WORKDIR (see --help)"
  [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] ||
    die "RUN_NAME '$name' may only contain letters, digits, '.', '_' and '-'"
  echo "$name"
}

# Reads the variables every script needs and sets GCLOUD_FLAGS (zone and project, as a user types
# them after the resource name). Call after the script's own flags are parsed.
load_common_env() {
  if flag_on DRY_RUN; then DRY_RUN=1; else DRY_RUN=0; fi
  require TPU_NAME ZONE PROJECT
  if flag_on QUEUED; then QUEUED=1; else QUEUED=0; fi
  QR_ID="${QR_ID:-$TPU_NAME}"
  GCLOUD_FLAGS=("--zone=$ZONE" "--project=$PROJECT")
}

DRY_RUN="${DRY_RUN:-0}"
