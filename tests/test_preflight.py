"""The pre-flight: every malformed input found before Ray starts, exit 2, one message naming the key or row,
no traceback, nothing written."""

from __future__ import annotations

import json

import pytest
import yaml

from opd.cli import main
from opd.config import ConfigError, load_config
from opd.preflight import check_model_dirs, check_output_dir, untokenizable_rows
from opd.rewards.preflight import check_verifiers
from opd.types import Prompt


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["trainer.lr=.inf"], "trainer.lr: Input should be a finite number"),
        (["trainer.lr=.nan"], "trainer.lr: Input should be a finite number"),
        (["trainer.betas=[1.5,0.999]"], "trainer.betas: each of Adam's betas must be in [0, 1)"),
        (["trainer.betas=[0.9,1.0]"], "trainer.betas"),
        (["run.output_dir="], "run.output_dir: String should have at least 1 character"),
        (["verifiers.functions=[]"], "verifiers.functions: List should have at least 1 item"),
        (["verifiers.functions=[{name: exact_answer, weight: .nan}]"],
         "verifiers.functions.0.weight: Input should be a finite"),
        (["verifiers.functions=[exact_answer, exact_answer]"],
         "verifiers.functions lists ['exact_answer'] more than once"),
        (["rollout.max_new_tokens=64", "rollout.max_model_len=64"],
         "rollout.max_new_tokens=64 leaves no room for a prompt"),
        (["eval.max_new_tokens=128"], "eval.max_new_tokens=128 leaves no room"),
    ],
)
def test_values_that_would_crash_mid_run_are_refused(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)
    assert "Value error" not in str(e.value) and "<root>" not in str(e.value)


def test_a_section_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("trainer:\n  lr: 1.0e-3\nrollout:\n  group_size: 2\ntrainer:\n  total_steps: 3\n")
    with pytest.raises(ConfigError, match=r"key 'trainer' appears twice \(lines 1 and 5\)"):
        load_config(path)
    path.write_text("trainer:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice \(lines 2 and 3\)"):
        load_config(path)


def _model_dir(path, **config):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_model_dirs_a_file_and_a_length_past_the_model(tmp_path):
    (tmp_path / "weights.bin").write_text("")
    teacher = _model_dir(tmp_path / "teacher", max_position_embeddings=4096)
    with pytest.raises(ConfigError,
                       match=r"models.student: '.*weights.bin' is a file; expected a save_pretrained"):
        check_model_dirs(load_config(None, [f"models.student={tmp_path / 'weights.bin'}",
                                            f"models.teacher={teacher}"]))
    student = _model_dir(tmp_path / "student", max_position_embeddings=512)
    with pytest.raises(ConfigError) as e:
        check_model_dirs(load_config(None, [f"models.student={student}", f"models.teacher={teacher}",
                                             "rollout.max_model_len=100000"]))
    assert ("rollout.max_model_len: 100000 exceeds models.student's max_position_embeddings (512"
            in str(e.value))
    assert "exceeds models.teacher's max_position_embeddings (4096" in str(e.value)  # both named
    check_model_dirs(load_config(None, [f"models.student={student}", f"models.teacher={teacher}",
                                        "rollout.max_model_len=512"]))


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="run.output_dir: .* is a file, not a directory"):
        check_output_dir(load_config(None, [f"run.output_dir={tmp_path / 'f'}"]))
    with pytest.raises(ConfigError, match="run.output_dir: .* is a file, so .* cannot be created"):
        check_output_dir(load_config(None, [f"run.output_dir={tmp_path / 'f' / 'run'}"]))
    check_output_dir(load_config(None, [f"run.output_dir={tmp_path / 'new' / 'run'}"]))


PLUGIN = """
import math
def good(prompts, completions, answer, **_):
    return [float(c == a) for c, a in zip(completions, answer)]
async def good_async(prompts, completions, answer, **_):
    return [1.0 for _ in completions]
def needs_tests(prompts, completions, tests):
    return [0.0 for _ in completions]
def boom(prompts, completions, **_):
    raise RuntimeError("cannot score")
def short(prompts, completions, **_):
    return []
def nan(prompts, completions, **_):
    return [math.nan]
def text(prompts, completions, **_):
    return ["yes"]
def numeric_text(prompts, completions, **_):
    return ["1.0"]
NOT_CALLABLE = 3
"""


def _row():
    return Prompt("test-0", "12+34=", [1, 2], "46", {"prompt": "12+34=", "answer": "46"})


def _check(specs: list[str]):
    cfg = load_config(None, [f"verifiers.functions={json.dumps([{'name': s} for s in specs])}"])
    check_verifiers(cfg, _row())


