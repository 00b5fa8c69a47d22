"""Hub ids for every model key, resolved once through ``huggingface_hub`` against a cache laid out as it lays
one out (``models--ORG--NAME/refs/BRANCH`` naming a commit, ``snapshots/COMMIT/`` holding the files), built
here from the tiny models, with ``HF_HUB_OFFLINE=1``: no network is touched."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides
from huggingface_hub import constants

from opd.config import ConfigError, load_config
from opd.models.hub import is_hub_id, resolve_models

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


def lay_out(cache: Path, repo: str, files: Path, commit: str, branch: str | None = "main") -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files, folder / "snapshots" / commit)
    if branch:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / branch).write_text(commit)
    return folder / "snapshots" / commit


@pytest.fixture
def hub(tiny_models, tmp_path, monkeypatch) -> Path:
    """A cache with the tiny student at main (and an older commit), and the teacher at main."""
    cache = tmp_path / "hub"
    lay_out(cache, "opd-test/tiny-student", tiny_models / "student", COMMIT)
    lay_out(cache, "opd-test/tiny-student", tiny_models / "student", OLD, branch=None)
    lay_out(cache, "opd-test/tiny-teacher", tiny_models / "teacher", COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_what_is_a_hub_id(tmp_path):
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("gpt2")
    assert is_hub_id("org/name@v1.0")
    assert not is_hub_id("models/demo/student")  # a path of three parts is never an id
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("./x/y") and not is_hub_id("~/m")
    (tmp_path / "org").mkdir()
    os.chdir(tmp_path)
    try:
        (tmp_path / "org" / "name").mkdir()
        assert not is_hub_id("org/name")  # a directory here wins over an id
    finally:
        os.chdir(ROOT)


def test_every_model_key_resolves_to_its_snapshot_and_is_pinned(hub, tmp_path):
    cfg = load_config(None, ["models.student=opd-test/tiny-student",
                             f"models.teacher=opd-test/tiny-teacher@{COMMIT}", "algorithm=exopd",
                             f"exopd.reference=opd-test/tiny-student@{OLD}"])
    resolved, pins = resolve_models(cfg)
    snapshots = hub / "models--opd-test--tiny-student" / "snapshots"
    assert resolved.models.student == str(snapshots / COMMIT)  # main, through refs/main
    assert resolved.section("exopd").reference == str(snapshots / OLD)  # a pinned commit no branch names
    assert resolved.models.teacher.endswith(f"models--opd-test--tiny-teacher/snapshots/{COMMIT}")
    assert pins == {"models.student": f"opd-test/tiny-student@{COMMIT}",
                    "models.teacher": f"opd-test/tiny-teacher@{COMMIT}",
                    "exopd.reference": f"opd-test/tiny-student@{OLD}"}
    # local paths pass through
    local, none = resolve_models(load_config(None, [f"models.student={tmp_path}"]))
    assert none == {} and local.models.student == str(tmp_path)


@pytest.mark.parametrize("value, needle", [
    ("opd-test/tiny-student@nope", "does not hold it at revision 'nope'"),
    ("opd-test/not-cached", "'opd-test/not-cached' is not a local directory"),
])
def test_a_model_the_cache_lacks_offline_is_named(hub, value, needle):
    with pytest.raises(ConfigError) as e:
        resolve_models(load_config(None, [f"models.teacher={value}"]))
    message = str(e.value)
    assert message.startswith("models.teacher: ") and needle in message and "HF_HUB_OFFLINE" in message


def test_cli_names_the_key_and_the_id_before_anything_starts(hub, tmp_path):
    """As a user runs it: exit 2, the key and the id named, no run directory, torch not imported."""
    code = ("import sys\nfrom opd.cli import main\ncode = main(sys.argv[1:])\n"
            "print('HEAVY', [m for m in ('torch', 'ray', 'vllm') if m in sys.modules])\nsys.exit(code)\n")
    argv = ["run", "configs/demo.yaml", "models.student=opd-test/tiny-student@v9",
            f"run.output_dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "models.student: 'opd-test/tiny-student@v9' is not a local directory" in out.stderr
    assert "HEAVY []" in out.stdout and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_job_runs_on_hub_ids(hub, tiny_models, local_ray, tmp_path):
    """Two steps with the student and the teacher named by hub id: every role loads the resolved snapshots (a
    hub id is no directory, so a role that got one could not start), and the run records what it ran."""
    from opd.driver import run

    out = tmp_path / "hub-job"
    hub_ids = {"models.student": "opd-test/tiny-student", "models.teacher": f"opd-test/tiny-teacher@{COMMIT}"}
    over = tiny_overrides(tiny_models, out, **{"rollout.engine": "hf", **hub_ids})
    summary = run(load_config(None, over), progress=False)
    assert summary["steps"] == 2 and summary["weight_version"] == 2
    saved = (out / "config.yaml").read_text()
    assert f"models--opd-test--tiny-student/snapshots/{COMMIT}" in saved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["probe_max_diff"] < 1e-3 for r in rows)


def test_submit_sends_each_hub_id_pinned_to_the_commit_it_resolved_to(hub, tmp_path):
    """The cluster resolves the same files: each hub id goes pinned, local paths absolute."""
    from opd.submit import staged_config

    given = load_config(None, ["models.student=opd-test/tiny-student", f"models.teacher={tmp_path}"])
    _, pins = resolve_models(given)
    staged = staged_config(given.with_keys(pins), tmp_path / "stage")
    assert staged.models.student == f"opd-test/tiny-student@{COMMIT}"
    assert staged.models.teacher == str(tmp_path)


def gsm8k_like(root: Path, rows: list[dict], config: str = "main") -> Path:
    """A local directory laid out like a hub dataset repo: README.md naming the config, parquet per split."""
    import datasets

    (root / config).mkdir(parents=True)
    for split, part in (("train", rows[:-2]), ("test", rows[-2:])):
        datasets.Dataset.from_list(part).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n"
                                    f"  - split: train\n    path: {config}/train-*\n"
                                    f"  - split: test\n    path: {config}/test-*\n---\n")
    return root


ROWS = [{"question": f"Tom has {i} apples and buys 2. How many now?", "answer": f"{i} + 2 = <<{i}+2={i + 2}>>"
         f"{i + 2}\n#### {i + 2}"} for i in range(8)]
GSM8K = ["task.name=hub", "task.dataset_config=main", "task.prompt_column=question",
         "task.answer_column=answer", "task.answer_pattern='####\\s*(.+)$'", "eval.num_prompts=2"]


def test_a_datasets_dataset_by_name_with_its_column_mapping(tmp_path, monkeypatch):
    from opd.tasks import task_rows

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = gsm8k_like(tmp_path / "gsm8k", ROWS)
    train, test = task_rows(load_config(None, [*GSM8K, f"task.dataset={data}"]).task)
    assert len(train) == 6 and len(test) == 2
    assert train[3]["prompt"] == ROWS[3]["question"] and train[3]["answer"] == "5"  # the number after ####
    assert train[3]["answer_text"] == ROWS[3]["answer"]  # the whole column still reaches the verifiers


@pytest.mark.parametrize("over, needle", [
    (["task.dataset_config=nope"], "task.dataset_config: "),
    (["task.test_split=validation"], "task.test_split: "),
    (["task.prompt_column=problem"], "row 0: missing column(s) ['problem']"),
    (["task.answer_pattern='ANSWER: (.+)'"], "row 0: task.answer_pattern 'ANSWER: (.+)' finds no answer"),
    (["task.dataset=opd-test/not-cached"], "task.dataset: 'opd-test/not-cached' is not a local dataset"),
])
def test_bad_dataset_input_is_named_before_anything_starts(tmp_path, monkeypatch, over, needle):
    from opd.tasks import task_rows

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = gsm8k_like(tmp_path / "gsm8k", ROWS)
    with pytest.raises(ValueError, match=re.escape(needle)):
        task_rows(load_config(None, [*GSM8K, f"task.dataset={data}", *over]).task)
    with pytest.raises(ConfigError, match="task.answer_pattern: not a regular expression"):
        load_config(None, [*GSM8K, f"task.dataset={data}", "task.answer_pattern=(unclosed"])
    with pytest.raises(ConfigError, match="task.name=hub needs task.dataset"):
        load_config(None, ["task.name=hub"])
