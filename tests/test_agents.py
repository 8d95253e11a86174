"""Multi-turn rollouts with tools, in one process (no Ray): the tool-call parser, the tool runner
and its failures, trajectories built token in, token out, the turn formats, the built-in
calculator task, and the rollout loop (with a real HF engine, and with a scripted policy where a
policy that calls tools is needed: a random tiny model never writes a tool call)."""

from __future__ import annotations

import re
import time

import agent_tool_faults as faults
import pytest
import torch
from agent_helpers import MoreEnv, RecordingSampler, ScriptedPolicy, ScriptedPool

from rlhf_ray.agents import (
    Environment,
    Limits,
    Step,
    Tool,
    ToolCall,
    ToolCallError,
    ToolRunner,
    Trajectory,
    parse_tool_calls,
)
from rlhf_ray.agents.loop import BAD_CALL, AgentRollout
from rlhf_ray.agents.render import ChatTemplateFormat, PlainFormat, demonstration, turn_format
from rlhf_ray.agents.runner import DIED, GARBAGE, RAISED, TIMEOUT
from rlhf_ray.agents.trajectory import DONE, MAX_TOKENS, MAX_TURNS
from rlhf_ray.engines.sampling import Generation, SamplingSpec
from rlhf_ray.models.tiny import build_tokenizer
from rlhf_ray.tasks.multiplication import (
    CALC,
    CalculatorEnv,
    MultiplicationTask,
    calc,
    call_text,
    gold_reward,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tool_chars=True)


# --- parsing tool calls -------------------------------------------------------------------------
def test_tool_calls_parse_in_order_and_bad_ones_say_what_is_wrong():
    message = ('let me see <tool_call>{"name": "calc", "arguments": {"expr": "2*3"}}</tool_call> and '
               '<tool_call>{"name": "calc", "arguments": {"expr": "4"}}</tool_call>')
    assert parse_tool_calls(message, {"calc"}) == [ToolCall("calc", {"expr": "2*3"}), ToolCall("calc", {"expr": "4"})]
    assert parse_tool_calls("no call here, just 6", {"calc"}) == []
    cases = {'<tool_call>{"name": "calc", "arguments": {"expr": </tool_call>': "not JSON",
             '<tool_call>{"arguments": {}}</tool_call>': '{"name"',
             '<tool_call>["calc"]</tool_call>': '{"name"',
             '<tool_call>{"name": "calc", "arguments": "2*3"}</tool_call>': "arguments must be a JSON object",
             '<tool_call>{"name": "rm", "arguments": {}}</tool_call>': "unknown tool 'rm'; tools: calc",
             '<tool_call>{"name": "calc", "argu': "unclosed <tool_call>"}
    for message, error in cases.items():
        [parsed] = parse_tool_calls(message, {"calc"})
        assert isinstance(parsed, ToolCallError) and error in parsed.error, (message, parsed)
    # A call without arguments has empty ones.
    assert parse_tool_calls('<tool_call>{"name": "calc"}</tool_call>') == [ToolCall("calc", {})]


# --- the tool runner ----------------------------------------------------------------------------
def _tool(function, name=None) -> Tool:
    return Tool(name or function.__name__, function, "test tool")


def test_tool_runner_turns_every_failure_into_an_error_result_and_keeps_serving():
    tools = [CALC, _tool(faults.raises), _tool(faults.hangs), _tool(faults.garbage), _tool(faults.kills_its_process),
             _tool(faults.floods)]
    with ToolRunner(tools, workers=2, timeout_s=1.0, max_chars=50) as runner:
        assert runner.run(ToolCall("calc", {"expr": "37*58"})).content == "2146"
        raised = runner.run(ToolCall("raises", {"x": 7}))
        assert (raised.error, raised.content) == (RAISED, "error: RuntimeError: cannot handle 7")
        bad_arguments = runner.run(ToolCall("calc", {"expression": "1+1"}))  # wrong keyword: the tool raises
        assert bad_arguments.error == RAISED and "expression" in bad_arguments.content
        start = time.monotonic()
        hung = runner.run(ToolCall("hangs", {"seconds": 60}))
        assert hung.error == TIMEOUT and "did not answer within 1 s" in hung.content
        assert time.monotonic() - start < 10  # killed at its limit, not waited for
        assert runner.run(ToolCall("garbage", {})).error == GARBAGE
        assert runner.run(ToolCall("kills_its_process", {})).error == DIED
        flood = runner.run(ToolCall("floods", {"n": 10_000}))
        assert flood.error == "" and flood.content.startswith("x" * 50) and "cut at 50 characters" in flood.content
        # After a timeout and a crash, fresh processes serve the next calls.
        assert [runner.run(ToolCall("calc", {"expr": f"{i}*2"})).content for i in range(3)] == ["0", "2", "4"]


