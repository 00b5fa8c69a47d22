"""Config loading: overrides, dotted-key errors, and the CLI's exit code 2 with nothing written."""

from pathlib import Path

import pytest
import yaml

from opd.cli import main
from opd.config import ConfigError, load_config


def _write(tmp_path, tree):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_overrides_and_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, {"rollout": {"group_size": 8}}),
                      ["algorithm=grpo", "trainer.lr=5e-4", "task.ops=[+, '-']"])
    assert cfg.algorithm == "grpo" and cfg.rollout.group_size == 8 and cfg.trainer.lr == 5e-4
    assert cfg.task.ops == ["+", "-"] and not cfg.needs_teacher


def test_all_errors_are_collected_and_name_the_dotted_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, {"rollout": {"group_sise": 4, "temperature": "hot"},
                                      "algorithm": "ppo"}))
    msg = str(e.value)
    assert "rollout.group_sise: unknown config key" in msg
    assert "rollout.temperature" in msg and "'hot'" in msg
    assert "algorithm" in msg and "'ppo'" in msg


@pytest.mark.parametrize("override", ["noequals", "=3", "a..b=1"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, [override])


def test_top_k_raises_vllm_max_logprobs():
    assert load_config(None, ["teacher.top_k=50"]).teacher.max_logprobs == 50


@pytest.mark.parametrize(
    "tree,overrides,needle",
    [
        ({"trainer": {"lr": 1e-3, "learning_rate": 1}}, [], "trainer.learning_rate: unknown config key"),
        ({"rollout": {"group_size": "four"}}, [], "rollout.group_size"),
        ({}, ["models.student=/nonexistent/student"],
         "models.student: directory '/nonexistent/student' does not exist"),
        ({}, ["models.teacher=/nonexistent/teacher"], "models.teacher"),
        ({}, ["algorithm=grpo", "rollout.group_size=1"], "algorithm=grpo needs rollout.group_size >= 2"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, tree, overrides, needle):
    run_dir = tmp_path / "run"
    tree = {**tree, "run": {"output_dir": str(run_dir)}}
    code = main(["run", str(_write(tmp_path, tree)), *overrides])
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not run_dir.exists()


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_config_is_valid_and_fully_commented():
    from pathlib import Path

    path = Path(__file__).parents[1] / "configs" / "demo.yaml"
    cfg = load_config(path)
    assert cfg.algorithm == "opd" and cfg.eval.num_prompts >= 200
    for line in path.read_text().splitlines():
        if ":" in line and not line.strip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"demo.yaml key without a comment: {line.strip()}"
    assert _leaf_keys(yaml.safe_load(path.read_text())) == _leaf_keys(cfg.model_dump()), (
        "demo.yaml must list every key")


def _leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        keys |= _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return keys


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    """A recipe a user copies must validate as it is (its models and data may live elsewhere)."""
    load_config(path)
