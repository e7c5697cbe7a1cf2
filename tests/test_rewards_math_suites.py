r"""The math grader on cases from math-verify's own test suite and from MATH's answer checker.

Each case is (reference as stored, the boxed answer of a response, expected). The references are
written as the public sets write them; the response is `... \boxed{answer}`, since k15 grades the
last box only (cases of those suites that test extraction from unboxed prose do not apply to k15
and are not here). Sources:
  mv:    huggingface/Math-Verify tests (tests/test_all.py, tests/test_numina_cases.py), restated
  math:  hendrycks/math modeling/math_equivalence_test.py, restated; MATH's checker compares
         strings after normalising, so where it asks for order (`10, 4, -2` vs `4, 10, -2`) k15,
         which compares the values, disagrees on purpose (see KNOWN_DIFFERENCES)
  m500:  reference notations of MATH-500 (escaped dollars, upright e, thin-space thousands,
         repeating decimals)

KNOWN_DIFFERENCES lists the cases where k15's score differs from the suite's expectation, each
with the reason it is left so; they are asserted to keep differing (strict xfail), so a change of
behaviour shows up either way.
"""

import pytest

from k15.rewards import math as math_reward

CASES = [
    # --- math-verify: numbers ---------------------------------------------------------------
    ("mv", "7425000", "7,425,000", 1.0),
    ("mv", "1000.99", "1,000.99", 1.0),
    ("mv", "0.4", ".4", 1.0),
    ("mv", "1000.99", r"\$1,000.99", 1.0),
    ("mv", "1000", "1000.0", 1.0),
    # --- math-verify: LaTeX notation ----------------------------------------------------------
    ("mv", "10/9", r"\frac{10}{9}", 1.0),
    ("mv", "-10/9", r"-\frac{10}{9}", 1.0),
    ("mv", "$[0,1)$", "[0,1)", 1.0),
    ("mv", "$[0,9)$", "[0,1)", 0.0),
    ("mv", "$(0,9)$", "[0,9)", 0.0),
    ("mv", "$1/3$", r"\frac13", 1.0),
    ("mv", "$1$", r"\frac3{3}", 1.0),
    ("mv", r"$\sqrt{3}$", r"\sqrt3", 1.0),
    ("mv", "$1/3$", r"\cfrac{1}{3}", 1.0),
    ("mv", "$1/3$", r"\left( \frac{1}{3} \right)", 1.0),
    ("mv", "$1/3$", r"\frac{1}{3} \text{meters}", 1.0),
    ("mv", "$1/3$", r"k = \frac{1}{3}", 1.0),
    ("mv", r"$28\%$", "28", 1.0),
    ("mv", r"$28\%$", "28 pct", 1.0),
    ("mv", r"$28\%$", "27", 0.0),
    # --- math-verify: MATH answers ------------------------------------------------------------
    ("mv", "$2-2p$", "-2p+2", 1.0),
    ("mv", r"$14{,}916$", "14916", 1.0),
    ("mv", r"$(3, \frac{\pi}{2})$", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    ("mv", r"$\text{Evelyn}$", r"\text{ Evelyn}", 1.0),
    ("mv", r"$90^\circ$", r"90^{\circ}", 1.0),
    ("mv", r"$15\mbox{ cm}^2$", "15", 1.0),
    ("mv", "$-2,1$", "1,-2", 1.0),
    ("mv", "$204_5$", "204_5", 1.0),
    ("mv", "$(6,31,-1)$", "(6, 31, -1)", 1.0),
    ("mv", "$(6,31,-1)$", "(6, -1, 31)", 0.0),
    ("mv", r"$1 \pm \sqrt{19}$", r"1\pm\sqrt{19}", 1.0),
    ("mv", r"$\{1\pm\sqrt{5},-2\}$", r"\{-2, 1\pm\sqrt{5}\}", 1.0),
    ("mv", r"$2 \sin b \cos a$", r"2\cos a \sin b", 1.0),
    ("mv", "$125$ miles", r"125\textnormal{ miles}", 1.0),
    ("mv", r"$[-1, -\frac{1}{2}) \cup (-\frac{1}{2}, 0) \cup (0, 1) \cup (1, \infty)$",
     r"[-1, -\tfrac12) \cup (-\tfrac12, 0) \cup (0, 1) \cup (1, \infty)", 1.0),
    ("mv", r"$\sqrt{2}+\sqrt{5}$", r"\sqrt 2+\sqrt 5", 1.0),
    ("mv", r"$\frac{9}{4}\pi$", r"\frac94\pi", 1.0),
    # --- math-verify: relations ---------------------------------------------------------------
    ("mv", "$x >= 5$", r"x \geq 5", 1.0),
    ("mv", "$x > 5$", "x < 5", 0.0),
    ("mv", r"$x \geq 5$", r"x \leq 5", 0.0),
    ("mv", r"$x \leq 5$", r"5 \geq x", 1.0),
    ("mv", "$11$", "x=11", 1.0),
    ("mv", "$x < 1$", "-x > -1", 1.0),
    ("mv", "$x < 1$", "x > -1", 0.0),
    ("mv", "$a +3z = 0$", "0", 0.0),
    ("mv", "$k=1$", "1", 1.0),
    ("mv", "$2x+4y-3=0$", r"y=-\frac{1}{2}x+\frac{3}{4}", 1.0),
    ("mv", "$x^2/4 + y^2/3 = 1$", "x^2/16 + y^2/12 = 1/4", 1.0),
    ("mv", r"$-2 \le x \le 7$", r"x \in [-2,7]", 1.0),
    # --- math-verify: matrices and expressions ------------------------------------------------
    ("mv", r"$\begin{bmatrix}0 & 0 \\0 & 0\end{bmatrix}$",
     r"\begin{pmatrix}0 & 0 \\0 & 0\end{pmatrix}", 1.0),
    ("mv", r"$\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix}$",
     r"\begin{pmatrix}1 & 2 \\ 3 & 5\end{pmatrix}", 0.0),
    ("mv", r"$\frac{1}{12}$", "0.0833333333333333", 1.0),
    ("mv", r"$(1,\frac{9}{2})$", "(1,4.5)", 1.0),
    ("mv", r"$\frac{x+2}{7}$", r"\frac{x}{7}+\frac{2}{7}", 1.0),
    ("mv", r"$\tan^2(y)+1$", r"\sec^2(y)", 1.0),
    ("mv", "$34x+45y-20z+100=0$", "-34x-45y+20z-100=0", 1.0),
    ("mv", "$(a+5)(b+2)$", "(+5)(b+2)", 0.0),
    ("mv", "$2$", r"\frac{1+\sqrt{5}}{2}", 0.0),
    ("mv", r"$1\sqrt{19}$", "1", 0.0),
    ("mv", "$x+2n+1$", "x+1", 0.0),
    ("mv", "$4$", r"4\sqrt{2}", 0.0),
    ("mv", r"$\text{C}$", r"\text{(C)}", 1.0),
    ("mv", "11111111100", r"11,\! 111,\! 111,\! 100", 1.0),
    ("mv", "32349", r"32,\! 349", 1.0),
    ("mv", "32349", "32, 349", 0.0),
    ("mv", r"$(2, 12) \cup (12, 102)$", r"x \in (2,12) \cup (12,102)", 1.0),
    ("mv", r"$\text{E}$", "E", 1.0),
    # --- math-verify: NuminaMath references ---------------------------------------------------
    ("mv", "$(p,q)=(3,2)$", "(3,2)", 1.0),
    ("mv", "$(p,q,r)=(3,2,7)$", "(3,2,7)", 1.0),
    ("mv", "$-12;-11;-10;-8;-7;-6$", r"\{-12, -11, -10, -8, -7, -6\}", 1.0),
    ("mv", "$AB=4,CD=5$", "4, 5", 1.0),
    ("mv", "$S_{MBCN}:S=7:32$", "7:32", 1.0),
    ("mv", "$p=5,q=2;p=7,q=2$", "(5,2),(7,2)", 1.0),
    # --- MATH's answer checker ----------------------------------------------------------------
    ("math", r"\tfrac{1}{2} + \frac1{72}", r"\frac{1}{2} + 2/3", 0.0),
    ("math", "10, 4, -2", "4, 10, -2", 0.0),
    ("math", "10, 4, 2", "4, 12, 2", 0.0),
    ("math", r"\tfrac{1}{2} +\! \frac1{72}", r"\dfrac{1}{2} +\frac{1}{72}", 1.0),
    ("math", r"10\text{ units}", "10", 1.0),
    ("math", r"10\text{ units}", "100", 0.0),
    ("math", "10", r"\$10", 1.0),
    ("math", r"\left(x-2\right)\left(x+2\right)", "(x-2)(x+2)", 1.0),
    ("math", "0.1, 4, 2", "4, .1, 2", 0.0),
    ("math", "0.1", ".1", 1.0),
    ("math", r"10\%", "10", 1.0),
    ("math", r"10\sqrt{3} + \sqrt4", r"10\sqrt3 + \sqrt{4}", 1.0),
    ("math", r"\frac34i", r"\frac{3}{4}i", 1.0),
    ("math", r"\tfrac83", r"\frac{8}{3}", 1.0),
    ("math", "5x - 7y + 11z + 4 = 0", "x + y - z + 2 = 0", 0.0),
    ("math", "1/2", r"\frac{1}{2}", 1.0),
    # --- MATH-500 reference notations ---------------------------------------------------------
    ("m500", r"\$18.90", "18.90", 1.0),
    ("m500", r"\$18.90", r"\$18.90 ", 1.0),
    ("m500", r"\$18.90", "18.9", 1.0),
    ("m500", r"\$18.90", "19.80", 0.0),
    ("m500", r"\$32,\!348", "32348", 1.0),
    ("m500", r"2\mathrm{e}", "2", 0.0),
    ("m500", r"2\mathrm{e}", "2e", 1.0),
    ("m500", r"\mathrm{e}^2", "e^{2}", 1.0),
    ("m500", r"\frac{1}{\mathrm{e}}", "e^{-1}", 1.0),
    ("m500", r"1\,000", "1000", 1.0),
    ("m500", r"1\,000", "0", 0.0),
    ("m500", r"1\,000", "1", 0.0),
    ("m500", "1000", r"1\,000", 1.0),
    ("m500", r"10,\!080", "10080", 1.0),
    ("m500", r"\text{(C)}", "C", 1.0),
    ("m500", r"\text{(C)}", r"\text{(D)}", 0.0),
    ("m500", "4210_{5}", "4210_5", 1.0),
    ("m500", r"x \in [-2,7]", "[-2,7]", 1.0),
    ("m500", r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}", 1.0),
    ("m500", "6 - 5i", "6-5i", 1.0),
    ("m500", r"0.\overline{3}", r"\frac{1}{3}", 1.0),
    ("m500", r"0.\overline{3}", "0.3", 0.0),
    ("m500", r"3.\overline{6}", r"\frac{11}{3}", 1.0),
    ("m500", r"\frac{1}{6}", r"0.1\overline{6}", 1.0),
    ("m500", r"0.\overline{36}", r"\frac{4}{11}", 1.0),
    ("m500", r"0.\overline{36}", r"\frac{4}{10}", 0.0),
]

# (source, reference, answer) -> why k15's score differs from the suite's expectation.
_ORDER = ("MATH's checker compares normalised strings, so it rejects a list in another order; "
          "math-verify (and k15) read a bare comma list as a set of values, and MATH's list "
          "answers (roots, solutions) are unordered, so the order is not checked")
KNOWN_DIFFERENCES = {
    ("math", "10, 4, -2", "4, 10, -2"): _ORDER,
    ("math", "0.1, 4, 2", "4, .1, 2"): _ORDER,
}


def _id(case):
  return f"{case[0]}:{case[1]}|{case[2]}"


@pytest.fixture(scope="module")
def scores():
  responses = [f"Working... so the answer is $\\boxed{{{c[2]}}}$." for c in CASES]
  got = math_reward.grade_batch(responses, [c[1] for c in CASES], num_workers=2)
  return {_id(c): float(s) for c, s in zip(CASES, got)}


def test_cases_are_distinct_and_many():
  assert len({_id(c) for c in CASES}) == len(CASES) >= 90
  assert sum(c[3] == 0.0 for c in CASES) >= 25
  assert set(KNOWN_DIFFERENCES) <= {c[:3] for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_case(case, scores):
  reason = KNOWN_DIFFERENCES.get(case[:3])
  if reason:
    pytest.xfail(reason) if scores[_id(case)] != case[3] else pytest.fail(
        f"known difference no longer differs: {reason}")
  assert scores[_id(case)] == case[3]