def test_tool_runner_refuses_a_function_a_tool_process_cannot_import():
    with pytest.raises(ValueError, match="tool 'inline': its function must be a module-level function"):
        ToolRunner([Tool("inline", lambda: 1, "not importable")])


def test_a_slow_tool_does_not_hold_up_the_other_calls():
    with ToolRunner([_tool(faults.hangs), _tool(faults.echo)], workers=2, timeout_s=5.0) as runner:
        slow = runner.submit(ToolCall("hangs", {"seconds": 1.5}))
        fast = runner.submit(ToolCall("echo", {"text": "hi"}))
        assert fast.result(timeout=1.2).content == "hi" and not slow.done()
        assert slow.result().content == "woke up"


# --- trajectories and turn formats --------------------------------------------------------------
def test_trajectory_appends_tokens_as_given_and_marks_only_the_policys():
    t = Trajectory(0, [5, 6])
    t.add_generation([10, 11, 2], [-0.1, -0.2, -0.3], "ab")
    t.add_observation([20, 21], "tool", "r")
    t.add_generation([12, 2], [-0.4, -0.5], "c")
    assert t.tokens == [5, 6, 10, 11, 2, 20, 21, 12, 2]
    assert t.policy_mask == [1, 1, 1, 0, 0, 1, 1]
    assert t.logprobs == [-0.1, -0.2, -0.3, 0.0, 0.0, -0.4, -0.5]
    assert (t.generated_tokens, t.observed_tokens, t.policy_turns) == (5, 2, 2)
    assert [(turn.role, turn.start, turn.end) for turn in t.turns] == [("assistant", 0, 3), ("tool", 3, 5),
                                                                       ("assistant", 5, 7)]
    assert t.room(Limits(max_tokens=10, max_new_tokens=8)) == 3
    with pytest.raises(ValueError, match="2 generated tokens but 1 log-probs"):
        t.add_generation([1, 2], [-1.0], "x")


