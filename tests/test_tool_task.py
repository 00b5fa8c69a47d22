"""The embedded tool task: its vocabulary, its scripted teacher episodes (played through the real episode
runner and tool environment) and its bootstrap."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.agents.calls import renders_tools
from opd.agents.ledger import Transcript
from opd.agents.scripted import transcripts
from opd.agents.tool_bootstrap import ToolBootstrapSpec, ToolTaskSpec, bootstrap_tools, script_limits
from opd.tasks.bootstrap import ModelSpec, SFTSpec
from opd.tasks.tokenizer import build_tokenizer
from opd.tasks.tool_chains import build_dataset, make_row
from opd.tasks.tool_chains import call as call_text

CALC = [{"type": "function", "function": {"name": "calc"}}]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tools=True)


def test_tool_vocabulary_appends_and_keeps_every_character_id(tok):
    plain = build_tokenizer().get_vocab()
    vocab = tok.get_vocab()
    assert {k: vocab[k] for k in plain} == plain
    assert [vocab[t] for t in ("<|tool|>", "<tool_call>", "</tool_call>")] == [102, 103, 104]
    assert len(vocab) == 109  # and the call's four JSON pieces
    ids = tok.encode(call_text(347, "*", 86))
    assert len(ids) == 12 and tok.decode(ids) == call_text(347, "*", 86)
    call = '<tool_call>{"a":1}</tool_call>'
    assert tok.decode(tok.encode(call)) == call and len(tok.encode(call)) == 9
    assert tok.decode(tok.encode(call + "<|end|>"), skip_special_tokens=True) == call  # tags survive a decode


def test_tool_template_renders_tools_and_the_tool_role_prefix_stably(tok):
    assert renders_tools(tok) and not renders_tools(build_tokenizer())
    t = Transcript(tok, [{"role": "user", "content": "2*3+1="}], CALC)
    assert t.text == "<|system|>calc<|user|>2*3+1=<|assistant|>"
    t.add_turn(tok.encode('<tool_call>{"x":1}</tool_call><|end|>'))
    segs = t.observe([{"role": "tool", "content": "6"}])
    assert [(s.origin, tok.decode(s.ids)) for s in segs] == [("template", "<|tool|>"), ("environment", "6"),
                                                          ("template", "<|assistant|>")]


def test_rows_are_disjoint_and_right():
    data = build_dataset(2000, 100, seed=3)
    assert not {r["id"] for r in data["train"]} & {r["id"] for r in data["test"]}
    for r in data["test"]:
        want = r["a"] * r["b"] + r["c"] if r["op"] == "+" else r["a"] * r["b"] - r["c"]
        assert r["answer"] == str(want) and r["prompt"] == f"{r['a']}*{r['b']}{r['op']}{r['c']}="


def test_scripted_episodes_are_live_ledgers_and_mask_the_bad_call(tok):
    rows = [make_row(347, 86, "+", 129), make_row(5, 7, "-", 40)]
    spec = ToolBootstrapSpec()
    good = transcripts(tok, rows, 0.0, 0, script_limits(spec))
    ids, mask = good[0]
    text = tok.decode(ids)
    assert text.startswith("<|system|>calc<|user|>347*86+129=<|assistant|>")
    assert '"arguments":{"a":347,"op":"*","b":86}' in text and "<|tool|>29842<|assistant|>" in text
    assert '"arguments":{"a":29842,"op":"+","b":129}' in text
    assert text.endswith("<|tool|>29971<|assistant|>29971<|end|>")
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "29842" not in trained.replace('"a":29842', "")  # the tool's output is read, never a target
    assert "<|tool|>" not in trained and "<|user|>" not in trained
    assert tok.decode(good[1][0]).endswith("<|tool|>-5<|assistant|>-5<|end|>")
    bad = transcripts(tok, rows, 1.0, 0, script_limits(spec))
    for (ids, mask), row in zip(bad, rows, strict=True):
        text = tok.decode(ids)
        assert "<|tool|>error: " in text and text.endswith(f"{row['answer']}<|end|>")
        trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
        # the failing call is context, not a target
        assert "calculator" not in trained and trained.count("<tool_call>") == 2


def test_bootstrap_tools_builds_loadable_pair(tok, tmp_path):
    spec = ToolBootstrapSpec(
        task=ToolTaskSpec(num_train=64, num_test=8, num_val=8, max_digits_a=2, max_digits_b=1),
        teacher=ModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64),
        student=ModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64),
        teacher_sft=SFTSpec(steps=4, batch_size=8, warmup_steps=1, eval_every=2),
        student_sft=SFTSpec(steps=4, batch_size=8, warmup_steps=1))
    meta = bootstrap_tools(tmp_path / "m", spec, num_threads=1)
    for role in ("teacher", "student"):
        assert AutoTokenizer.from_pretrained(tmp_path / "m" / role).get_vocab() == tok.get_vocab()
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / role)
        assert model.config.max_position_embeddings == 256
        assert {"accuracy", "tool_call_rate", "turns"} <= set(meta[role])
    assert meta["teacher"]["val_curve"]  # validated on greedy episodes
    assert json.loads((tmp_path / "m" / "bootstrap.json").read_text())["spec_hash"] == spec.hash()
    assert bootstrap_tools(tmp_path / "m", spec)["seconds"] == meta["seconds"]  # cached


def test_held_out_episode_figures(tok):
    """What an agent job's evaluation reports beside accuracy, from episodes the runner played: one clean,
    one recovering from a bad call, one answering without any call."""
    from opd.agents.env import EnvSpec
    from opd.agents.metrics import HELD_OUT, episode_figures, held_out_episodes
    from opd.agents.runner import EpisodeRunner, open_episode
    from opd.agents.scripted import ScriptedEngine, episode_prompt
    from opd.tasks.tool_chains import script

    rows = [make_row(12, 3, "+", 4), make_row(7, 8, "-", 6), make_row(2, 2, "+", 1)]
    spec, lim = EnvSpec("tools", ("calc",)), script_limits(ToolBootstrapSpec())
    prompts = [(episode_prompt(r, i), 0) for i, r in enumerate(rows)]
    keys = [tuple(open_episode(tok, spec.make(False), p, 0, True).prompt_ids()) for p, _ in prompts]
    scripts = dict(zip(keys, [script(rows[0]), script(rows[1], "unknown_tool"), ["5"]], strict=True))
    samples = EpisodeRunner(ScriptedEngine(tok, scripts), tok, spec, lim).run(prompts, n=1, temperature=0.0,
                                                                               top_p=1.0, seed=0, version=0)
    figures = held_out_episodes(samples)
    assert set(figures) == set(HELD_OUT)
    assert figures == {"tool_call_rate": 2 / 3, "turns": (3 + 4 + 1) / 3, "tool_errors": 1 / 3,
                       "drift_rate": 0.0}
    held = {"eval_accuracy": 0.5, "eval_teacher_kl": 1.0, **{f"eval_{k}": v for k, v in figures.items()}}
    assert episode_figures(held) == figures and episode_figures({"eval_accuracy": 0.5}) == {}


def test_tool_copy_finds_the_first_digit_of_a_calls_a(tok):
    """benchmarks/tool_copy.py's probe position: right after ``{"a":`` in an episode's first call, the
    prompt's first digit to be copied; an episode without such a call has none."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tool_copy

    rows = []
    for question, a, b in (("347*86+129=", 347, 86), ("5*7-40=", 5, 7)):
        prompt = tok.encode(f"<|system|>calc<|user|>{question}<|assistant|>")
        rows.append({"prompt_ids": prompt, "segments": [
            {"origin": "sampled", "ids": tok.encode(call_text(a, "*", b) + "<|end|>")}]})
    rows.append({"prompt_ids": rows[0]["prompt_ids"], "segments": [
        {"origin": "sampled", "ids": tok.encode("29971<|end|>")}]})
    got = tool_copy.copy_positions(tok, rows)
    assert [right for _, right in got] == [tok.convert_tokens_to_ids("3"), tok.convert_tokens_to_ids("5")]
    for (prefix, _), row in zip(got, rows, strict=False):
        assert tok.decode(prefix[len(row["prompt_ids"]):]) == '<tool_call>{"name":"calc","arguments":{"a":'
