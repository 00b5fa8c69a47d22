"""Multi-turn episodes (opd.agents) on the real SmolLM2 tokenizer and its ChatML template.

The runner's logic (faults, limits, drift, the ledger's origins) is driven by a scripted policy: an engine
that replays given turns, since no small model can be made to write a malformed call on demand. What the
real engine does with a ledger (token in, token out, its log-probs) is tested with the HF engine on the
pruned student; the same ids through the teacher and the learner in tests/test_real_model.py.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time

import pytest
import torch
from transformers import AutoTokenizer

from opd.agents.env import EnvSpec, ToolEnvironment
from opd.agents.ledger import TemplateDrift, Transcript
from opd.agents.runner import AgentLimits, EpisodeRunner
from opd.agents.tools import Tool, calc
from opd.types import Generation, Prompt

CALL = '<tool_call>{{"name": "calc", "arguments": {{"a": {a}, "op": "{op}", "b": {b}}}}}</tool_call>'


@pytest.fixture(scope="module")
def tok(smollm2):
    return AutoTokenizer.from_pretrained(smollm2[1])


class Scripted:
    """A policy that writes the given turns (their exact ids, ``ids`` when given, else the text's), one per
    call, and keeps every context it was asked to continue."""

    def __init__(self, tok, turns: list):
        self.tok, self.turns, self.contexts = tok, list(turns), []

    def generate(self, prompt_ids, *, n, temperature, top_p, max_tokens, seeds=None):
        out = []
        for ctx in prompt_ids:
            self.contexts.append(list(ctx))
            turn = self.turns[min(len(self.contexts) - 1, len(self.turns) - 1)]
            ids = turn if isinstance(turn, list) else self.tok(turn, add_special_tokens=False)["input_ids"]
            cut = ids[:max_tokens]
            reason = "stop" if cut and cut[-1] in self.tok.all_special_ids else "length"
            out.append([Generation(cut, [-0.25] * len(cut), self.tok.decode(cut), reason)])
        return out


def _prompt(text="What is 347*86+129?") -> Prompt:
    return Prompt("p0", text, [], "29971", {"prompt": text, "answer": "29971"})


def _run(tok, turns, spec=None, **limits):
    engine = Scripted(tok, turns)
    runner = EpisodeRunner(engine, tok, spec or EnvSpec(), AgentLimits(**{"max_model_len": 2048, **limits}))
    [s] = runner.run([(_prompt(), 0)], n=1, temperature=1.0, top_p=1.0, seed=0, version=3)
    s.validate()
    return s, engine


def _segments(tok, s, origin):
    return [tok.decode(s.response_ids[a:b]) for o, a, b in s.episode.spans if o == origin]


def test_a_tool_episode_keeps_every_id_and_masks_all_but_the_drawn_ones(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    s, engine = _run(tok, [CALL.format(a=347, op="*", b=86) + "<|im_end|>",
                           CALL.format(a=29842, op="+", b=129) + "<|im_end|>", "29971<|im_end|>"])
    e = s.episode
    assert (e.stop, e.turns, e.tool_calls, e.tool_errors) == ("answered", 3, 2, 0)
    assert s.response_text == "29971" and s.finish_reason == "answered"
    # the tool's results, as the model reads them
    assert _segments(tok, s, "environment") == ["29842", "29971"]
    # the engine continued each time from exactly the ledger's ids
    full = s.prompt.token_ids + s.response_ids
    assert [len(c) for c in engine.contexts] == sorted(len(c) for c in engine.contexts)
    for ctx in engine.contexts:
        assert full[: len(ctx)] == ctx
    drawn = [i for o, a, b in e.spans if o == "sampled" for i in range(a, b)]
    assert [i for i, m in enumerate(s.loss_mask) if m] == drawn
    assert all(s.response_ids[b - 1] == end for o, a, b in e.spans if o == "sampled")  # each turn's end drawn
    assert [s.sampler_logprobs[i] for i in drawn] == [-0.25] * len(drawn)
    assert all(s.sampler_logprobs[i] == 0.0 for i in range(len(s.response_ids)) if i not in set(drawn))
    # the history is the chat template's rendering of the messages, token for token
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": ToolEnvironment([Tool.from_function(calc)]).reset(
            {"prompt": "x"}, 0)[0]["content"]}, {"role": "user", "content": "What is 347*86+129?"},
         {"role": "assistant", "content": CALL.format(a=347, op="*", b=86)},
         {"role": "tool", "content": "29842"},
         {"role": "assistant", "content": CALL.format(a=29842, op="+", b=129)},
         {"role": "tool", "content": "29971"}, {"role": "assistant", "content": "29971"}], tokenize=False)
    assert tok.decode(full) == rendered.rstrip("\n")


def test_sampled_ids_are_never_re_tokenised(tok):
    # "three" drawn one character at a time: other ids than the tokenizer gives for the same text
    chars = [t for c in "three" for t in tok(c, add_special_tokens=False)["input_ids"]]
    assert chars != tok("three", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    call = tok(CALL.format(a=1, op="+", b=2), add_special_tokens=False)["input_ids"]
    s, engine = _run(tok, [chars[:2] + call + [end], chars + [end]])
    turns = [s.response_ids[a:b] for o, a, b in s.episode.spans if o == "sampled"]
    assert turns[0][:2] == chars[:2] and turns[1] == chars + [end]
    assert engine.contexts[1][len(s.prompt.token_ids):][:2] == chars[:2]  # and the engine continued from them


def test_a_turn_is_cut_after_its_first_complete_tool_call(tok):
    s, engine = _run(tok, [CALL.format(a=2, op="*", b=3) + " and more text the policy wrote<|im_end|>",
                           "6<|im_end|>"])
    first = [(a, b) for o, a, b in s.episode.spans if o == "sampled"][0]
    assert tok.decode(s.response_ids[first[0]:first[1]]).endswith("</tool_call>")
    assert "more text" not in tok.decode(s.response_ids)


@pytest.mark.parametrize("turn,error", [
    ('<tool_call>{"name": "calc", "arguments": {"a": 1,</tool_call>', "not valid JSON"),
    ('<tool_call>{"name": "calc", "arguments": {"a": 1, "op": "+", "b": 2}', "not closed"),
    ('<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>', "unknown tool 'search'"),
    ('<tool_call>{"name": "calc", "arguments": {"a": 1, "x": 2}}</tool_call>',
     "missing argument(s) ['op', 'b']"),
    ('<tool_call>{"name": "calc", "arguments": {"a": 1, "op": "^", "b": 2}}</tool_call>',
     "op must be one of"),
])
def test_a_bad_call_is_an_error_observation_and_the_episode_goes_on(tok, turn, error):
    s, _ = _run(tok, [turn + "<|im_end|>", "3<|im_end|>"])
    e = s.episode
    assert (e.stop, e.turns, e.tool_errors) == ("answered", 2, 1), e
    [obs] = _segments(tok, s, "environment")
    assert obs.startswith("error:") and error in obs


def test_errors_in_a_row_end_the_episode_with_parse_error(tok):
    bad = '<tool_call>{"name": oops}</tool_call><|im_end|>'
    s, _ = _run(tok, [bad], EnvSpec(max_tool_errors=2), max_turns=8)
    assert (s.episode.stop, s.episode.turns, s.episode.tool_errors) == ("parse_error", 2, 2)


def _sleepy(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "woke"


def _huge(n: int) -> str:
    """A long result.

    Args:
        n: how many words
    """
    return "word " * n


def test_a_hung_tool_times_out_and_does_not_hold_the_episode(tok):
    env = ToolEnvironment([Tool("sleepy", _sleepy, Tool.from_function(_sleepy).schema, timeout_s=0.3)],
                          max_tool_timeouts=1)
    t0 = time.monotonic()
    step = env.step('<tool_call>{"name": "sleepy", "arguments": {"seconds": 30}}</tool_call>')
    assert time.monotonic() - t0 < 3
    assert (step.done, step.stop, step.tool_timeouts) == (True, "tool_timeout", 1)
    assert "timed out after 0.3s" in step.observations[0]["content"]


def test_a_huge_tool_output_is_cut_in_tokens(tok, tmp_path):
    spec = EnvSpec(tools=(f"{__file__}:_huge",))
    s, _ = _run(tok, ['<tool_call>{"name": "_huge", "arguments": {"n": 1000000}}</tool_call><|im_end|>',
                      "done<|im_end|>"], spec, max_observation_tokens=40, max_episode_tokens=400)
    [obs] = [b - a for o, a, b in s.episode.spans if o == "environment"]
    assert s.episode.stop == "answered" and 40 <= obs <= 40 + 16  # the cap plus the "[truncated: N ...]" note
    cut = re.search(r"truncated: (\d+) more tokens", _segments(tok, s, "environment")[0])
    assert cut and int(cut.group(1)) > 990_000


def test_context_full_stops_before_the_ledger_passes_the_model_length(tok):
    for max_len in (200, 240, 300, 360):
        turns = [CALL.format(a=1, op="+", b=2) + "<|im_end|>"] * 6
        s, _ = _run(tok, turns, max_turns=6, max_model_len=max_len)
        assert len(s.prompt.token_ids) + len(s.response_ids) <= max_len
        assert s.episode.stop in ("context_full", "length"), s.episode


def test_max_turns_and_length_are_stop_reasons(tok):
    s, _ = _run(tok, [CALL.format(a=1, op="+", b=2) + "<|im_end|>"], max_turns=2)
    assert (s.episode.stop, s.episode.turns) == ("max_turns", 2)
    s, _ = _run(tok, ["a long answer that never ends " * 10], max_turn_tokens=8)
    assert (s.episode.stop, len(s.response_ids)) == ("length", 8)


# A template that strips reasoning from earlier assistant turns (as Qwen3's does): not prefix-stable
DROPS_THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                  "{% if m['role'] == 'assistant' and not loop.last %}"
                  "{{ m['content'].split('</think>')[-1] }}"
                  "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_drift_is_detected_and_ends_the_episode(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2[1])
    tok.chat_template = DROPS_THINKING
    s, _ = _run(tok, ["<think>hm</think>" + CALL.format(a=1, op="+", b=2) + "<|im_end|>", "3<|im_end|>"])
    assert (s.episode.stop, s.episode.drift, s.episode.turns) == ("drift", True, 1)
    assert [o for o, _, _ in s.episode.spans] == ["sampled"]  # nothing appended after the drift
    t = Transcript(tok, [{"role": "user", "content": "q"}])
    t.add_turn(tok("<think>a</think>b<|im_end|>", add_special_tokens=False)["input_ids"])
    with pytest.raises(TemplateDrift, match="re-renders the history"):
        t.observe([{"role": "tool", "content": "r"}])
    # without reasoning in the turn the same template is prefix-stable
    s, _ = _run(tok, [CALL.format(a=1, op="+", b=2) + "<|im_end|>", "3<|im_end|>"])
    assert (s.episode.stop, s.episode.drift) == ("answered", False)


def test_a_tool_function_without_a_usable_docstring_is_refused():
    def no_doc(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="tool 'no_doc': no JSON schema"):
        Tool.from_function(no_doc)
    with pytest.raises(ValueError, match="unknown tool 'nope'"):
        EnvSpec(tools=("nope",)).make()
    with pytest.raises(ValueError, match="has no attribute"):
        EnvSpec(environment=f"{__file__}:Missing").make()


def test_the_hf_engine_continues_from_the_ledger_token_in_token_out(smollm2, tok):
    from opd.rollout.hf_engine import HFEngine

    engine = HFEngine(str(smollm2[1]), seed=0, max_model_len=512, threads=2)
    runner = EpisodeRunner(engine, tok, EnvSpec(), AgentLimits(max_turns=3, max_turn_tokens=12,
                                                                 max_model_len=512))
    samples = runner.run([(_prompt(), 0)], n=2, temperature=1.0, top_p=1.0, seed=1, version=0)
    for s in samples:
        full = s.prompt.token_ids + s.response_ids
        scored = engine.score([full], starts=[len(s.prompt.token_ids)])[0].token_logprobs
        drawn = [i for i, m in enumerate(s.loss_mask) if m]
        # the engine's log-probs of what it drew are the model's on the ledger's ids: it saw exactly those
        assert torch.allclose(torch.tensor([s.sampler_logprobs[i] for i in drawn]),
                              torch.tensor([scored[i] for i in drawn]), atol=1e-4)
    assert samples[0].response_ids != samples[1].response_ids  # two draws, not one copied


def test_ids_that_are_not_the_ledgers_are_refused_to_the_teacher_and_the_learner(tok):
    """A re-tokenised transcript (decode, encode: the classic drift) has other ids than the ledger; the
    teacher's request and the learner's batch are both built through ``Sample.checked_ids``."""
    from opd.types import RecordError

    s, _ = _run(tok, [CALL.format(a=1, op="+", b=2) + "<|im_end|>", "3<|im_end|>"])
    assert s.checked_ids("teacher") == s.prompt.token_ids + s.response_ids
    redone = tok(tok.decode(s.response_ids), add_special_tokens=False)["input_ids"]
    assert tok.decode(redone) == tok.decode(s.response_ids)  # the same text ...
    bad = dataclasses.replace(s, response_ids=redone[:-1] + [redone[-1] + 1])  # ... and ids that differ
    for reader in ("teacher", "learner"):
        with pytest.raises(RecordError, match=f"the {reader}'s .* ids are not the episode ledger's"):
            bad.checked_ids(reader)


# Qwen2.5's tool rendering, abridged (no assistant tool_calls field): the tools in its own system block,
# results as <tool_response> in a user turn
QWEN_TOOLS = r"""
{%- if tools %}
    {{- '<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n<tools>' }}
    {%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object within <tool_call></tool_call>:\n' }}
    {{- '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "tool" %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""


def test_a_template_that_renders_tools_describes_them_itself(tok):
    """Where the chat template renders ``tools=`` (Qwen2.5, Llama 3.1, Hermes), the model reads its tools as
    it was trained to and the built-in system prompt is not added; tool results are the template's own
    framing. SmolLM2's template renders none: the ``<tool_call>`` convention in a system message."""
    from opd.agents.calls import renders_tools

    assert not renders_tools(tok)
    qwen = copy.deepcopy(tok)
    qwen.chat_template = QWEN_TOOLS
    assert renders_tools(qwen)
    s, engine = _run(qwen, [CALL.format(a=347, op="*", b=86) + "<|im_end|>",
                            CALL.format(a=29842, op="+", b=129) + "<|im_end|>", "29971<|im_end|>"])
    assert "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"calc\"" in s.prompt.text
    assert "You can call tools" not in s.prompt.text
    assert (s.episode.stop, s.episode.tool_calls) == ("answered", 2)
    assert _segments(qwen, s, "environment") == ["29842", "29971"]
    assert all("<tool_response>" in t for t in _segments(qwen, s, "template")[::2])
    full = s.prompt.token_ids + s.response_ids
    assert all(full[: len(ctx)] == ctx for ctx in engine.contexts)


class ScriptedTeachers:
    """``opd.teacher.multi``'s ``generate_greedy`` face: each row's teacher (by its column) answers with its
    own script of turns, as text (greedy teachers return text, not ids)."""

    def __init__(self, scripts: dict[str, list[str]]):
        self.scripts, self.calls = scripts, {name: 0 for name in scripts}

    def generate_greedy(self, prompts, max_tokens):
        out = []
        for p in prompts:
            name = p.columns.get("teacher", "default")
            out.append(self.scripts[name][min(self.calls[name], len(self.scripts[name]) - 1)])
            self.calls[name] += 1
        return out


def test_the_teacher_plays_the_same_episodes_for_its_accuracy(smollm2):
    """On an agent job the teacher's held-out accuracy is that of its own greedy episodes with the same tools
    (not of single answers without them), each row played by its own teacher."""
    from opd.config import load_config
    from opd.steps import teacher_episodes

    tok = AutoTokenizer.from_pretrained(smollm2[1])
    cfg = load_config(None, [f"models.student={smollm2[1]}", "agent.environment=tools",
                             "teacher.column=teacher",
                             "eval.max_new_tokens=64", "rollout.max_model_len=2048"])

    teachers = ScriptedTeachers({"default": [CALL.format(a=347, op="*", b=86),
                                             CALL.format(a=29842, op="+", b=129), "29971"],
                                 "small": ["30000"]})
    prompts = [_prompt(), dataclasses.replace(_prompt(), prompt_id="p1",
                                              columns={**_prompt().columns, "teacher": "small"})]
    a, b = teacher_episodes(teachers, prompts, cfg)
    assert (a.response_text, a.episode.tool_calls, a.episode.stop) == ("29971", 2, "answered")
    assert _segments(tok, a, "environment") == ["29842", "29971"]
    assert (b.response_text, b.episode.tool_calls) == ("30000", 0)
    assert teachers.calls == {"default": 3, "small": 1}