def test_plain_format_lays_out_turns_as_the_demonstrations_do(tokenizer):
    fmt = PlainFormat(tokenizer)
    task = MultiplicationTask()
    prompt = fmt.prompt_ids("37*58=", [CALC.schema()])
    call = tokenizer(call_text("37*58"), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    observed = fmt.observation_ids([{"role": "tool", "content": "2146"}], call)
    answer = tokenizer("2146", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    demo = tokenizer(task.transcript(37, 58), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert prompt == tokenizer("37*58=")["input_ids"]
    assert call + observed + answer == demo  # RL trajectories and SFT demonstrations share one layout
    laid_out = demonstration(fmt, tokenizer, "37*58=", task.turns(37, 58))
    assert (laid_out.prompt_ids, laid_out.response_ids) == (prompt, demo)
    assert laid_out.policy_mask == [1] * len(call) + [0] * len(observed) + [1] * len(answer)
    assert [(t.role, t.text) for t in laid_out.turns] == [("assistant", call_text("37*58")),
                                                          ("tool", "\n<tool_response>2146</tool_response>\n"),
                                                          ("assistant", "2146")]
    with pytest.raises(ValueError, match="must start and end with the assistant's"):
        demonstration(fmt, tokenizer, "37*58=", task.turns(37, 58)[:2])


# --- SFT on multi-turn demonstrations -------------------------------------------------------------
def _sft_batch(tokenizer, n=8):
    """The calculator task's demonstrations (some call the tool, some answer without it) as SFT's batch."""
    from rlhf_ray.data.formats import task_sft
    from rlhf_ray.data.tokenize import encode_examples

    examples = task_sft(MultiplicationTask(), n)
    assert any(e.turns for e in examples) and not all(e.turns for e in examples)
    return examples, encode_examples(tokenizer, examples, max_prompt_tokens=16, max_seq_len=160)


def test_sft_trains_on_the_policys_turns_and_masks_the_tool_results(tokenizer):
    examples, batch = _sft_batch(tokenizer)
    eos = [tokenizer.eos_token_id]
    for row, example in enumerate(examples):
        response = batch.response_token_lists()[row]
        mask = batch.response_mask[row, :len(response)].tolist()
        assert batch.prompt_token_lists()[row] == tokenizer(example.prompt)["input_ids"]
        assert response == tokenizer(example.response, add_special_tokens=False)["input_ids"] + eos
        if not example.turns:  # a one-turn answer: every token is the policy's
            assert mask == [1] * len(response)
            continue
        call, result, _ = (m["content"] for m in example.turns)
        observation = f"\n<tool_response>{result}</tool_response>\n"
        n_call, n_observed = (len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in
                              (call + "</s>", observation))
        # 0 exactly on the observation (the tool's result and the next turn's prompt), 1 on the
        # policy's call and answer, each with its end token.
        assert mask == [1] * n_call + [0] * n_observed + [1] * (len(response) - n_call - n_observed)
        assert tokenizer.decode(response[n_call: n_call + n_observed]) == observation


def _logit_gradients(model, batch, loss_of) -> torch.Tensor:
    """|d loss_of(model, batch) / d logits| summed over the vocabulary at each position that predicts
    a response token, ``[B, R]``."""
    from rlhf_ray.engines import scoring

    scoring.disable_packing(model)  # positions as laid out: position P-1+j predicts response token j
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["logits"] = output

    model.lm_head.register_forward_hook(keep)
    loss_of(model, batch).backward()
    P, R = batch.prompt_len, batch.response_mask.shape[1]
    return captured["logits"].grad[:, P - 1: P - 1 + R].abs().sum(-1)


def test_the_sft_loss_gives_the_tool_results_no_gradient(tokenizer):
    """d(SFT loss)/d(logits) is zero at every position that predicts an observed token of a
    demonstration (a tool's result), and not at the policy's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_ray import algo
    from rlhf_ray.engines import scoring

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id))
    _, batch = _sft_batch(tokenizer)
    per_position = _logit_gradients(model, batch, lambda m, b: algo.language_model_loss(
        scoring.response_logprobs(m, b), b.response_mask))  # the learner's sft_step loss
    policy = batch.response_mask.bool()
    observed = batch.attention_mask[:, batch.prompt_len:].bool() & ~policy
    assert observed.any() and (per_position[observed] == 0).all()
    assert (per_position[policy] > 0).all()


# A Hermes-style template (Qwen 2.5's layout), for the chat-template format on the tiny tokenizer.
HERMES_TEMPLATE = (
    "{% if tools %}<s>system\nTools: {{ tools | map(attribute='function.name') | join(',') }}</s>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<s>user\n<tool_response>{{ m.content }}</tool_response></s>\n"
    "{% else %}<s>{{ m.role }}\n{{ m.content }}</s>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_chat_template_observations_continue_the_policys_turn_as_the_template_renders_it():
    tokenizer = build_tokenizer(tool_chars=True)
    tokenizer.chat_template = HERMES_TEMPLATE
    fmt = turn_format(tokenizer)
    assert isinstance(fmt, ChatTemplateFormat) and fmt.turn_end == "</s>\n"
    prompt = fmt.prompt_ids("3*4=", [CALC.schema()])
    call = tokenizer(call_text("3*4"), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    observed = fmt.observation_ids([{"role": "tool", "content": "12"}], call)
    # The same conversation rendered whole: the pieces appended turn by turn equal it token for token.
    whole = tokenizer.apply_chat_template(
        [{"role": "user", "content": "3*4="}, {"role": "assistant", "content": call_text("3*4")},
         {"role": "tool", "content": "12"}], tools=[CALC.schema()], tokenize=False, add_generation_prompt=True)
    assert prompt + call + observed == tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(observed) == "\n<s>user\n<tool_response>12</tool_response></s>\n<s>assistant\n"
    assert isinstance(turn_format(build_tokenizer()), PlainFormat)


def test_a_prompt_from_a_chat_file_opens_the_trajectory_once_templated(bpe_tokenizer):
    """data.prompts rows of messages arrive rendered (``ChatPrompt``); the trajectory starts from
    their messages, not from that text wrapped in a second user turn."""
    from rlhf_ray.data.formats import ChatPrompt, render_prompt

    messages = [{"role": "system", "content": "Use the calculator."}, {"role": "user", "content": "3*4="}]
    rendered = ChatPrompt(render_prompt(messages, bpe_tokenizer), messages)
    fmt = turn_format(bpe_tokenizer)
    ids = fmt.prompt_ids(rendered, [CALC.schema()])
    assert ids == fmt.prompt_ids(messages, [CALC.schema()])
    assert bpe_tokenizer.decode(ids).count("<|im_start|>user") == 1


@pytest.mark.parametrize("between", [{"role": "tool", "content": "2146"},
                                     {"role": "user", "content": "Are you sure?"}], ids=["tool", "user"])
def test_chat_sft_rows_train_on_every_assistant_turn_and_only_on_those(tmp_path, bpe_tokenizer, between):
    """A ``messages`` SFT row of several assistant turns (a tool call and its result, or a user's
    reply between answers): every assistant turn is trained, what comes between is observed, and
    the whole sequence is the template's rendering of the conversation, token for token."""
    import json

    from rlhf_ray.data.formats import load_sft
    from rlhf_ray.data.tokenize import encode_examples

    messages = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "37*58="},
                {"role": "assistant", "content": call_text("37*58")}, between,
                {"role": "assistant", "content": "The product is 2146."}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    [example], _ = load_sft(str(path), tokenizer=bpe_tokenizer)
    batch = encode_examples(bpe_tokenizer, [example], max_prompt_tokens=256, max_seq_len=512)
    prompt, [response] = batch.prompt_token_lists()[0], batch.response_token_lists()
    mask = batch.response_mask[0, :len(response)].bool().tolist()
    whole = bpe_tokenizer.apply_chat_template(messages, tokenize=False).removesuffix("\n")
    assert bpe_tokenizer.decode(prompt + response) == whole
    trained = [t for t, m in zip(response, mask) if m]
    assert bpe_tokenizer.decode(trained) == call_text("37*58") + "<|im_end|>The product is 2146.<|im_end|>"
    observed = bpe_tokenizer.decode([t for t, m in zip(response, mask) if not m])
    assert observed == f"\n<|im_start|>{between['role']}\n{between['content']}<|im_end|>\n<|im_start|>assistant\n"
    assert bpe_tokenizer.decode(prompt).endswith("<|im_start|>user\n37*58=<|im_end|>\n<|im_start|>assistant\n")
    # Without a chat template there is no trajectory layout to follow: the last turn is the answer.
    plain = build_tokenizer(tool_chars=True)
    [example], _ = load_sft(str(path), tokenizer=plain)
    assert example.turns is None and example.response == "The product is 2146."


# --- the built-in calculator task ---------------------------------------------------------------
def test_calculator_tool_computes_arithmetic_and_refuses_anything_else():
    assert (calc("37*58"), calc("(7+3)/4"), calc("-3*2"), calc("9/3")) == (2146, 2.5, -6, 3)
    for bad in ("__import__('os').getcwd()", "2**100000", "x*2", "[1]*3"):
        with pytest.raises(ValueError, match="not arithmetic"):
            calc(bad)


def test_multiplication_gold_scorer_reads_the_final_answer():
    task = MultiplicationTask()
    assert task.gold_score("37*58=", task.transcript(37, 58)) == 1.0
    assert task.gold_score("37*58=", "2146") == 1.0
    assert task.gold_score("37*58=", task.transcript(37, 58, answer=2147)) == 0.0
    assert task.gold_score("37*58=", call_text("37*58")) == 0.0  # asked, never answered
    assert gold_reward(["10*10=", "10*10="], ["100", "10"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a multiplication prompt"):
        task.gold_score("3+4=", "7")


def test_multiplication_demonstrations_mostly_use_the_tool_and_some_are_imperfect():
    task = MultiplicationTask()
    rows = task.sft_examples(400, error_rate=0.2, no_tool_rate=0.25)
    with_tool = [r for r in rows if "<tool_call>" in r["response"]]
    right = [task.gold_score(r["prompt"], r["response"]) for r in with_tool]
    assert 0.65 < len(with_tool) / len(rows) < 0.85
    assert 0.7 < sum(right) / len(right) < 0.95  # the imperfect ones
    assert all(task.gold_score(r["prompt"], r["response"]) == 0.0 for r in rows if r not in with_tool)
    assert len(set(task.prompts(50, "train")) & set(task.prompts(50, "eval"))) < 5
    pair = task.preference_pairs(1)[0]
    assert task.gold_score(pair["prompt"], pair["chosen"]) == 1.0 > task.gold_score(pair["prompt"], pair["rejected"])


# --- the rollout loop ---------------------------------------------------------------------------
class ToolEnv(Environment):
    tools = [CALC, _tool(faults.hangs), _tool(faults.raises)]  # noqa: RUF012

    def reset(self, row):
        self.prompt = row["prompt"]
        return row["prompt"]

    def step(self, message):
        return Step(reward=1.0 if message.strip() == "done" else 0.0, done=True)


def _call(name, **arguments):
    import json

    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_rollout_runs_tools_between_turns_and_answers_bad_calls_with_errors(tokenizer):
    script = {"a": [_call("calc", expr="6*7"), "done"],
              "b": ['<tool_call>{"name": "calc", oops</tool_call>', _call("raises", x=1), "done"],
              "c": [_call("calc", expr="1+1"), _call("calc", expr="2+2"), _call("calc", expr="3+3"), "3"],
              # Two calls in one message: two results in one observation, so the reply is at index 2.
              "d": [_call("calc", expr="5*5") + " and " + _call("calc", expr="1+2"), None, "done"]}

    def policy(text):
        return script[text[0]][text.count("<tool_response>")]

    runner = ToolRunner(ToolEnv.tools, workers=2, timeout_s=5.0)
    rollout = AgentRollout(ToolEnv, PlainFormat(tokenizer), tokenizer, runner, Limits(max_turns=3, max_tokens=400, max_new_tokens=160))
    with runner:
        trajectories, stats = rollout.run([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}, {"prompt": "d"}], 1,
                                          SamplingSpec(seed=0), ScriptedPolicy(tokenizer, policy))
    a, b, c, d = trajectories
    assert [t.role for t in a.turns] == ["assistant", "tool", "assistant"]
    assert a.turns[1].text == "\n<tool_response>42</tool_response>\n" and a.turns[1].tool == "calc"
    assert (a.reward, a.finish) == (1.0, DONE)
    assert b.turns[1].error == BAD_CALL and "not JSON" in b.turns[1].text
    assert b.turns[3].error == RAISED and "RuntimeError: cannot handle 1" in b.turns[3].text
    assert (b.reward, b.finish) == (1.0, DONE)
    # c asks a third time on its last turn: no turn is left to read the result, so it ends there.
    assert (c.policy_turns, c.finish, c.reward) == (3, MAX_TURNS, None)
    # Two calls in one message: one observation, results in call order.
    assert d.turns[1].text == "\n<tool_response>25</tool_response>\n<tool_response>3</tool_response>\n"
    assert d.turns[1].tool == "calc,calc" and d.finish == DONE
    metrics = stats.metrics()
    assert metrics["agent/tool_calls"] == 7 and metrics["agent/tool_errors"] == 2
    assert metrics["agent/bad_tool_calls"] == 1 and metrics["agent/tool_timeouts"] == 0
    assert metrics["agent/turns_mean"] == pytest.approx(10 / 4)
    assert metrics["agent/generated_tokens"] == sum(t.generated_tokens for t in trajectories)
    assert metrics["agent/observed_tokens"] == sum(t.observed_tokens for t in trajectories) > 0
    for t in trajectories:  # token in, token out: each turn's tokens are the sampled ones, in order
        for turn in t.turns:
            ids = t.response_ids[turn.start: turn.end]
            assert all(t.policy_mask[turn.start: turn.end]) == (turn.role == "assistant")
            if turn.role == "assistant":
                assert t.logprobs[turn.start: turn.end] == [-0.5] * len(ids)


def test_a_trajectory_waiting_on_a_slow_tool_holds_up_no_other(tokenizer):
    script = {"s": [_call("hangs", seconds=1.0), "done"], "q": ["x", "y", "done"]}

    class Chat(ToolEnv):
        def step(self, message):  # replies "go on" twice, so "q" takes three turns
            return Step(reward=1.0, done=message.strip() == "done", observation="go on")

    def policy(text):
        return script[text[0]][text.count("<tool_response>") + text.count("go on")]

    sampler = ScriptedPolicy(tokenizer, policy)
    runner = ToolRunner(Chat.tools, workers=1, timeout_s=10.0)
    with runner:
        start = time.monotonic()
        (slow, quick), _ = AgentRollout(Chat, PlainFormat(tokenizer), tokenizer, runner,
                                         Limits(max_new_tokens=100)).run(
            [{"prompt": "s"}, {"prompt": "q"}], 1, SamplingSpec(), sampler)
    assert slow.finish == quick.finish == DONE and quick.policy_turns == 3
    quick_done = max(t for t, prompts in sampler.answered if any(p.startswith("q") for p in prompts))
    assert quick_done - start < 0.8  # all three of q's turns while s's tool still ran
    assert max(t for t, _ in sampler.answered) - start >= 1.0


def test_rollout_limits_end_trajectories_and_timeouts_are_counted(tokenizer):
    def policy(text):
        return _call("hangs", seconds=30) if text.startswith("t") else "7" * 90

    runner = ToolRunner(ToolEnv.tools, workers=2, timeout_s=0.5)
    with runner:
        (timed, long), stats = AgentRollout(ToolEnv, PlainFormat(tokenizer), tokenizer, runner,
                                            Limits(max_turns=2, max_tokens=300, max_new_tokens=80)).run(
            [{"prompt": "t"}, {"prompt": "l"}], 1, SamplingSpec(), ScriptedPolicy(tokenizer, policy))
    assert "did not answer within 0.5 s" in timed.turns[1].text and timed.turns[1].error == TIMEOUT
    assert timed.finish == MAX_TURNS
    assert long.finish == MAX_TOKENS and long.truncated and long.generated_tokens == 80
    assert stats.metrics()["agent/tool_timeouts"] == 1
    # The token budget: an observation that would leave the policy no room ends the trajectory.
    tight = ToolRunner([CALC], workers=1)
    with tight:
        (t,), _ = AgentRollout(CalculatorEnv, PlainFormat(tokenizer), tokenizer, tight,
                               Limits(max_tokens=len(call_text("2*2")) + 5, max_new_tokens=100)).run(
            [{"prompt": "2*2="}], 1, SamplingSpec(), ScriptedPolicy(tokenizer, lambda text: call_text("2*2")))
    assert t.finish == MAX_TOKENS and [turn.role for turn in t.turns] == ["assistant"]


def test_rollout_with_a_real_engine_keeps_its_tokens_and_log_probs_exactly(tiny_model_dir):
    """A real tiny model through HF generate: the trajectory's tokens are the engine's, turn by turn."""
    from rlhf_ray.engines.hf_engine import HFEngine

    tokenizer = build_tokenizer()

    sampler = RecordingSampler(HFEngine(tiny_model_dir))
    stop = tuple(range(2, 60))  # a random model's turns end within a few tokens: several turns fit
    with ToolRunner([]) as runner:
        trajectories, stats = AgentRollout(MoreEnv, PlainFormat(tokenizer), tokenizer, runner,
                                           Limits(max_turns=3, max_tokens=60, max_new_tokens=8)).run(
            [{"prompt": "1*2="}, {"prompt": "3*4="}], 2, SamplingSpec(seed=1, stop_token_ids=stop), sampler)
    assert stats.metrics()["agent/turns_mean"] > 1
    for t in trajectories:
        assert t.finish in (MAX_TURNS, MAX_TOKENS)
        for turn in (turn for turn in t.turns if turn.role == "assistant"):
            # The engine's generation for exactly this context, found among all it produced.
            context = t.tokens[: len(t.prompt_ids) + turn.start]
            made = [(g.response_ids, g.logprobs) for g in sampler.outputs if g.prompt_ids == context]
            assert (t.response_ids[turn.start: turn.end], t.logprobs[turn.start: turn.end]) in made
        for turn in (turn for turn in t.turns if turn.role == "user"):
            assert tokenizer.decode(t.response_ids[turn.start: turn.end]) == "\nmore\n"


# --- into training: the batch, the advantages, the gradient -------------------------------------
def _two_turn_trajectories() -> list[Trajectory]:
    """Row 0: generate 3, observe 2, generate 2. Row 1: generate 2 (one turn)."""
    a = Trajectory(0, [5, 6])
    a.add_generation([10, 11, 2], [-0.1, -0.2, -0.3], "")
    a.add_observation([20, 21], "tool", "")
    a.add_generation([12, 2], [-0.4, -0.5], "")
    b = Trajectory(1, [7])
    b.add_generation([13, 2], [-0.6, -0.7], "")
    b.truncated = True
    return [a, b]


def test_the_learners_batch_holds_each_trajectory_token_for_token_with_only_the_policys_marked():
    from rlhf_ray.stages.prepare import batch_from_trajectories

    trajectories = _two_turn_trajectories()
    batch, logprobs, truncated = batch_from_trajectories(trajectories, pad_id=0)
    for row, t in enumerate(trajectories):
        real = batch.attention_mask[row].bool()
        assert batch.sequences[row][real].tolist() == t.tokens
        n = len(t.response_ids)
        assert batch.response_mask[row, :n].tolist() == t.policy_mask
        assert logprobs[row, :n].tolist() == pytest.approx(t.logprobs)
    assert batch.response_token_lists() == [t.response_ids for t in trajectories]
    assert truncated.tolist() == [False, True]
    # Trimming and micro-batching keep the observed tokens (real, only out of the loss).
    trimmed = batch.trimmed()
    assert trimmed.response_mask.shape[1] == 7 and trimmed.response_token_lists() == batch.response_token_lists()


def _gae_reference(rewards, values, mask, gamma, lam):
    """GAE over each row's masked tokens alone, as if the unmasked ones were not there."""
    advantages = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[row, t]]
        running, next_value = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            running = delta + gamma * lam * running
            advantages[row, t] = running
            next_value = values[row, t]
    return advantages


def test_gae_skips_the_observed_tokens_as_if_they_were_not_there():
    from rlhf_ray import algo

    generator = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 9, generator=generator), torch.randn(3, 9, generator=generator)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    advantages, returns = algo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, _gae_reference(rewards, values, mask, 0.9, 0.8))
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()
    assert returns[mask == 1].tolist() == pytest.approx((advantages + values)[mask == 1].tolist())


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_advantages_and_kl_of_a_multi_turn_batch_live_on_the_policys_tokens_only(estimator):
    from rlhf_ray.config import load_config
    from rlhf_ray.stages.prepare import Scored, batch_from_trajectories, prepare_batch

    trajectories = _two_turn_trajectories()
    batch, logprobs, truncated = batch_from_trajectories(trajectories, pad_id=0)
    cfg = load_config(None, [f"ppo.advantage_estimator={estimator}", "rollout.samples_per_prompt=2",
                             "ppo.prompts_per_iteration=1", "ppo.kl_estimator=k1"])
    ref = torch.full_like(logprobs, -1.0)
    scored = Scored(logprobs, ref, logprobs, torch.ones_like(logprobs), torch.tensor([1.0, 0.0]), truncated)
    prepared = prepare_batch(batch, scored, cfg, kl_coef=0.1, recomputed=False)
    policy = batch.response_mask.bool()
    assert (prepared.advantages[~policy] == 0).all() and (prepared.advantages[policy] != 0).all()
    expected_kl = [sum(lp + 1.0 for lp in t.logprobs if lp) for t in trajectories]  # k1 over generated tokens
    assert prepared.kl_per_seq.tolist() == pytest.approx(expected_kl)


