"""Checks of a job's inputs that need its files: the run directory, the data against the tokenizer, and every
verifier imported and called once on a real row. ``driver.prepare`` runs them (for ``opd run``, ``opd submit`` and
``opd eval`` alike) before Ray starts or anything is written; each raises ``ConfigError`` naming the key or row.
The config's own values are checked earlier, by ``opd.config``."""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
from pathlib import Path

from transformers import AutoTokenizer

from opd.config import Config, ConfigError
from opd.data import render_prompts
from opd.tasks import task_rows
from opd.teacher.multi import DEFAULT, unknown_teacher_rows
from opd.teacher.preflight import TokenizerMismatch, check_tokenizers
from opd.trainer.device import NoCudaError, resolve_device
from opd.types import Prompt

_SHOWN = 8  # offending rows named per message
logger = logging.getLogger(__name__)


def check_inputs(cfg: Config) -> tuple:
    """(student tokenizer, train prompts, held-out prompts) once every input of the job has passed its check."""
    check_model_dirs(cfg)
    check_output_dir(cfg)
    check_device(cfg)
    tok = AutoTokenizer.from_pretrained(cfg.models.student)
    train, test = load_prompts(cfg, tok)
    if cfg.needs_teacher:
        _check_teachers(cfg, tok, train + test)
    check_verifiers(cfg, test[0])
    return tok, train, test


def load_prompts(cfg: Config, tok) -> tuple[list[Prompt], list[Prompt]]:
    """Train prompts and the held-out evaluation prompts, rendered with the student's chat template."""
    try:
        train_rows, test_rows = task_rows(cfg.task)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_tokenizer_covers(tok, cfg.models.student, {"train": train_rows, "test": test_rows})
    train = _fits(render_prompts(train_rows, tok, "train"), cfg)
    if len(test_rows) < cfg.eval.num_prompts:
        raise ConfigError(f"eval.num_prompts={cfg.eval.num_prompts}: task.test_path {cfg.task.test_path!r} has "
                          f"{len(test_rows)} rows; lower eval.num_prompts or add rows")
    return train, _fits(render_prompts(test_rows, tok, "test"), cfg)[: cfg.eval.num_prompts]


def _fits(prompts: list[Prompt], cfg: Config) -> list[Prompt]:
    """Prompts with room for a full response; the others are refused or, with task.too_long=skip, dropped and counted."""
    # One position more: the teacher scores prompt + full response with prompt_logprobs, which needs a token to spare.
    limit = cfg.rollout.max_model_len - max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens) - 1
    fits = [p for p in prompts if len(p.token_ids) <= limit]
    too_long = [p.prompt_id for p in prompts if len(p.token_ids) > limit]
    if too_long and cfg.task.too_long == "fail":
        raise ConfigError(
            f"rollout.max_model_len={cfg.rollout.max_model_len} is too short for {len(too_long)} prompts (first: "
            f"{too_long[0]}); raise it, shorten the prompts, or set task.too_long=skip"
        )
    if not fits:
        raise ConfigError(f"rollout.max_model_len={cfg.rollout.max_model_len}: every prompt is too long (first: {too_long[0]})")
    if too_long:
        logger.warning("skipped %d of %d prompts longer than %d tokens (first: %s)", len(too_long), len(prompts), limit, too_long[0])
    return fits


def _check_teachers(cfg: Config, tok, prompts: list[Prompt]) -> None:
    """Every teacher speaks the student's tokenizer, and every row names a teacher the config defines."""
    texts = [p.columns["prompt"] for p in prompts[:8]]
    for key, d in [("models.teacher", cfg.models.teacher)] + [(f"models.teachers.{n}", d) for n, d in cfg.models.teachers.items()]:
        try:
            check_tokenizers(tok, AutoTokenizer.from_pretrained(d), texts)
        except TokenizerMismatch as e:
            raise ConfigError(f"{key}: {e}") from None
    bad = unknown_teacher_rows(prompts, cfg.teacher.column, {DEFAULT, *cfg.models.teachers})
    if bad:
        raise ConfigError(
            f"teacher.column={cfg.teacher.column!r}: {len(bad)} rows name a teacher that models.teachers does not define "
            f"(first: row {bad[0][0]} names {bad[0][1]!r}; defined: {sorted({DEFAULT, *cfg.models.teachers})})"
        )