@pytest.mark.parametrize(
    "name,needle",
    [
        ("no_such_verifier", "unknown verifier 'no_such_verifier'"),
        ("no_such_pkg.mod:fn",
         "no module named 'no_such_pkg.mod'; a module is imported from the current directory and PYTHONPATH"),
        ("{plugin}:missing", "has no attribute 'missing'"),
        ("{plugin}:NOT_CALLABLE", "is a int, not a callable"),
        ("{raises}:fn", "executing file"),
        ("{plugin}:needs_tests", "cannot be called as fn(prompts, completions, answer=)"),
        ("{plugin}:boom", "raised on test row 0 ('12+34='): RuntimeError: cannot score"),
        ("{plugin}:short", "returned 0 scores for 1 row"),
        ("{plugin}:nan", "returned non-finite value nan"),
        ("{plugin}:text", "returned non-number 'yes' (str)"),
        # float("1.0") works, but the run fails every row that is not a number: refused here as it is judged
        # there
        ("{plugin}:numeric_text", "returned non-number '1.0' (str)"),
    ],
)
def test_each_broken_verifier_is_named_before_anything_starts(tmp_path, name, needle):
    (tmp_path / "plugin.py").write_text(PLUGIN)
    (tmp_path / "raises.py").write_text("raise ImportError('needs a GPU')\n")
    spec = name.format(plugin=tmp_path / "plugin.py", raises=tmp_path / "raises.py")
    with pytest.raises(ConfigError) as e:
        _check(["exact_answer", spec])
    assert "verifiers.functions.1.name" in str(e.value) and needle in str(e.value)


def test_working_verifiers_pass(tmp_path):
    (tmp_path / "plugin.py").write_text(PLUGIN)
    _check(["exact_answer", f"{tmp_path / 'plugin.py'}:good", f"{tmp_path / 'plugin.py'}:good_async"])


def test_a_tokenizer_that_drops_characters_names_the_row(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models / "student")
    rows = [{"prompt": "12+34="}, {"prompt": "reverse café"}]
    bad = untokenizable_rows(tok, rows, "train")
    assert len(bad) == 1 and bad[0].startswith("train row 1: characters") and "é" in bad[0]


def _cli_run(tmp_path, capsys, *args: str, tree: dict | None = None) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"run": {"output_dir": str(tmp_path / "run")}, **(tree or {})}))
    code = main(["run", str(path), *args])
    return code, capsys.readouterr().err


def test_cli_takes_flags_among_overrides_and_exits_2_writing_nothing(tmp_path, capsys, tiny_models):
    models = [f"models.student={tiny_models / 'student'}", f"models.teacher={tiny_models / 'teacher'}"]
    code, err = _cli_run(tmp_path, capsys, *models, "--fresh", "trainer.lr=.inf")
    assert code == 2 and "trainer.lr: Input should be a finite number" in err and "Traceback" not in err
    code, err = _cli_run(tmp_path, capsys, "--fresh", *models, "verifiers.functions=[nope]")
    assert code == 2 and "verifiers.functions.0.name: unknown verifier 'nope'" in err
    for split, n in (("train", 4), ("test", 3)):
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(n)))
    files = ["task.name=files", f"task.train_path={tmp_path / 'train.jsonl'}",
             f"task.test_path={tmp_path / 'test.jsonl'}"]
    code, err = _cli_run(tmp_path, capsys, *models, "--fresh", *files, "eval.num_prompts=5")
    assert code == 2 and "eval.num_prompts=5: task.test_path" in err and "has 3 rows" in err
    code, err = _cli_run(tmp_path, capsys, *models, "--resume", *files)
    assert code == 2 and "--resume given but" in err and "holds no complete checkpoint" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as e:
        main(["run", str(tmp_path / "cfg.yaml"), "--no-such-flag"])
    assert e.value.code == 2


# the tiny models' template with a tool role (theirs raises on it, as templates without tool support do)
WITH_TOOLS = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>"
              "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("overrides,needle", [
    (["agent.tools=[calc, nope]"], "agent.tools: unknown tool 'nope'"),
    (["agent.tools=[no_such_pkg.mod:fn]"], "agent.tools: "),
    (["agent.environment=no_such_pkg.mod:Env"], "agent.environment: "),
    ([], "models.chat_template cannot render a tool result: unknown role: tool"),
    (["algorithm=grpo", f"models.chat_template={json.dumps(WITH_TOOLS)}"],
     "rollout.max_model_len=128: row train-0 framed as an episode (the environment's system prompt included) "
     "is 487 tokens"),
])
def test_an_agent_job_that_cannot_run_an_episode_exits_2_before_ray(tmp_path, capsys, tiny_models, overrides,
                                                                   needle):
    models = [f"models.student={tiny_models / 'student'}", f"models.teacher={tiny_models / 'teacher'}"]
    env = [] if any(o.startswith("agent.environment") for o in overrides) else ["agent.environment=tools"]
    code, err = _cli_run(tmp_path, capsys, "--fresh", *models, *env, *overrides)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
