"""k15.data.prompt_file: a prompt file read through grain, each host its share.

On one process it must give exactly what k15.data.prompts.load_prompts gives (records, skip
counts, error messages naming file and line), reading records only when asked. On two
processes (jax.distributed on localhost) each parses only its share of the lines, and both end
with the same ids, labels, errors and prompt tokens.
"""

import json
import os
import subprocess
import sys

import pytest

from k15.data import prompt_file
from k15.data import prompts as prompts_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokenize(text: str) -> list[int]:
  return list(text.encode("utf-8"))


def _gsm8k_rows(n: int) -> list[str]:
  return [json.dumps({"question": f"Sam has {i} apples and buys 2. How many now?",
                      "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}) for i in range(n)]


def _write(path, lines: list[str]) -> str:
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def _k15_line(i: int, **extra) -> str:
  return json.dumps({"id": f"p{i}", "prompt": f"What is {i} * 3?", "answer": str(3 * i),
                     "domain": "math", "difficulty": i / 10, "pass_rate": 1 - i / 10, **extra})


@pytest.mark.parametrize("fmt", ["auto", "gsm8k", "k15", "math", "code"])
def test_equals_load_prompts_in_every_format(tmp_path, fmt):
  if fmt in ("auto", "gsm8k"):
    lines = _gsm8k_rows(5)
  elif fmt == "k15":
    lines = [_k15_line(i) for i in range(5)]
  elif fmt == "math":
    lines = [json.dumps({"problem": f"Find ${i}+1$.", "solution": f"It is $\\boxed{{{i + 1}}}$.",
                         "level": f"Level {i % 5 + 1}", "type": "Algebra"}) for i in range(5)]
  else:
    lines = [json.dumps({"prompt": f"Print {i}.", "tests": [{"input": "", "output": f"{i}\n"}]})
             for i in range(5)]
  lines.insert(2, "")  # a blank line is not a record, and line numbers still count it
  path = _write(tmp_path / "set.jsonl", lines)
  expected, _ = prompts_lib.load_prompts(path, fmt)
  pf = prompt_file.PromptFile(path, fmt, tokenize=_tokenize)
  assert len(pf) == len(expected) == 5
  assert [pf[i] for i in range(len(pf))] == expected
  assert pf.ids == [r.id for r in expected]
  assert pf.difficulties == [r.difficulty for r in expected]
  assert pf.pass_rates == [r.pass_rate for r in expected]
  assert pf.prompt_lengths == [len(_tokenize(r.prompt)) for r in expected]
  assert pf.tokens([4, 0, 4]) == [_tokenize(expected[i].prompt) for i in (4, 0, 4)]
  assert pf.share == (0, 5)  # one process: all of it


def test_errors_name_file_and_line_like_load_prompts(tmp_path):
  lines = [_k15_line(0), "{not json", _k15_line(2), _k15_line(0), json.dumps({"id": "x"}),
           _k15_line(5)]
  path = _write(tmp_path / "bad.jsonl", lines)
  with pytest.raises(prompts_lib.PromptFormatError) as want:
    prompts_lib.load_prompts(path, "k15")
  with pytest.raises(prompts_lib.PromptFormatError) as got:
    prompt_file.PromptFile(path, "k15")
  assert str(got.value) == str(want.value)
  assert str(got.value).startswith(f"{path}:2: invalid JSON")

  records, skipped = prompts_lib.load_prompts(path, "k15", on_error="skip")
  pf = prompt_file.PromptFile(path, "k15", on_error="skip")
  assert (pf.skipped, skipped) == (3, 3)
  assert [pf[i] for i in range(len(pf))] == records
  assert pf.ids == ["p0", "p2", "p5"]
  assert any(m.startswith(f"{path}:4: duplicate id 'p0' (first on line 1)")
             for m in pf.skip_messages)
  assert any(m.startswith(f"{path}:5: missing key(s)") for m in pf.skip_messages)

  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    prompt_file.PromptFile(tmp_path / "missing.jsonl")
  with pytest.raises(ValueError, match="unknown prompt format 'csv'"):
    prompt_file.PromptFile(path, "csv")


def test_records_are_read_when_asked(tmp_path, monkeypatch):
  path = _write(tmp_path / "g.jsonl", _gsm8k_rows(50))
  pf = prompt_file.PromptFile(path, tokenize=_tokenize)
  parsed = []
  parse = prompts_lib.parse_line
  monkeypatch.setattr(prompts_lib, "parse_line",
                      lambda line, *a: parsed.append(line) or parse(line, *a))
  assert [r.answer for r in pf.records([7, 31])] == ["9", "33"]
  assert pf[-1].answer == "51"
  assert len(parsed) == 3  # only the lines asked for
  with pytest.raises(IndexError, match="record 50 of 50"):
    pf[50]  # pylint: disable=pointless-statement


_WORKER = r'''
import json, sys
import jax
process_id, port, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id)
from k15.data import prompt_file, prompts as prompts_lib
parsed = []
parse = prompts_lib.parse_line
prompts_lib.parse_line = lambda line, *a: parsed.append(json.loads(line)["question"]) or parse(line, *a)
tokenize = lambda text: list(text.encode("utf-8"))
result = {}
try:
  prompt_file.PromptFile(path + ".bad", "gsm8k", tokenize=tokenize)
except prompts_lib.PromptFormatError as e:
  result["error"] = str(e)
parsed.clear()
pf = prompt_file.PromptFile(path, "gsm8k", tokenize=tokenize)
result.update(share=list(pf.share), parsed_at_open=list(parsed), ids=pf.ids,
              lengths=pf.prompt_lengths)
parsed.clear()
result["tokens"] = pf.tokens([9, 0, 3, 3, 7])
result["parsed_for_tokens"] = list(parsed)
with open(out, "w") as f:
  json.dump(result, f)
'''


def test_two_hosts_each_parse_their_share(tmp_path):
  rows = _gsm8k_rows(10)
  path = _write(tmp_path / "train.jsonl", rows)
  bad = list(rows)
  bad[8] = json.dumps({"question": "no answer"})  # in the second host's share
  _write(tmp_path / "train.jsonl.bad", bad)
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), path,
                             str(tmp_path / f"out{i}.json")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  out = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]

  # The error on line 9 was found by host 1 and raised, with its file and line, on both.
  assert out[0]["error"] == out[1]["error"]
  assert out[0]["error"].startswith(f"{path}.bad:9: missing key(s) ['answer']")
  # Each host parsed its half of the lines at open, and tokenized its half of the draws.
  assert [o["share"] for o in out] == [[0, 5], [5, 10]]
  questions = [json.loads(r)["question"] for r in rows]
  assert out[0]["parsed_at_open"] == questions[:5]
  assert out[1]["parsed_at_open"] == questions[5:]
  assert out[0]["parsed_for_tokens"] == [questions[i] for i in (9, 0, 3)]
  assert out[1]["parsed_for_tokens"] == [questions[i] for i in (3, 7)]
  # And both hold everything the sampler needs, the same on each.
  for o in out:
    assert o["ids"] == [f"train-{i}" for i in range(1, 11)]
    assert o["lengths"] == [len(_tokenize(q)) for q in questions]
    assert o["tokens"] == [_tokenize(questions[i]) for i in (9, 0, 3, 3, 7)]