def check_model_dirs(cfg: Config) -> None:
    """Fail before anything is written when a model directory is missing or not a HF checkpoint, or when the remote
    teacher's token variable is unset.

    With ``teacher.url`` the teacher's weights live on the server, but ``models.teacher`` must still hold the
    teacher's tokenizer files: the tokenizer pre-flight compares them with the student's locally (a tokenizer-only
    directory is enough, unless ``opd.divergence=full_vocab`` runs the teacher's HF forward in the learner).
    """
    problems = []
    remote = cfg.teacher.url is not None and not cfg.teacher_signal.learner_runs_teacher
    keys = ["student"] + (["teacher"] if cfg.needs_teacher and not remote else [])
    dirs = [(f"models.{k}", getattr(cfg.models, k)) for k in keys]
    if cfg.needs_teacher:
        dirs += [(f"models.teachers.{name}", d) for name, d in cfg.models.teachers.items()]
    if cfg.reference_dir:
        dirs.append(("exopd.reference" if cfg.algorithm == "exopd" else "kl_ref.reference", cfg.reference_dir))
    for key, d in dirs:
        d = Path(d)
        if d.exists() and not d.is_dir():
            problems.append(f"  {key}: {str(d)!r} is a file; expected a save_pretrained directory")
        elif not d.is_dir():
            problems.append(f"  {key}: directory {str(d)!r} does not exist (build the demo models with `opd bootstrap`)")
        elif not (d / "config.json").is_file():
            problems.append(f"  {key}: {str(d)!r} has no config.json; expected a save_pretrained directory")
        elif (limit := _max_positions(d)) is not None and cfg.rollout.max_model_len > limit:
            problems.append(f"  rollout.max_model_len: {cfg.rollout.max_model_len} exceeds {key}'s "
                            f"max_position_embeddings ({limit}, {str(d / 'config.json')!r})")
    if cfg.needs_teacher and remote:
        d = Path(cfg.models.teacher)
        if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            problems.append(f"  models.teacher: {str(d)!r} holds no tokenizer files; with teacher.url set it must hold "
                            "the teacher's tokenizer (for the tokenizer pre-flight check)")
    env = cfg.teacher.token_env
    if cfg.needs_teacher and cfg.teacher.url and env and not os.environ.get(env):
        problems.append(f"  teacher.token_env: environment variable {env!r} is not set (it holds the server's token)")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


def _max_positions(model_dir: Path) -> int | None:
    try:
        value = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None  # an unreadable config.json is the loader's error to report, with its own message
    return value if isinstance(value, int) else None


def check_device(cfg: Config) -> None:
    """``trainer.device=cuda`` needs a GPU this process sees, when the job runs on the embedded local Ray (this
    machine). On a cluster the driver may have no GPU while the workers do: there the learner rank reports it."""
    if cfg.cluster.address:
        return
    try:
        resolve_device(cfg.trainer.device)
    except NoCudaError as e:
        raise ConfigError(str(e)) from None


def check_output_dir(cfg: Config) -> None:
    """``run.output_dir`` is a directory or does not exist yet (then its nearest existing parent is a directory)."""
    d = Path(cfg.run.output_dir)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"run.output_dir: {str(d)!r} is a file, not a directory")
    parent = next((p for p in d.absolute().parents if p.exists()), None)
    if not d.exists() and parent is not None and not parent.is_dir():
        raise ConfigError(f"run.output_dir: {str(parent)!r} is a file, so {str(d)!r} cannot be created")


def untokenizable_rows(tok, rows: list[dict], split: str) -> list[str]:
    """Rows whose prompt the tokenizer cannot represent: characters it drops or maps to its unknown token. A
    character-level tokenizer silently drops what it does not know, so the model would see another question."""
    texts = [str(r["prompt"]) for r in rows]
    if not texts:
        return []
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    decoded = tok.batch_decode(ids, clean_up_tokenization_spaces=False)
    unk = tok.unk_token_id
    bad = []
    for i, (text, row_ids, back) in enumerate(zip(texts, ids, decoded, strict=True)):
        lost = sorted(set(text) - set(back))
        if lost or (unk is not None and unk in row_ids):
            shown = "".join(lost) if lost else "?"
            bad.append(f"{split} row {i}: characters {shown!r} of {text[:60]!r}")
    return bad


