#!/usr/bin/env bash
# Puts the code on every worker of the TPU VM and installs it: ~/k15 (code) and ~/k15_venv.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/setup.sh [--dry-run]

On all workers (--worker=all): replaces ~/$REMOTE_CODE_DIR with the code, creates the virtual
environment ~/$REMOTE_VENV_DIR on first use (Python PYTHON_VERSION, fetched by uv because the
TPU images ship an older python3) and runs pip install -e '.[tpu]' gcsfs in it (gcsfs: the
gs:// file system that the checkpoints and the compilation cache in a gs:// WORKDIR are written
through).

The code is, by default, the local checkout as it is now: committed files plus uncommitted edits
to tracked files (git stash create), packed with git archive and copied with
'gcloud compute tpus tpu-vm scp'. Untracked files are not copied. With REPO_URL set, each
worker clones the repository instead.

Run it again after editing the code; the virtual environment is kept, so it is quick.

$COMMON_ENV_HELP
  LOCAL_DIR         local checkout to copy (default: the one holding this script)
  REPO_URL          clone this repository on the workers instead of copying LOCAL_DIR
  BRANCH            branch or tag to clone (default: the repository's default branch)
  PYTHON_VERSION    Python for the virtual environment (default 3.11)
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
python_version="${PYTHON_VERSION:-3.11}"
code="$REMOTE_CODE_DIR"
staging="$REMOTE_CODE_DIR.new"

if [[ -n "${REPO_URL:-}" ]]; then
  branch=()
  [[ -z "${BRANCH:-}" ]] || branch=("--branch=$BRANCH")
  fetch="rm -rf $staging && git clone --depth=1 $(quote_all ${branch[@]+"${branch[@]}"} "$REPO_URL" "$staging")"
else
  local_dir="${LOCAL_DIR:-$K15_LAUNCH_DIR/..}"
  git -C "$local_dir" rev-parse --git-dir >/dev/null 2>&1 ||
    die "LOCAL_DIR=$local_dir is not a git checkout; set LOCAL_DIR, or REPO_URL to clone instead"
  # A commit object holding the working tree's tracked files, uncommitted edits included; empty
  # output means there are no edits and HEAD is the tree to copy.
  ref="$(git -C "$local_dir" stash create)" ||
    die "cannot snapshot LOCAL_DIR=$local_dir (git stash create failed; has it no commit yet?)"
  ref="${ref:-HEAD}"
  untracked="$(git -C "$local_dir" ls-files --others --exclude-standard | wc -l | tr -d ' ')"
  ((untracked == 0)) || warn "$untracked untracked file(s) in $local_dir are not copied (git add them)"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  tarball="$tmp/$code.tar.gz"
  run git -C "$local_dir" archive --format=tar.gz --output="$tarball" "$ref"
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$code.tar.gz" --worker=all \
    "${GCLOUD_FLAGS[@]}"
  fetch="rm -rf $staging && mkdir $staging && tar -xzf $code.tar.gz -C $staging && rm $code.tar.gz"
fi

# shellcheck disable=SC2088  # the ~ is for the remote shell to expand
venv_python="~/$REMOTE_VENV_DIR/bin/python"
install="cd $code"
install+=" && python3 -m pip install --user --quiet uv"
install+=" && { test -x $venv_python || python3 -m uv venv --seed --python $(quote "$python_version") ~/$REMOTE_VENV_DIR; }"
# gcsfs: etils.epath, which orbax and JAX's compilation cache write gs:// paths with, needs it.
install+=" && ~/$REMOTE_VENV_DIR/bin/pip install --quiet -e '.[tpu]' gcsfs"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_FLAGS[@]}" \
  --command="$fetch && rm -rf $code && mv $staging $code && $install"
