"""The math grader: hand-written cases, the last-\\boxed{} rule, hard time limits, threads."""

import threading
import time

import numpy as np
import pytest

from k15.rewards import math as math_reward

# (response, reference answer, expected score)
CASES = [
    # Plain integers, right and wrong.
    (r"The answer is \boxed{42}.", "42", 1.0),
    (r"The answer is \boxed{41}.", "42", 0.0),
    (r"\boxed{0}", "0", 1.0),
    (r"\boxed{1}", "0", 0.0),
    (r"So $x = \boxed{7}$", "7", 1.0),
    (r"\boxed{ 12 }", "12", 1.0),
    # Negative numbers.
    (r"\boxed{-3}", "-3", 1.0),
    (r"\boxed{3}", "-3", 0.0),
    (r"\boxed{-3}", "3", 0.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    # Fractions, decimals and LaTeX fraction forms.
    (r"\boxed{\frac{1}{2}}", "1/2", 1.0),
    (r"\boxed{\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
    (r"\boxed{\tfrac{3}{4}}", "0.75", 1.0),
    (r"\boxed{0.5}", "\\frac{1}{2}", 1.0),
    (r"\boxed{\frac12}", "0.5", 1.0),
    (r"\boxed{2/4}", "\\frac{1}{2}", 1.0),
    (r"\boxed{\frac{2}{3}}", "\\frac{3}{2}", 0.0),
    (r"\boxed{0.6}", "\\frac{2}{3}", 0.0),
    (r"\boxed{\frac{1}{3}}", "0.333333", 1.0),
    (r"\boxed{1.25}", "\\frac{5}{4}", 1.0),
    (r"\boxed{1.2}", "\\frac{5}{4}", 0.0),
    # Roots and powers.
    (r"\boxed{2\sqrt{2}}", "\\sqrt{8}", 1.0),
    (r"\boxed{\sqrt{2}}", "\\sqrt{3}", 0.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", "\\frac{1}{2}", 0.0),
    (r"\boxed{2^{10}}", "1024", 1.0),
    (r"\boxed{2^{10}}", "1000", 0.0),
    (r"\boxed{3\sqrt{3}}", "\\sqrt{27}", 1.0),
    # Symbolic expressions and constants.
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    (r"\boxed{x^2+1}", "(x+1)^2", 0.0),
    (r"\boxed{2\pi}", "2\\pi", 1.0),
    (r"\boxed{\pi}", "2\\pi", 0.0),
    (r"\boxed{\infty}", "\\infty", 1.0),
    # Sets, tuples, intervals.
    (r"\boxed{\{1, 2, 3\}}", "\\{3, 2, 1\\}", 1.0),
    (r"\boxed{\{1, 2\}}", "\\{1, 2, 3\\}", 0.0),
    (r"\boxed{(1, 2)}", "(1,2)", 1.0),
    (r"\boxed{(2, 1)}", "(1,2)", 0.0),
    (r"\boxed{[1, 2)}", "[1,2)", 1.0),
    (r"\boxed{(1, 2]}", "[1,2)", 0.0),
    # Units, percent, thousands separators, equations, text answers.
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{6\text{ cm}}", "5", 0.0),
    (r"\boxed{10\%}", "10", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{x = 4}", "5", 0.0),
    (r"\boxed{\text{(B)}}", "B", 1.0),
    (r"\boxed{\text{(C)}}", "B", 0.0),
    # Last \boxed{} wins; earlier boxes and prose numbers do not count.
    (r"First I thought \boxed{3}, but actually \boxed{4}.", "4", 1.0),
    (r"First I thought \boxed{4}, but actually \boxed{3}.", "4", 0.0),
    (r"Nested: \boxed{\boxed{7}}", "7", 1.0),
    # No \boxed{} scores 0, however right the prose is.
    ("The answer is 4.", "4", 0.0),
    ("Final answer: 4", "4", 0.0),
    ("It could be 1, 2, 3, 4, 5, 6, 7, 8 or 9.", "4", 0.0),
    (r"Maybe 1, 2, 3, 5, 6 ... so \boxed{4}", "4", 1.0),
    (r"Maybe 4, or 5 ... so \boxed{5}", "4", 0.0),
    (r"Truncated response \boxed{4", "4", 0.0),
    (r"\boxed{}", "4", 0.0),
    ("", "4", 0.0),
    # References written in LaTeX or already boxed.
    (r"\boxed{\frac{7}{2}}", "$3.5$", 1.0),
    (r"\boxed{3.5}", "\\boxed{\\frac{7}{2}}", 1.0),
]


def test_at_least_fifty_cases():
  assert len(CASES) >= 50
  assert sum(c[2] == 0.0 for c in CASES) >= 20  # plenty of wrong answers


@pytest.mark.parametrize("response,answer,expected", CASES)
def test_grade(response, answer, expected):
  assert math_reward.grade(response, answer) == expected


def test_grade_batch_matches_grade():
  responses, answers, expected = zip(*CASES)
  got = math_reward.grade_batch(responses, answers, num_workers=2)
  np.testing.assert_array_equal(got, np.array(expected, np.float32))


@pytest.mark.parametrize("text,want", [
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"a \boxed{1} b \boxed{\{1, 2\}} c", r"\{1, 2\}"),
    (r"\boxed {x}", "x"),
    (r"\fbox{9}", "9"),
    (r"\boxed{\boxed{7}}", r"\boxed{7}"),
    (r"\boxed{1} then \boxed{2", None),
    ("no box here", None),
    (r"the command \boxed alone", None),
])
def test_extract_boxed(text, want):
  assert math_reward.extract_boxed(text) == want


def test_final_answer_lines_when_not_boxed_only():
  assert math_reward.grade("The final answer is $\\frac{1}{2}$.", "0.5", boxed_only=False) == 1.0
  assert math_reward.grade("The final answer is $3$.", "0.5", boxed_only=False) == 0.0


def test_pathological_input_times_out_and_pool_recovers():
  timeout_s = 1.0
  # Warm the pool first: a worker's start-up (importing sympy) is not part of an item's limit.
  assert math_reward.grade(r"\boxed{1}", "1.0") == 1.0
  start = time.monotonic()
  score = math_reward.grade(r"\boxed{9^{9^{9^9}}}", "1", timeout_s=timeout_s)
  elapsed = time.monotonic() - start
  assert score == 0.0
  assert elapsed < timeout_s + 1.0, elapsed
  # The stuck worker was killed and replaced: grading still works, several at once too.
  assert math_reward.grade(r"\boxed{\frac{2}{4}}", "0.5") == 1.0
  got = math_reward.grade_batch(
      [r"\boxed{9^{9^{9^9}}}", r"\boxed{3}", r"\boxed{2}", r"\boxed{9^{9^{9}}}", r"\boxed{5}"],
      ["1", "3", "3", "2", "5"], timeout_s=timeout_s, num_workers=2)
  np.testing.assert_array_equal(got, [0.0, 1.0, 0.0, 0.0, 1.0])


def test_grading_from_worker_threads():
  # math-verify's signal.alarm would fail (or silently score 0) off the main thread.
  responses, answers, expected = zip(*CASES[:20])
  results = {}

  def work(name, idx):
    results[name] = [math_reward.grade(responses[i], answers[i]) for i in idx]

  threads = [threading.Thread(target=work, args=(t, range(t, 20, 2))) for t in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not any(t.is_alive() for t in threads)
  assert results[0] == [expected[i] for i in range(0, 20, 2)]
  assert results[1] == [expected[i] for i in range(1, 20, 2)]

  batch = []
  t = threading.Thread(target=lambda: batch.append(
      math_reward.grade_batch(responses, answers, num_workers=2)))
  t.start()
  t.join(timeout=120)
  np.testing.assert_array_equal(batch[0], np.array(expected, np.float32))


def test_bad_input_is_a_clear_error():
  with pytest.raises(ValueError, match="2 responses but 1 answers"):
    math_reward.grade_batch(["a", "b"], ["1"])
  with pytest.raises(TypeError, match="item 0"):
    math_reward.grade_batch([None], ["1"])


def test_one_rule_for_responses_that_did_not_end():
  from k15.rewards import finish  # pylint: disable=g-import-not-at-top
  from k15.sampling import sampler  # pylint: disable=g-import-not-at-top
  r = sampler.FinishReason
  reasons = np.array([r.EOS, r.LENGTH, r.REPEAT, r.BUDGET])
  np.testing.assert_array_equal(finish.has_final_answer(reasons), [True, False, False, False])
  np.testing.assert_array_equal(finish.final_score(np.ones(4), reasons), [1, 0, 0, 0])
  # Without stop ids a response can only end at its limit, so that counts as its end.
  np.testing.assert_array_equal(finish.has_final_answer(reasons, stops=False),
                                [True, True, False, False])
  assert finish.has_final_answer(int(r.EOS)) is True
  # A truncated response with a closed box: the grader alone accepts it, the rule does not.
  truncated = r"... so \boxed{4} and then I kept writ"
  assert math_reward.grade(truncated, "4") == 1.0
  assert finish.final_score(math_reward.grade(truncated, "4"), r.LENGTH) == 0.0