def check_tokenizer_covers(tok, student_dir: str, splits: dict[str, list[dict]]) -> None:
    bad = [b for split, rows in splits.items() for b in untokenizable_rows(tok, rows, split)]
    if bad:
        more = f" (and {len(bad) - _SHOWN} more rows)" if len(bad) > _SHOWN else ""
        raise ConfigError(f"models.student: the tokenizer of {student_dir!r} cannot represent {len(bad)} prompts; it "
                          "would drop these characters:\n" + "\n".join(f"  {b}" for b in bad[:_SHOWN]) + more)


def _call(fn, args: tuple, columns: dict, kwargs: dict, timeout_s: float) -> tuple[str, object]:
    """("ok", value) | ("raised", exception) | ("timeout", None): one call on a daemon thread, so a verifier that
    hangs delays the start by at most its deadline (the run's deadlines then handle it as a fault)."""
    from opd.rewards.runner import call_verifier

    box: dict = {}

    def target() -> None:
        try:
            box["ok"] = call_verifier(fn, *args, columns, kwargs)
        except Exception as e:  # noqa: BLE001 - reported to the user as the verifier's own error
            box["raised"] = e

    t = threading.Thread(target=target, daemon=True, name="opd-verifier-preflight")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        return "timeout", None
    return ("ok", box["ok"]) if "ok" in box else ("raised", box["raised"])


def _score_problem(out: object) -> str | None:
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        return f"returned {type(out).__name__}, not a list of scores"
    if len(out) != 1:
        return f"returned {len(out)} scores for 1 row"
    from opd.rewards.runner import bad_value

    return bad_value(list(out)[0])  # judged as the run judges each row: what fails there fails here


def check_verifiers(cfg: Config, row: Prompt) -> list:
    """Every verifier of ``verifiers.functions`` resolved (registered name, importable module or file), its signature
    bound to ``(prompts, completions, **columns, **kwargs)`` with this dataset's columns, and called once on ``row``
    with its ground truth as the completion: the call must return one finite score. Returns the functions."""
    from opd.rewards.registry import VerifierSpecError, resolve

    problems, fns = [], []
    columns = {k: [v] for k, v in row.columns.items() if k != "prompt"}
    args = ([str(row.columns["prompt"])], [str(row.answer)])
    for i, entry in enumerate(cfg.verifiers.functions):
        key = f"verifiers.functions.{i}.name"
        try:
            fn = resolve(entry.name)
        except VerifierSpecError as e:
            hint = ("; a module is imported from the current directory and PYTHONPATH, a file path from anywhere"
                    if ":" in entry.name and "no module named" in str(e) else "")
            problems.append(f"  {key}: {e}{hint}")
            continue
        try:
            inspect.signature(fn).bind(*args, **columns, **entry.kwargs)
        except TypeError as e:
            problems.append(f"  {key}: {entry.name!r} cannot be called as fn(prompts, completions, "
                            f"{', '.join(f'{k}=' for k in {**columns, **entry.kwargs})}): {e}")
            continue
        except ValueError:
            pass  # no signature to inspect (a builtin or C function): the call below decides
        status, out = _call(fn, args, columns, entry.kwargs, cfg.verifiers.timeout_s)
        if status == "raised":
            problems.append(f"  {key}: {entry.name!r} raised on test row 0 ({row.columns['prompt']!r}): "
                            f"{type(out).__name__}: {out}")
        elif status == "timeout":
            logger.warning("%s: %r did not return within verifiers.timeout_s=%gs on test row 0; the run treats such calls "
                           "as failed rows", key, entry.name, cfg.verifiers.timeout_s)
        elif (why := _score_problem(out)):
            problems.append(f"  {key}: {entry.name!r} {why} (called on test row 0)")
        fns.append(fn)
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))
    return fns
