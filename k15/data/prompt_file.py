"""An RL prompt file read through grain, each host its share.

Every host draws the same prompt ids each iteration (k15.data.samplers, one seed), so every host
must know every prompt's id, difficulty and pass rate, and the sampler's input must be the same
on every host. The records themselves need not be: a code set's tests can be far larger than its
prompts, and only the host that grades a response needs its record. So:

  open:       each host finds where the file's lines start (bytes only, no JSON), then parses and
              tokenizes its `parallel.host_share` of the lines through a grain MapDataset over
              them, and the hosts exchange what the sampler needs (id, difficulty, pass rate,
              prompt length) and the errors they found. A malformed line is reported the same on
              every host, by file and line, whichever host read it.
  tokens(ids) each iteration: each host reads and tokenizes its share of the drawn prompts, and
              the token lists are gathered, so the sampler sees the same input everywhere.
  [i]         a record, read from its line when asked (the grader asks for its share's).

Reads are by line index, so the file holds no iteration state: the prompt sampler's state in the
trainer's checkpoint is all a resumed run needs to draw the same prompts again.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Sequence

import grain
import numpy as np
from etils import epath

from k15 import metrics, parallel
from k15.data import prompts as prompts_lib

# Prompt text -> token ids (the chat template applied).
Tokenize = Callable[[str], list[int]]


class JsonlLines(grain.sources.RandomAccessDataSource):
  """The non-blank lines of a text file by index, as (line number, text): a grain data source.

  One pass over the bytes records where each non-blank line starts; a line is then read by one
  seek, so a host can read any share of the file, or single lines, without holding the rest.
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = os.fspath(path)
    file = epath.Path(self.path)
    if not file.is_file():
      raise FileNotFoundError(f"prompt file not found: {self.path}")
    starts, ends, numbers, pos = [], [], [], 0
    with file.open("rb") as f:
      for line_no, line in enumerate(f, start=1):
        if line.strip():
          starts.append(pos)
          ends.append(pos + len(line))
          numbers.append(line_no)
        pos += len(line)
    self._starts = np.asarray(starts, np.int64)
    self._ends = np.asarray(ends, np.int64)
    self._line_numbers = np.asarray(numbers, np.int64)
    self._file = None
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._line_numbers)

  def __getitem__(self, index: int) -> tuple[int, str]:
    index = int(index)
    with self._lock:  # one open handle; grain may read from several threads
      if self._file is None:
        self._file = epath.Path(self.path).open("rb")
      self._file.seek(int(self._starts[index]))
      data = self._file.read(int(self._ends[index] - self._starts[index]))
    return int(self._line_numbers[index]), data.decode("utf-8")

  def __getstate__(self):  # for grain's worker processes: they open their own handle
    state = dict(self.__dict__)
    state["_file"], state["_lock"] = None, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"JsonlLines({self.path!r}, lines={len(self)})"


class PromptFile:
  """A prompt file's records by index, each host reading its share (see the module docstring).

  Attributes, identical on every host: `ids`, `difficulties`, `pass_rates` and `prompt_lengths`
  (token counts), one per record in file order; `skipped`, the malformed lines skipped
  (on_error='skip'); `format`, the file's format ('auto' resolved); `share`, this host's
  [start, stop) of the file's non-blank lines.
  """

  def __init__(self, path: str | os.PathLike[str], format: str = "auto",  # pylint: disable=redefined-builtin
               *, on_error: str = "raise", tokenize: Tokenize | None = None):
    if format not in prompts_lib.FORMATS:
      raise ValueError(f"unknown prompt format {format!r}; expected one of "
                       f"{prompts_lib.FORMATS}")
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    self.path = os.fspath(path)
    self._lines = JsonlLines(self.path)
    self._stem = os.path.splitext(os.path.basename(self.path))[0]
    self._tokenize = tokenize
    self.format = format if format != "auto" else self._detect()
    self.share = parallel.host_share(len(self._lines))

    # Each host parses (and tokenizes) its share; all hosts then merge the same lists.
    start, stop = self.share
    # A closure, not the bound method: grain names a map by its function's repr, and this
    # object's repr reads attributes set below.
    mine = (grain.MapDataset.source(self._lines)[start:stop]
            .map(lambda item: self._validate(item))
            .to_iter_dataset(grain.ReadOptions(num_threads=0)))
    rows = []
    with metrics.progress(stop - start, f"reading {os.path.basename(self.path)}",
                          unit="line") as bar:
      for row in mine:
        rows.append(row)
        bar.update(1)
    every = [row for host_rows in parallel.gather_json(rows) for row in host_rows]

    errors: list[tuple[int, str]] = []
    first_line_of_id: dict[str, int] = {}
    index, self.ids, self.difficulties, self.pass_rates, self.prompt_lengths = [], [], [], [], []
    for position, (line_no, error, rid, difficulty, pass_rate, length) in enumerate(every):
      if error is None and rid in first_line_of_id:
        error = f"duplicate id {rid!r} (first on line {first_line_of_id[rid]})"
      if error is not None:
        errors.append((line_no, f"{self.path}:{line_no}: {error}"))
        continue
      first_line_of_id[rid] = line_no
      index.append(position)
      self.ids.append(rid)
      self.difficulties.append(difficulty)
      self.pass_rates.append(pass_rate)
      self.prompt_lengths.append(length)
    if errors and on_error == "raise":
      raise prompts_lib.PromptFormatError(errors[0][1])
    self.skipped = len(errors)
    self.skip_messages = [message for _, message in errors]
    self._index = np.asarray(index, np.int64)  # record -> non-blank line

  def _detect(self) -> str:
    for i in range(len(self._lines)):
      line_no, line = self._lines[i]
      found = prompts_lib.detect_format(line, self.path, line_no)
      if found:
        return found
    return "k15"  # no line is JSON: every line is then refused as invalid JSON

  def _parse(self, line_no: int, line: str) -> prompts_lib.PromptRecord:
    return prompts_lib.parse_line(line, self.format, f"{self._stem}-{line_no}")

  def _validate(self, item: tuple[int, str]) -> list[Any]:
    """[line, error or None, id, difficulty, pass rate, prompt tokens] of one line."""
    line_no, line = item
    try:
      record = self._parse(line_no, line)
    except ValueError as e:
      return [line_no, str(e), None, None, None, 0]
    length = len(self._tokenize(record.prompt)) if self._tokenize else 0
    return [line_no, None, record.id, record.difficulty, record.pass_rate, length]

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> prompts_lib.PromptRecord:
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} of {len(self)} in {self.path}")
    return self._parse(*self._lines[int(self._index[i])])

  def records(self, ids: Sequence[int]) -> list[prompts_lib.PromptRecord]:
    """The records of `ids`, each read from its line (this host's reads only, no collective)."""
    return [self[int(i)] for i in ids]

  def tokens(self, ids: Sequence[int]) -> list[list[int]]:
    """The prompt token ids of records `ids`, the same on every host: each host reads and
    tokenizes its share of them and the shares are gathered (a collective)."""
    if self._tokenize is None:
      raise ValueError(f"PromptFile({self.path!r}) was opened without a tokenizer")
    start, stop = parallel.host_share(len(ids))
    mine = [self._tokenize(r.prompt) for r in self.records(ids[start:stop])]
    return [t for share in parallel.gather_json(mine) for t in share]

  def __repr__(self) -> str:
    return (f"PromptFile({self.path!r}, format={self.format!r}, records={len(self)}, "
            f"skipped={self.skipped})")
