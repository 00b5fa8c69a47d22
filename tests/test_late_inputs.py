"""Inputs that used to fail late (a traceback from an actor, a run directory written, or silently accepted)
are refused by the pre-flight: exit 2, a message naming the key, nothing written. And a config error is
answered before torch, Ray or vLLM are imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd.checkpoint import RunState, save_checkpoint
from opd.cli import main
from opd.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path, capsys, models: Path, *overrides: str, args: tuple[str, ...] = ()) -> tuple[int, str]:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"output_dir": str(tmp_path / "run")}}))
    base = [f"models.student={models / 'student'}", f"models.teacher={models / 'teacher'}",
            "task.num_train=50",
            "task.num_test=20", "eval.num_prompts=20", "task.max_digits_a=2", "task.max_digits_b=2"]
    code = main(["run", str(cfg), *base, *overrides, *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _copy(tiny_models: Path, tmp_path: Path) -> Path:
    out = tmp_path / "models"
    shutil.copytree(tiny_models / "student", out / "student")
    shutil.copytree(tiny_models / "teacher", out / "teacher")
    return out


def test_a_truncated_checkpoint_is_named_before_anything_starts(tiny_models, tmp_path, capsys):
    models = _copy(tiny_models, tmp_path)
    weights = models / "student" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)  # a partial download
    code, err = _run(tmp_path, capsys, models)
    assert code == 2 and "models.student" in err and "model.safetensors is truncated" in err
    assert not (tmp_path / "run").exists()
    weights.write_bytes(b"\x00" * 4)  # not even a header
    code, err = _run(tmp_path, capsys, models)
    assert code == 2 and "model.safetensors is damaged" in err and not (tmp_path / "run").exists()


def _drop_template(model_dir: Path) -> None:
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))


def test_a_tokenizer_without_chat_template_needs_models_chat_template(tiny_models, tmp_path, capsys):
    from opd.config import load_config
    from opd.preflight import check_inputs

    models = _copy(tiny_models, tmp_path)
    template = (models / "student" / "chat_template.jinja").read_text()
    _drop_template(models / "student")
    _drop_template(models / "teacher")
    code, err = _run(tmp_path, capsys, models)
    assert code == 2 and "models.student: the tokenizer in" in err and "has no chat template" in err
    assert "models.teacher: the tokenizer in" in err and not (tmp_path / "run").exists()
    # The template given in the config: every check passes, and prompts render with it as they did with the
    # original.
    (tmp_path / "t.jinja").write_text(template)
    over = [f"models.student={models / 'student'}", f"models.teacher={models / 'teacher'}",
            f"models.chat_template={tmp_path / 't.jinja'}", f"run.output_dir={tmp_path / 'run'}"]
    _, _, given = check_inputs(load_config(None, over))
    _, _, original = check_inputs(load_config(None, [f"models.student={tiny_models / 'student'}",
                                                     f"models.teacher={tiny_models / 'teacher'}"]))
    assert [p.token_ids for p in given] == [p.token_ids for p in original]
    code, err = _run(tmp_path, capsys, models, f"models.chat_template={tmp_path / 'nope.jinja'}")
    assert code == 2 and "models.chat_template: file" in err and "does not exist" in err


def test_a_verifier_that_ignores_its_rows_is_refused(tiny_models, tmp_path, capsys):
    """It returns one score whatever it is given: called on one row it would pass; on two it cannot."""
    (tmp_path / "plugin.py").write_text("def one(prompts, completions, **kw):\n    return [1.0]\n")
    code, err = _run(tmp_path, capsys, tiny_models, f"verifiers.functions=[{tmp_path / 'plugin.py'}:one]")
    assert code == 2 and "verifiers.functions.0.name" in err and "returned 1 scores for 2 rows" in err
    assert not (tmp_path / "run").exists()


def test_lora_targets_the_student_lacks_are_named(tiny_models, tmp_path, capsys):
    code, err = _run(tmp_path, capsys, tiny_models, "lora.r=4", "rollout.engine=vllm",
                     "lora.target_modules=[q_proj,nope]")
    assert code == 2 and "lora.target_modules: ['nope'] match no module of models.student" in err
    assert "q_proj" in err.split("its modules:")[1] and not (tmp_path / "run").exists()
    from opd.config import load_config
    from opd.preflight import check_model_dirs

    check_model_dirs(load_config(None, [f"models.student={tiny_models / 'student'}", "lora.r=4",
                                        "rollout.engine=vllm",
                                        # tied lm_head
                                        "lora.target_modules=[q_proj,down_proj,lm_head]"]), teacher=False)


def _finished_run(run_dir: Path, algorithm: str) -> None:
    from opd.config import dump_config, load_config

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(load_config(None, [f"algorithm={algorithm}"])))
    (run_dir / "metrics.jsonl").write_text("{}\n")
    save_checkpoint(run_dir, RunState(step=1), lambda path: None, keep=1)


def test_resuming_under_another_objective_needs_the_flag(tiny_models, tmp_path, capsys):
    _finished_run(tmp_path / "run", "grpo")
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    code, err = _run(tmp_path, capsys, tiny_models, "algorithm=opd", args=("--resume",))
    assert code == 2 and ("was trained with algorithm=grpo and this config says algorithm=opd, "
                          "opd.divergence=sampled") in err
    assert "--change-objective" in err
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns)
                  for p in (tmp_path / "run").rglob("*")) == before
    from opd.config import load_config
    from opd.preflight import check_run_dir

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}", "algorithm=opd"])
    assert check_run_dir(cfg, resume=True, fresh=False, change_objective=True).name == "step_000001"
    same = load_config(None, [f"run.output_dir={tmp_path / 'run'}", "algorithm=grpo"])
    # its own objective: no flag needed
    assert check_run_dir(same, resume=True, fresh=False).name == "step_000001"
    topk = load_config(None, [f"run.output_dir={tmp_path / 'run'}", "algorithm=opd",
                              "opd.divergence=teacher_topk", "teacher.top_k=5"])
    _finished_run(tmp_path / "run2", "opd")  # the teacher divergence is part of the objective
    with pytest.raises(ConfigError, match="opd.divergence=sampled and this config says algorithm=opd, "
                                          "opd.divergence=teacher_topk"):
        run2 = topk.run.model_copy(update={"output_dir": str(tmp_path / "run2")})
        check_run_dir(topk.model_copy(update={"run": run2}),
                      resume=True, fresh=False)


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"])
def test_an_empty_config_file_is_refused_naming_it(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    os.chdir(tmp_path)  # where the defaults would write runs/run
    try:
        code = main(["run", str(path)])
    finally:
        os.chdir(ROOT)
    err = capsys.readouterr().err
    assert code == 2 and f"config file {str(path)!r} is empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]


HEAVY = ("torch", "ray", "vllm", "transformers")


@pytest.mark.parametrize("argv, needle", [
    (["run", "configs/demo.yaml", "foo.bar=1"], "foo: unknown config key"),
    (["run", "configs/demo.yaml", "models.student=/no/such/dir"],
     "models.student: directory '/no/such/dir' does not exist"),
    (["submit", "configs/demo.yaml", "trainer.lr=-1", "--address", "http://127.0.0.1:1"],
     "trainer.lr: Input should be greater"),
    (["eval", "configs/demo.yaml", "models.student=/no/such/dir"],
     "models.student: directory '/no/such/dir'"),
])
def test_a_config_error_is_printed_before_torch_ray_or_vllm_are_imported(argv, needle):
    """In a fresh interpreter, as a user runs it: the error, exit 2, and none of the heavy packages
    imported."""
    code = ("import sys\nfrom opd.cli import main\ncode = main(sys.argv[1:])\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\nsys.exit(code)\n")
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and needle in out.stderr, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def test_a_teacher_url_nothing_answers_is_named_before_anything_starts(tiny_models, tmp_path, capsys):
    """Either protocol: found by the pre-flight (it was a traceback after Ray and the engines had started)."""
    from servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    code, err = _run(tmp_path, capsys, tiny_models, f"teacher.url={url}", "teacher.retry_deadline_s=1")
    assert code == 2 and f"teacher.url: teacher server {url}/health unreachable" in err
    assert not (tmp_path / "run").exists()