def test_observed_tokens_get_no_gradient_from_the_policy_objective(tiny_model_dir):
    """The learner's objective on a real model: d(loss)/d(logits) is zero at every position that
    predicts an observed token, and not at the policy's."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray import algo
    from rlhf_ray.actors.learner import policy_objective
    from rlhf_ray.stages.prepare import batch_from_trajectories

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch, logprobs, _ = batch_from_trajectories(_two_turn_trajectories(), pad_id=0)
    generator = torch.Generator().manual_seed(1)
    batch = batch.with_extras(old_logprobs=logprobs, advantages=torch.randn(logprobs.shape, generator=generator),
                              ref_logprobs=logprobs - 0.3)
    loss = algo.PolicyLossSpec(kind="ppo", clip_eps=0.2, agg="token-mean")
    per_position = _logit_gradients(model, batch, lambda m, b: policy_objective(
        m, b, loss, entropy_coef=0.01, temperature=1.0, distill_coef=0.1)[0])
    policy = batch.response_mask.bool()
    assert (per_position[~policy] == 0).all()
    assert (per_position[policy] > 0).all()


@pytest.mark.parametrize("with_tools", [True, False])
def test_ppo_held_out_eval_scores_the_engines_answers_to_held_out_prompts(tokenizer, with_tools):
    """``ppo.eval_every``: the gold score of the engines' greedy answers (with agent.env, of
    trajectories that call the tool) to the task's held-out prompts, with the trajectories' tool
    use; with eval.samples, sampled answers too (one fixed seed), their mean and pass@k."""
    from types import SimpleNamespace

    from rlhf_ray.config import load_config
    from rlhf_ray.stages.agent_rollout import MultiTurnRollouts
    from rlhf_ray.stages.eval import held_out_prompts, held_out_rewards
    from rlhf_ray.stages.ppo import PPOTrainer

    def script(text):  # asks the calculator, then copies its result: right whenever the first factor is even
        asked = re.search(r"(\d+)\*(\d+)=", text)
        result = re.search(r"<tool_response>(\d+)</tool_response>", text)
        if not with_tools:
            return str(int(asked[1]) * int(asked[2])) if int(asked[1]) % 2 == 0 else "0"
        if result is None:
            return call_text(f"{asked[1]}*{asked[2]}")
        return result[1] if int(asked[1]) % 2 == 0 else "0"

    # With tools greedy only; without, greedy and 2 samples at eval.temperature with one fixed seed.
    cfg = load_config(None, ["data.task=multiplication", "data.num_eval_prompts=12", "ppo.eval_every=5",
                             *(["agent.env=task", "rollout.max_new_tokens=80"] if with_tools
                               else ["eval.samples=2", "eval.temperature=0.7"])])
    trainer = object.__new__(PPOTrainer)  # the evaluation alone: no actors
    policy = ScriptedPolicy(tokenizer, script)
    trainer.cfg, trainer.tokenizer, trainer.stop_ids, trainer.iteration = cfg, tokenizer, (2,), 3
    trainer.eval_prompts = held_out_prompts(cfg)
    trainer.eval_rewards = held_out_rewards(cfg)
    trainer.agents = MultiTurnRollouts(cfg, tokenizer) if with_tools else None
    trainer.roles = SimpleNamespace(rollout=ScriptedPool(policy))
    try:
        metrics = trainer.held_out_eval()
    finally:
        if trainer.agents:
            trainer.agents.close()
    sampled_seed = trainer._spec(cfg.ppo.iterations).seed  # the iteration after the last: no training batch's
    assert list(trainer.eval_rewards) == ["gold"]
    asked = list(dict.fromkeys((spec.temperature, spec.n, spec.seed) for spec in policy.specs))  # every turn asks
    assert asked == ([(0.0, 1, None)] if with_tools else [(0.0, 1, None), (0.7, 2, sampled_seed)])
    even = [int(p.split("*")[0]) % 2 == 0 for p in trainer.eval_prompts]
    assert trainer.eval_prompts == MultiplicationTask().prompts(12, "eval") and 0 < sum(even) < 12
    assert metrics["eval/gold"] == pytest.approx(sum(even) / 12)
    if with_tools:
        assert metrics["eval/tool_calls_per_trajectory"] == 1.0 and metrics["eval/turns_mean"] == 2.0
        assert metrics["eval/finish_done"] == 1.0 and metrics["eval/tool_errors"] == 0
    else:  # the scripted policy answers alike at any temperature: every sample as the greedy one
        assert metrics["eval/sampled/gold"] == pytest.approx(sum(even) / 12)
        assert metrics["eval/pass@2/gold"] == pytest.approx(sum(even) / 12)
        assert {k for k in metrics if k.startswith("eval/")} == {"eval/gold", "eval/sampled/gold", "eval/pass@2/gold"}


def test_environment_rewards_replace_the_reward_sources_score_where_given():
    from rlhf_ray.config import load_config
    from rlhf_ray.stages.agent_rollout import MultiTurnRollouts

    cfg = load_config(None, ["agent.env=task", "data.task=multiplication"])
    rollouts = MultiTurnRollouts(cfg, build_tokenizer(tool_chars=True))
    a, b = _two_turn_trajectories()
    a.reward = 1.0
    rewards = rollouts.rewards({"score": torch.tensor([0.2, 0.3]), "reward/gold_reward": torch.tensor([0.0, 0.0])},
                               [a, b])
    assert rewards["score"].tolist() == pytest.approx([1.0, 0.3])
    assert rollouts.metrics()["agent/env_rewarded_fraction"] == 0.5
    rows = rollouts.with_turns([{"prompt": "p"}], [a])
    assert [turn["role"] for turn in rows[0]["turns"]] == ["assistant", "tool", "assistant"]
    rollouts.close()


def test_agent_config_is_checked_before_any_work():
    from rlhf_ray.config import ConfigError, load_config
    from rlhf_ray.errors import BadInputError
    from rlhf_ray.stages.agent_rollout import environment_class

    with pytest.raises(ConfigError) as e:
        load_config(None, ["agent.env=task", "data.task=", "ppo.dynamic_sampling=true", "agent.tool_timeout_s=0",
                           "rollout.samples_per_prompt=2", "ppo.eval_every=5", "eval.temperature=0"])
    for key in ("agent.env: task needs data.task", "ppo.dynamic_sampling: is not supported",
                "agent.tool_timeout_s: must be > 0", "ppo.eval_every: needs held-out prompts",
                "eval.temperature: must be > 0"):
        assert key in str(e.value)
    assert environment_class(load_config(None, ["agent.env=task", "data.task=multiplication"])) is CalculatorEnv
    for env, message in [("task", "data.task 'arithmetic' has no environment"),
                         ("no_such_module:Env", "agent.env: cannot import 'no_such_module'"),
                         ("rlhf_ray.tasks.multiplication:calc", "is not a class with reset(row) and step(message)")]:
        with pytest.raises(BadInputError, match=re.escape(message)):
            environment_class(load_config(None, [f"agent.env={env}", "data.task=arithmetic"]))


@pytest.mark.slow
def test_a_turn_whose_engine_died_is_sampled_again_on_another(ray_session):
    """Failure injection: two stand-in engine actors behind the pool's sampler, one of which dies
    on its first call; that turn comes back from the other, counted, and the dead one is named."""
    import os

    import ray

    from rlhf_ray.actors.rollout_pool import Engine, PoolSampler

    @ray.remote(num_cpus=0, max_restarts=0)
    class StandInEngine:
        def __init__(self, dies: bool):
            self.dies = dies

        def generate(self, prompt_ids, spec):
            if self.dies:
                os._exit(1)
            return [Generation(i, list(p), [7, 2], [-0.5, -0.5], "stop") for i, p in enumerate(prompt_ids)]

    class Pool:
        engines = {0: Engine(0, StandInEngine.remote(True), group=None, bundle=0, node=None),  # noqa: RUF012
                   1: Engine(1, StandInEngine.remote(False), group=None, bundle=0, node=None)}

    sampler = PoolSampler(Pool())
    # Fewest calls in flight: the first call goes to engine 0 (which dies), the second to engine 1.
    calls = [sampler.submit([[1, 2], [3]], SamplingSpec()) for _ in range(2)]
    for call in calls:
        assert [g.response_ids for g in call.result(timeout=120)] == [[7, 2], [7, 2]]
    assert sampler.dead == [0] and sampler.retried_calls == 1 and sampler.engines == 1


def test_a_pipeline_refuses_an_environment_that_does_not_load_before_its_first_stage(tmp_path, capsys):
    from rlhf_ray.cli import main

    assert main(["pipeline", f"run_dir={tmp_path / 'run'}", "agent.env=no_such_module:Env"]) == 2
    assert "agent.env: cannot import 'no_such_module'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_engine_calls_stay_within_their_prompt_token_budget(tokenizer):
    """A call's prompts fit one engine step (vLLM's CPU backend crashes on a seeded prefill split
    over steps): the loop cuts a batch of long contexts into calls of at most ``call_tokens``."""
    sampler = ScriptedPolicy(tokenizer, lambda text: "done")
    with ToolRunner([]) as runner:
        trajectories, stats = AgentRollout(ToolEnv, PlainFormat(tokenizer), tokenizer, runner, Limits(),
                                           call_tokens=25).run([{"prompt": "x" * 10}] * 6, 1, SamplingSpec(),
                                                               sampler)
    sizes = [sum(len(tokenizer(p)["input_ids"]) for p in prompts) for _, prompts in sampler.answered]
    assert all(t.finish == DONE for t in trajectories)
    assert max(sizes) <= 25 and sum(sizes) == 60 and stats.generate_calls == len(sizes) == 4  # 2 engines x 2 calls
