"""A user's own dataset files: every supported format loads, every bad row is refused by file and row
number."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_overrides

from opd.cli import main
from opd.config import ConfigError, load_config
from opd.driver import prepare
from opd.tasks.files import DataError, load_rows

ROWS = [{"prompt": "12+3=", "answer": "51", "level": 1}, {"prompt": "7+8=", "answer": 51, "level": 2}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_format_gives_the_same_rows(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_list([{**r, "answer": str(r["answer"])} for r in ROWS])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    want = [{"prompt": "12+3=", "answer": "51", "level": 1}, {"prompt": "7+8=", "answer": "51", "level": 2}]
    for name in ("d.jsonl", "d.json", "d.parquet", "d.csv", "saved"):
        if name == "d.jsonl":
            _jsonl(tmp_path / name, ROWS)
        assert load_rows(str(tmp_path / name), key="task.train_path") == want, name


def test_custom_columns_are_renamed_and_the_rest_pass_through(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "solution": "2", "source": "x"}])
    rows = load_rows(str(path), key="task.train_path", prompt_column="question", answer_column="solution")
    assert rows == [{"source": "x", "prompt": "1+1=", "answer": "2"}]


@pytest.mark.parametrize(
    "content,needle",
    [
        ("", "holds no rows"),
        ('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n', "line 2 is not valid JSON"),
        ('{"prompt": "1+1=", "answer": "2"}\n{"answer": "4"}\n', "row 1: missing column(s) ['prompt']"),
        ('{"prompt": "  ", "answer": "2"}\n', "row 0: column 'prompt' must be a non-empty string"),
        ('{"prompt": "1+1=", "answer": null}\n',
         "row 0: column 'answer' must be a string or a finite number"),
        ('{"prompt": "1+1=", "answer": NaN}\n', "row 0: column 'answer' must be a string or a finite number"),
        ("[1, 2]\n", "row 0: expected an object"),
    ],
)
def test_bad_rows_are_named(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="task.train_path") as e:
        load_rows(str(path), key="task.train_path")
    assert needle in str(e.value)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"), key="task.test_path")
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported suffix"):
        load_rows(str(tmp_path / "rows.txt"), key="task.test_path")


def _files_overrides(tiny_models, tmp_path, train, test, **extra):
    return tiny_overrides(tiny_models, tmp_path / "run", **{
        "task.name": "files", "task.train_path": str(train), "task.test_path": str(test),
        "eval.num_prompts": 1, **extra,
    })


def test_prepare_renders_file_rows_with_the_chat_template(tiny_models, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl",
                   [{"prompt": f"{i}+1=", "answer": str(i + 1)[::-1]} for i in range(30)])
    test = _jsonl(tmp_path / "test.jsonl", [{"prompt": "40+2=", "answer": "24", "level": 3}])
    job = prepare(load_config(None, _files_overrides(tiny_models, tmp_path, train, test)))
    assert len(job.train) == 30 and len(job.test) == 1
    assert job.test[0].answer == "24" and job.test[0].columns["level"] == 3
    assert "40+2=" in job.test[0].text
    assert not (tmp_path / "run").exists()  # prepare validates; it writes nothing


def test_too_long_prompts_fail_or_are_skipped(tiny_models, tmp_path):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1" * 40 + "+1=", "answer": "2"}]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    test = _jsonl(tmp_path / "test.jsonl", rows[:1])
    with pytest.raises(ConfigError,
                       match="rollout.max_model_len=32 is too short for 1 prompts.*task.too_long=skip"):
        prepare(load_config(None, _files_overrides(tiny_models, tmp_path, train, test)))
    job = prepare(load_config(None, _files_overrides(tiny_models, tmp_path, train, test,
                                                     **{"task.too_long": "skip"})))
    assert [p.columns["prompt"] for p in job.train] == ["1+1="]


def test_cli_refuses_a_bad_row_with_exit_2_and_writes_nothing(tiny_models, tmp_path, capsys):
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])
    test = _jsonl(tmp_path / "test.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"task": {"name": "files", "train_path": str(train),
                                               "test_path": str(test)}}))
    overrides = [o for o in tiny_overrides(tiny_models, tmp_path / "run") if not o.startswith("task.")]
    assert main(["run", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert f"task.train_path: {str(train)!r} row 1: missing column(s) ['answer']" in err
    assert not (tmp_path / "run").exists()


def test_files_task_needs_both_paths():
    with pytest.raises(ConfigError, match="task.name=files needs task.train_path and task.test_path"):
        load_config(None, ["task.name=files", "task.train_path=x.jsonl"])
