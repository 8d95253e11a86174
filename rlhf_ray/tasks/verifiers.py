"""Rule rewards that check answers: correctness by Hugging Face's ``math-verify`` and two answer
formats. Named in config like any reward function (``rlhf_ray.tasks.verifiers:math_answer``).

Every column of a prompt row besides the prompt reaches a reward function as a keyword argument
holding one value per response (TRL's convention), so a function that needs the row's gold answer
names that column and takes the rest as ``**kwargs``::

    def my_reward(prompts, responses, answer, **kwargs) -> list[float]: ...

and one that needs no column takes ``(prompts, responses, **kwargs)``.
"""

from __future__ import annotations

import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from math_verify import parse, verify

# math-verify bounds each parse and comparison (a response like 9^9^9^9 would otherwise hang
# sympy) with SIGALRM, which only a process's main thread may set. Answers of sums and textbook
# problems verify in milliseconds, so a few seconds only cut off the pathological ones.
TIMEOUT_S = 2

_helper: ProcessPoolExecutor | None = None
_helper_lock = threading.Lock()


def math_answer(prompts: list[str], responses: list[str], answer: list, **kwargs) -> list[float]:
    """1.0 for each response whose final answer is mathematically equal to its row's ``answer``,
    else 0.0. The response's answer is what math-verify extracts: a ``\\boxed{...}`` first, else
    the last LaTeX or plain expression ("The answer is 109.", "$\\frac{1}{2}$", "0.5"). ``answer``
    values are LaTeX or plain text (read as inside ``$...$`` unless they have their own ``$``) or
    numbers. Arithmetic left undone is no answer: a response ending on "27 + 82" (or
    ``\\boxed{27+82}``) scores 0.0 for 109, unless the gold answer is itself written that way.

    Works from any thread: called outside the main thread (a Ray actor may run methods in a
    worker thread), it scores in a helper process whose main thread keeps math-verify's timeouts.
    That process is spawned, so a script calling it from a thread needs multiprocessing's
    ``if __name__ == "__main__":`` guard (Ray workers and pytest have it).
    """
    if len(answer) != len(responses):
        raise ValueError(f"math_answer: {len(answer)} answers for {len(responses)} responses")
    golds = [_gold_latex(value) for value in answer]
    if threading.current_thread() is threading.main_thread():
        return _score_answers(golds, responses)
    return _submit_to_helper(golds, responses)


def boxed_format(prompts: list[str], responses: list[str], **kwargs) -> list[float]:
    """1.0 for a response that gives exactly one ``\\boxed{...}`` with something in it (braces
    balanced), else 0.0: the format math prompts ask for ("put your final answer in \\boxed{}")."""
    return [float(_single_boxed(r)) for r in responses]


_NUMBER = re.compile(r"\s*[-+]?\d+(?:\.\d+)?\s*")


def number_only(prompts: list[str], responses: list[str], **kwargs) -> list[float]:
    """1.0 for a response that is one number and nothing else (an optional sign, digits, an
    optional decimal part; surrounding whitespace ignored), else 0.0: what "Reply with just the
    number." asks for. "109" scores 1.0; "109.", "= 109" and "The answer is 109" score 0.0."""
    return [float(_NUMBER.fullmatch(r) is not None) for r in responses]


def _gold_latex(value) -> str:
    if value is None:
        raise ValueError("math_answer: a row's answer is missing (None)")
    text = str(value)
    # Bare LaTeX ("\sqrt{2}") is read as LaTeX only between $ signs; plain numbers read alike.
    return text if "$" in text else f"${text}$"


# Arithmetic left undone between two numbers ("92 + 16", "3 \times 4"): math-verify would take it
# for its value, and a policy learns to restate the question instead of answering it (measured:
# SmolLM2 went from 29% to "100%" right in 20 GRPO iterations by ending on "... 92 + 16 = ").
_UNEVALUATED = re.compile(r"\d\s*(?:[-+*×·^]|\\times|\\cdot)\s*\d")


def _score_answers(golds: list[str], responses: list[str]) -> list[float]:
    scores = []
    for gold, response in zip(golds, responses):
        gold_parsed = parse(gold, parsing_timeout=TIMEOUT_S)
        answer = parse(response, parsing_timeout=TIMEOUT_S)
        restated = _is_unevaluated(answer) and not _is_unevaluated(gold_parsed)
        scores.append(0.0 if restated else float(verify(gold_parsed, answer, timeout_seconds=TIMEOUT_S)))
    return scores


def _is_unevaluated(parsed: list) -> bool:
    """The extracted answer (math-verify's matched text, its last item) is arithmetic not done."""
    return bool(parsed) and isinstance(parsed[-1], str) and _UNEVALUATED.search(parsed[-1]) is not None


def _submit_to_helper(golds: list[str], responses: list[str]) -> list[float]:
    """Runs ``_score_answers`` in the helper process (one per process, started on first use;
    spawned, as forking a threaded process is unsafe), starting a new one if it died."""
    global _helper
    with _helper_lock:
        if _helper is None:
            _helper = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        helper = _helper
    try:
        return helper.submit(_score_answers, golds, responses).result()
    except BrokenProcessPool:
        with _helper_lock:
            if _helper is helper:
                _helper = None
        raise


def _single_boxed(response: str) -> bool:
    """Exactly one ``\\boxed{`` and its braces close on a non-empty content."""
    if response.count("\\boxed{") != 1:
        return False
    start = response.index("\\boxed{") + len("\\boxed{")
    depth = 1
    for end in range(start, len(response)):
        depth += {"{": 1, "}": -1}.get(response[end], 0)
        if depth == 0:
            return bool(response[start:end].strip())
    return False
