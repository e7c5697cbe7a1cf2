"""Where a run's files live: every workdir read and write goes through `etils.epath`, so a
workdir (or a prompt file, or a checkpoint) may be local or remote (gs://) with the same code.

Libraries that want a local file (sentencepiece's trainer, transformers' `save_pretrained`,
safetensors memory maps) get one: a checkpoint on a remote path is staged once per host to a
local cache (`stage`), and an export is written locally and uploaded (`upload`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import Any, Iterator

from etils import epath

# A staged copy is complete when this file, written last, lists every file with its size.
MANIFEST = ".k15_staged.json"
_CHUNK = 1 << 22  # bytes per read when copying


def is_remote(path: str | os.PathLike[str]) -> bool:
  """True for a URI (gs://bucket/x, memory://x): a path the os module cannot open."""
  return "://" in os.fspath(path)


def path(p: str | os.PathLike[str]) -> epath.Path:
  return epath.Path(p)


def write_text(p: str | os.PathLike[str], text: str) -> None:
  """Writes `text` whole: locally through a temporary file and a rename (a reader never sees
  half a file), remotely in one object write (an object appears only when it is closed)."""
  p = epath.Path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    p.write_text(text, encoding="utf-8")
    return
  tmp = p.parent / f"{p.name}.tmp{os.getpid()}"
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, p)


def write_bytes(p: str | os.PathLike[str], data: bytes) -> None:
  """`write_text` for bytes."""
  p = epath.Path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    p.write_bytes(data)
    return
  tmp = p.parent / f"{p.name}.tmp{os.getpid()}"
  tmp.write_bytes(data)
  os.replace(tmp, p)


def write_json(p: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> None:
  write_text(p, json.dumps(obj, indent=indent, default=str))


def read_json(p: str | os.PathLike[str]) -> Any:
  return json.loads(epath.Path(p).read_text(encoding="utf-8"))


def save_figure(fig: Any, p: str | os.PathLike[str], **kwargs: Any) -> None:
  """matplotlib's savefig to a local or remote path (PNG)."""
  p = epath.Path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  with p.open("wb") as f:
    fig.savefig(f, format="png", **kwargs)


@contextlib.contextmanager
def local_dir(directory: str | os.PathLike[str]) -> Iterator[str]:
  """A local directory to write into that ends up at `directory`: itself when it is local, or a
  temporary one uploaded there on exit when it is remote."""
  if not is_remote(directory):
    os.makedirs(directory, exist_ok=True)
    yield os.fspath(directory)
    return
  with tempfile.TemporaryDirectory(prefix="k15_upload_") as tmp:
    yield tmp
    upload(tmp, directory)


def upload(local: str | os.PathLike[str], remote: str | os.PathLike[str]) -> None:
  """Copies the files of the local directory `local` (recursively) to `remote`."""
  for root, _, files in os.walk(local):
    rel = os.path.relpath(root, local)
    dest = epath.Path(remote) if rel == "." else epath.Path(remote) / rel
    dest.mkdir(parents=True, exist_ok=True)
    for name in files:
      with open(os.path.join(root, name), "rb") as src, (dest / name).open("wb") as dst:
        while chunk := src.read(_CHUNK):
          dst.write(chunk)


def _listing(root: epath.Path, what: str) -> dict[str, int]:
  """Relative path -> size of every file under `root`; a clear error when it cannot be read."""
  try:
    if not root.exists():
      raise FileNotFoundError(f"{what}={root}: no such directory")
    if not root.is_dir():
      raise NotADirectoryError(f"{what}={root}: not a directory")
    out = {}
    todo = [root]  # rglob refuses '**' on gs:// (one request per object); walk by hand
    while todo:
      for f in sorted(todo.pop().iterdir()):
        if f.is_dir():
          todo.append(f)
        else:
          out[os.fspath(f.relative_to(root))] = f.stat().length
    out = dict(sorted(out.items()))
  except (FileNotFoundError, NotADirectoryError):
    raise
  except Exception as e:  # the backends raise their own types (auth, network, permission)
    raise OSError(f"{what}={root}: cannot read it ({type(e).__name__}: {e})") from e
  if not out:
    raise FileNotFoundError(f"{what}={root}: an empty directory")
  return out


def cache_path(remote: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> str:
  """The local directory a remote checkpoint is staged to: readable, and unique per source."""
  remote = os.fspath(remote).rstrip("/")
  digest = hashlib.sha256(remote.encode()).hexdigest()[:12]
  return os.path.join(os.path.expanduser(os.fspath(cache_dir)),
                      f"{os.path.basename(remote) or 'model'}-{digest}")


def stage(remote: str | os.PathLike[str], cache_dir: str | os.PathLike[str], *,
          what: str = "config.model_path", progress: bool = True) -> str:
  """A local copy of the remote directory `remote` under `cache_dir`; returns its path.

  Each host calls it (no shared file system is assumed) and copies at most once: a copy whose
  manifest lists the source's files with their sizes is reused, anything else (a copy cut short,
  a source that changed) is completed file by file. The copy shows a tqdm bar in bytes.
  """
  from k15 import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  if not is_remote(remote):
    return os.fspath(remote)
  src = epath.Path(remote)
  files = _listing(src, what)
  dest = cache_path(remote, cache_dir)
  manifest = os.path.join(dest, MANIFEST)
  if os.path.isfile(manifest):
    with open(manifest, encoding="utf-8") as f:
      done = json.load(f)
    if done.get("source") == os.fspath(remote) and done.get("files") == files:
      return dest
  os.makedirs(dest, exist_ok=True)
  bar = metrics_lib.progress(sum(files.values()), desc=f"staging {src.name}", unit="B",
                             unit_scale=True, enabled=None if progress else False)
  for rel, size in files.items():
    target = os.path.join(dest, rel)
    if os.path.isfile(target) and os.path.getsize(target) == size:
      bar.update(size)
      continue
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.part{os.getpid()}"
    try:
      with (src / rel).open("rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(_CHUNK):
          fout.write(chunk)
          bar.update(len(chunk))
    except OSError as e:
      raise OSError(f"{what}={remote}: cannot copy {rel}: {e}") from e
    os.replace(tmp, target)
  bar.close()
  # Per process: two processes of one host (local multi-process runs) may stage at once.
  tmp = f"{manifest}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"source": os.fspath(remote), "files": files}, f, indent=1)
  os.replace(tmp, manifest)
  return dest
