"""Which config keys a piece of code reads: ConfigDict's accessors patched to record them."""

import contextlib
from typing import Iterator

import ml_collections

_C = ml_collections.ConfigDict


@contextlib.contextmanager
def recording(config: _C) -> Iterator[set]:
  """Yields the set of dotted keys read from `config` (or a deep copy of it) inside the block.

  Reading a block as a whole (items(), to_dict(), iteration) counts as reading all its keys.
  """
  paths: dict[int, str] = {}
  keep: list = []  # the indexed nodes stay alive, so their ids are not reused
  reads: set[str] = set()

  def index(node, path):
    paths[id(node)] = path
    keep.append(node)
    for k, v in node._fields.items():  # pylint: disable=protected-access
      if isinstance(v, _C):
        index(v, f"{path}{k}.")

  def note(node, key):
    p = paths.get(id(node))
    if p is None:
      return
    v = node._fields.get(key)  # pylint: disable=protected-access
    if isinstance(v, _C):
      return  # a block: its keys are recorded when read
    reads.add(p + key)

  def note_all(node):
    p = paths.get(id(node))
    if p is None:
      return
    for k, v in node._fields.items():  # pylint: disable=protected-access
      if isinstance(v, _C):
        note_all(v)
      else:
        reads.add(p + k)

  originals = {n: _C.__dict__[n] for n in ("__getattr__", "__getitem__", "get", "items",
                                            "to_dict", "values", "__iter__",
                                            "copy_and_resolve_references")}
  orig_deepcopy = getattr(_C, "__deepcopy__", None)

  def getattr_(self, name):
    if not name.startswith("_"):
      note(self, name)
    return originals["__getattr__"](self, name)

  def getitem_(self, key):
    note(self, key)
    return originals["__getitem__"](self, key)

  def get_(self, key, default=None):
    note(self, key)
    return originals["get"](self, key, default)

  def whole(name):
    def f(self, *args, **kwargs):
      note_all(self)
      return originals[name](self, *args, **kwargs)
    return f

  def deepcopy_(self, memo):
    import copy  # pylint: disable=g-import-not-at-top
    cls = type(self)
    new = cls.__new__(cls)
    memo[id(self)] = new
    for k, v in self.__dict__.items():
      object.__setattr__(new, k, copy.deepcopy(v, memo))
    if id(self) in paths:
      index(new, paths[id(self)])
    return new

  def copy_(self, *args, **kwargs):  # a copy's reads are the original's
    new = originals["copy_and_resolve_references"](self, *args, **kwargs)
    if id(self) in paths:
      index(new, paths[id(self)])
    return new

  index(config, "")
  patched = {"__getattr__": getattr_, "__getitem__": getitem_, "get": get_,
             "items": whole("items"), "to_dict": whole("to_dict"), "values": whole("values"),
             "__iter__": whole("__iter__"), "__deepcopy__": deepcopy_,
             "copy_and_resolve_references": copy_}
  for n, f in patched.items():
    setattr(_C, n, f)
  try:
    yield reads
  finally:
    for n in patched:
      if n in originals:
        setattr(_C, n, originals[n])
      elif orig_deepcopy is None:
        delattr(_C, n)
      else:
        setattr(_C, n, orig_deepcopy)
