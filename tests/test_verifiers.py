"""The answer-checking rule rewards (math-verify for correctness, two formats)."""

from __future__ import annotations

import threading

from rlhf_ray.tasks.verifiers import boxed_format, math_answer, number_only


def _math_answer(responses: list[str], answer: list, **columns) -> list[float]:
    return math_answer(["What is 27 + 82? Reply with just the number."] * len(responses), responses,
                       answer=answer, **columns)


def test_plain_sentence_and_boxed_answers_are_read():
    responses = ["109", "The answer is 109.", "\\boxed{109}", "27 + 82 = 109", "So \\boxed{109}, not 108"]
    assert _math_answer(responses, ["109"] * len(responses)) == [1.0] * len(responses)


def test_wrong_and_missing_answers_score_zero():
    responses = ["108", "The answer is 110.", "\\boxed{108}. Or maybe 109", "I cannot say.", ""]
    assert _math_answer(responses, ["109"] * len(responses)) == [0.0] * len(responses)


def test_arithmetic_left_undone_is_no_answer():
    """What SmolLM2 learned in 20 GRPO iterations against a verifier that took an expression for its
    value: to end on the question's own sum. The sum is no answer; its value is, however phrased."""
    restated = ["To calculate 27 + 82, simply add them together: 27 + 82 = ", "Four-seven is 27 + 82",
                "\\boxed{27+82}", "27 \\times 1 + 82"]
    assert _math_answer(restated, ["109"] * 4) == [0.0] * 4
    assert _math_answer(["27 + 82 = 109", "27 + 82 equals 109.", "-109"], ["109", "109", "-109"]) == [1.0, 1.0, 1.0]
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 in all.\n#### 72"
    assert _math_answer(["She sold 72 clips.", "\\boxed{72}", "48 + 24"], [gsm8k] * 3) == [1.0, 1.0, 0.0]


def test_latex_fractions_equal_decimals_both_ways():
    responses = ["$\\frac{1}{2}$", "\\boxed{\\frac{3}{4}}", "0.5", "3/4"]
    assert _math_answer(responses, ["0.5", "0.75", "\\frac{1}{2}", "\\frac{3}{4}"]) == [1.0] * 4
    assert _math_answer(["$\\frac{1}{3}$"], ["0.5"]) == [0.0]


def test_numeric_answer_column_values_and_other_columns():
    """Answers as the JSON numbers a file may hold; the row's other columns arrive as keywords."""
    scores = _math_answer(["109", "\\boxed{0.25}", "-3", "7"], [109, 0.25, -3, 8], id=["a", "b", "c", "d"])
    assert scores == [1.0, 1.0, 1.0, 0.0]


def test_math_answer_works_from_a_thread():
    """Outside the main thread math-verify's signal timeouts cannot be set; the scores are the
    same, and a response that would hang sympy (a power tower) is still cut off, scoring 0."""
    responses, answers = ["The answer is 109.", "108", "9^9^9^9", "\\boxed{\\frac{1}{2}}"], [109, "109", "109", 0.5]
    results: list = []
    thread = threading.Thread(target=lambda: results.append(_math_answer(responses, answers)))
    thread.start()
    thread.join(timeout=120)
    assert results == [[1.0, 0.0, 0.0, 1.0]]


def test_boxed_format_wants_exactly_one_filled_box():
    responses = ["\\boxed{109}", "so \\boxed{\\frac{1}{2}} it is", "\\boxed{}", "\\boxed{1} or \\boxed{2}",
                 "\\boxed{109", "109"]
    assert boxed_format([""] * len(responses), responses, answer=["109"] * len(responses)) == \
        [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_number_only_wants_just_a_number():
    responses = ["109", " 109\n", "-3.5", "109.", "= 109", "The answer is 109", "27 + 82 = 109", ""]
    assert number_only([""] * len(responses), responses) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
