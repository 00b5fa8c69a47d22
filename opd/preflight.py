"""Checks of a job's inputs before Ray starts or anything is written, for ``opd run``, ``opd submit`` and
``opd eval`` alike; each raises ``ConfigError`` naming the key or row. The config's own values are checked
earlier, by
``opd.config``.

Two layers. ``check_job`` reads only files (the model directories and the run directory) and imports neither
torch nor transformers, so a wrong path, a partial download or a run directory in the wrong state is answered
in about a second. ``check_inputs`` then loads what needs loading: the tokenizers against each other and the
data, the device, and every verifier called on real rows (``opd.rewards.preflight``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from opd.checkpoint import latest_checkpoint
from opd.config import Config, ConfigError
from opd.data import load_tokenizer
from opd.models import files
from opd.trainer.objectives import DEFAULT, REGISTRY, TEACHER_SECTION
from opd.types import Prompt

_SHOWN = 8  # offending rows named per message
logger = logging.getLogger(__name__)


def check_job(cfg: Config, *, resume: bool = False, fresh: bool = False,
              change_objective: bool = False) -> Path | None:
    """Every check that needs no model loaded; returns the checkpoint a resumed run continues from."""
    check_model_dirs(cfg)
    check_output_dir(cfg)
    return check_run_dir(cfg, resume=resume, fresh=fresh, change_objective=change_objective)


def check_inputs(cfg: Config, teacher: bool | None = None) -> tuple:
    """(student tokenizer, train prompts, held-out prompts) once every input of the job has passed its check.
    ``teacher``: whether the teacher is used (default: whether the objective reads one; ``opd eval
    --teacher``)."""
    from opd.agents.preflight import check_episodes
    from opd.rewards.preflight import check_verifiers

    teacher = cfg.needs_teacher if teacher is None else teacher
    check_model_dirs(cfg, teacher)
    check_device(cfg)
    tok = student_tokenizer(cfg)
    train, test = load_prompts(cfg, tok)
    if teacher:
        _check_teachers(cfg, tok, train + test)
    check_verifiers(cfg, test[:2])
    check_episodes(cfg, tok, train + test)
    return tok, train, test


def student_tokenizer(cfg: Config):
    """The student's tokenizer, with ``models.chat_template`` as its template when the config gives one."""
    return load_tokenizer(cfg.models.student, cfg.models.chat_template)


def teacher_template(cfg: Config, model_dir: str) -> str | None:
    """``models.chat_template`` for a teacher whose tokenizer has no template of its own."""
    return None if files.has_chat_template(Path(model_dir)) else cfg.models.chat_template


def load_prompts(cfg: Config, tok) -> tuple[list[Prompt], list[Prompt]]:
    """Train prompts and the held-out evaluation prompts, rendered with the student's chat template."""
    from opd.data import render_prompts
    from opd.tasks import task_rows

    try:
        train_rows, test_rows = task_rows(cfg.task)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_tokenizer_covers(tok, cfg.models.student, {"train": train_rows, "test": test_rows})
    train = _fits(render_prompts(train_rows, tok, "train"), cfg)
    if len(test_rows) < cfg.eval.num_prompts:
        t = cfg.task
        source = (f"task.test_split {t.test_split!r} of {t.dataset!r}" if t.name == "hub"
                  else f"task.test_path {t.test_path!r}")
        raise ConfigError(f"eval.num_prompts={cfg.eval.num_prompts}: {source} has {len(test_rows)} rows; "
                          "lower eval.num_prompts or add rows")
    return train, _fits(render_prompts(test_rows, tok, "test"), cfg)[: cfg.eval.num_prompts]


def _fits(prompts: list[Prompt], cfg: Config) -> list[Prompt]:
    """Prompts with room for a full response; the others are refused or, with task.too_long=skip, dropped and
    counted."""
    # One position more: the teacher scores prompt + full response with prompt_logprobs, which needs a token
    # to spare.
    limit = cfg.rollout.max_model_len - max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens) - 1
    fits = [p for p in prompts if len(p.token_ids) <= limit]
    too_long = [p.prompt_id for p in prompts if len(p.token_ids) > limit]
    if too_long and cfg.task.too_long == "fail":
        raise ConfigError(
            f"rollout.max_model_len={cfg.rollout.max_model_len} is too short for {len(too_long)} prompts "
            f"(first: {too_long[0]}); raise it, shorten the prompts, or set task.too_long=skip"
        )
    if not fits:
        raise ConfigError(f"rollout.max_model_len={cfg.rollout.max_model_len}: every prompt is too long "
                          f"(first: {too_long[0]})")
    if too_long:
        logger.warning("skipped %d of %d prompts longer than %d tokens (first: %s)", len(too_long),
                       len(prompts), limit, too_long[0])
    return fits


def _teacher_dirs(cfg: Config) -> list[tuple[str, str]]:
    """The teachers whose tokenizer is read from a directory here: all but one served with the openai protocol
    (its server's own tokenizer is compared instead, ``opd.teacher.served``)."""
    served = cfg.teacher.url is not None and cfg.teacher.protocol == "openai"
    return ([] if served else [("models.teacher", cfg.models.teacher)]) + [
        (f"models.teachers.{n}", d) for n, d in cfg.models.teachers.items()]


def _check_teachers(cfg: Config, tok, prompts: list[Prompt]) -> None:
    """Every teacher speaks the student's tokenizer, or (``models.teacher``, ``teacher.tokenizer``) scores its
    own tokens of the student's bytes; every row names a teacher the config defines."""
    from opd.teacher.multi import DEFAULT as DEFAULT_TEACHER
    from opd.teacher.multi import unknown_teacher_rows
    from opd.teacher.preflight import TokenizerMismatch, check_cross, check_tokenizers

    texts = [p.columns["prompt"] for p in prompts[:8]]
    for key, d in _teacher_dirs(cfg):
        teacher_tok = load_tokenizer(d, teacher_template(cfg, d))
        if key == "models.teacher" and cfg.teacher.tokenizer != "same":
            if cfg.teacher.tokenizer == "auto" and tok.get_vocab() != teacher_tok.get_vocab():
                if found := cfg.cross_tokenizer_problems():
                    raise ConfigError("models.teacher: its vocabulary is not the student's, so it scores "
                                      "its own tokens (teacher.tokenizer=cross), and: " + "; ".join(found))
                cfg.teacher.tokenizer = "cross"
            if cfg.teacher.tokenizer == "cross":
                rows = [text for p in prompts[:8] for text in (p.columns["prompt"], str(p.answer))]
                if found := check_cross(tok, teacher_tok, rows):
                    raise ConfigError("teacher.tokenizer=cross: " + "; ".join(found))
                continue
        try:
            check_tokenizers(tok, teacher_tok, texts)
        except TokenizerMismatch as e:
            raise ConfigError(f"{key}: {e}") from None
    if cfg.teacher.url:
        _check_served(cfg, prompts)
    defined = {DEFAULT_TEACHER, *cfg.models.teachers}
    bad = unknown_teacher_rows(prompts, cfg.teacher.column, defined)
    if bad:
        raise ConfigError(
            f"teacher.column={cfg.teacher.column!r}: {len(bad)} rows name a teacher "
            "that models.teachers does not define "
            f"(first: row {bad[0][0]} names {bad[0][1]!r}; defined: {sorted(defined)})"
        )


def _check_served(cfg: Config, prompts: list[Prompt]) -> None:
    """The server at ``teacher.url`` answers, serves ``teacher.model``, tokenises as the student, gives the
    top-k and the length the run asks for (``opd.teacher.served``)."""
    from opd.teacher.served import Served, problems

    t = cfg.teacher
    token = os.environ.get(t.token_env) if t.token_env else None
    served = Served(t.url, t.protocol, t.model, token, cfg.teacher_signal.top_k, cfg.rollout.max_model_len)
    found = problems(served, [(p.text, p.token_ids) for p in prompts[:4]])
    if found:
        raise ConfigError("invalid config:\n" + "\n".join(f"  {key}: {why}" for key, why in found))


def check_model_dirs(cfg: Config, teacher: bool | None = None) -> None:
    """Fail before anything is written when a model directory is missing, not a HF checkpoint, holds weights
    shorter than their own headers say, or a tokenizer without a chat template (and ``models.chat_template``
    gives none); when ``lora.target_modules`` names a module the student does not have; or when the remote
    teacher's token variable is unset. ``teacher``: whether the teacher is used (default: whether the
    objective reads one).

    With ``teacher.url`` the teacher's weights live on the server, but ``models.teacher`` must still hold the
    teacher's tokenizer files: the tokenizer pre-flight compares them with the student's locally (a
    tokenizer-only directory is enough, unless ``opd.divergence=full_vocab`` runs the teacher's HF forward in
    the learner).
    """
    teacher = cfg.needs_teacher if teacher is None else teacher
    remote = cfg.teacher.url is not None and not cfg.teacher_signal.learner_runs_teacher
    weights = [("models.student", cfg.models.student)]
    if teacher:
        weights += [(k, d) for k, d in _teacher_dirs(cfg) if not (remote and k == "models.teacher")]
    if cfg.reference_dir:
        weights.append((cfg.reference_key, cfg.reference_dir))
    problems = [p for key, d in weights for p in _checkpoint_problems(cfg, key, Path(d))]
    if teacher and remote and cfg.teacher.protocol == "opd":
        d = Path(cfg.models.teacher)
        if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            problems.append(f"  models.teacher: {str(d)!r} holds no tokenizer files; with teacher.url set it "
                            "must hold the teacher's tokenizer (for the tokenizer pre-flight check)")
    templates = [("models.student", cfg.models.student)] + (_teacher_dirs(cfg) if teacher else [])
    if cfg.models.chat_template is None:
        problems += [f"  {key}: the tokenizer in {d!r} has no chat template (a base model?); set "
                     "models.chat_template to a Jinja template or a .jinja file that renders the user turn"
                     for key, d in templates
                     if files.has_tokenizer(Path(d)) and not files.has_chat_template(Path(d))]
    elif ((p := Path(cfg.models.chat_template).expanduser()).suffix in (".jinja", ".j2", ".txt")
          and not p.is_file()):
        problems.append(f"  models.chat_template: file {str(p)!r} does not exist")
    if cfg.lora.r > 0 and not problems:
        problems += _lora_target_problems(cfg)
    env = cfg.teacher.token_env
    if teacher and cfg.teacher.url and env and not os.environ.get(env):
        problems.append(f"  teacher.token_env: environment variable {env!r} is not set "
                        "(it holds the server's token)")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


def _checkpoint_problems(cfg: Config, key: str, d: Path) -> list[str]:
    if d.exists() and not d.is_dir():
        return [f"  {key}: {str(d)!r} is a file; expected a save_pretrained directory"]
    if not d.is_dir():
        return [f"  {key}: directory {str(d)!r} does not exist (build the demo models with `opd bootstrap`)"]
    if not (d / "config.json").is_file():
        return [f"  {key}: {str(d)!r} has no config.json; expected a save_pretrained directory"]
    problems = [f"  {key}: {str(d)!r}: {why}" for why in files.weight_problems(d)]
    if (limit := files.max_positions(d)) is not None and cfg.rollout.max_model_len > limit:
        problems.append(f"  rollout.max_model_len: {cfg.rollout.max_model_len} exceeds {key}'s "
                        f"max_position_embeddings ({limit}, {str(d / 'config.json')!r})")
    return problems


def _lora_target_problems(cfg: Config) -> list[str]:
    """PEFT matches a target to a module whose dotted name is it or ends in ``.target``; name those that match
    none."""
    names = files.module_names(Path(cfg.models.student))
    if names is None:
        return []  # not safetensors: PEFT reports it when the adapter is made
    missing = [t for t in cfg.lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not missing:
        return []
    have = sorted({n.rpartition(".")[2] for n in names if not n.rpartition(".")[2].isdigit()})
    return [f"  lora.target_modules: {missing} match no module of models.student {cfg.models.student!r} "
            f"(its modules: {', '.join(have)})"]


def check_device(cfg: Config) -> None:
    """``trainer.device=cuda`` needs a GPU this process sees, when the job runs on the embedded local Ray
    (this machine). On a cluster the driver may have no GPU while the workers do: there the learner rank
    reports it."""
    if cfg.cluster.address:
        return
    from opd.trainer.device import NoCudaError, resolve_device

    try:
        resolve_device(cfg.trainer.device)
    except NoCudaError as e:
        raise ConfigError(str(e)) from None


def check_output_dir(cfg: Config) -> None:
    """``run.output_dir`` is a directory or does not exist yet (then its nearest existing parent is a
    directory)."""
    d = Path(cfg.run.output_dir)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"run.output_dir: {str(d)!r} is a file, not a directory")
    parent = next((p for p in d.absolute().parents if p.exists()), None)
    if not d.exists() and parent is not None and not parent.is_dir():
        raise ConfigError(f"run.output_dir: {str(parent)!r} is a file, so {str(d)!r} cannot be created")


def check_run_dir(cfg: Config, *, resume: bool, fresh: bool, change_objective: bool = False) -> Path | None:
    """The run directory in the state the flags expect; the checkpoint to resume from. A resumed run keeps its
    objective (``algorithm``, and the teacher divergence it follows) unless ``change_objective`` says
    otherwise."""
    run_dir = Path(cfg.run.output_dir)
    if resume and fresh:
        raise ConfigError("--resume continues the run in run.output_dir and --fresh replaces it: "
                          "give one of them")
    if not resume:
        if (run_dir / "metrics.jsonl").exists() and not fresh:
            raise ConfigError(f"run.output_dir: {str(run_dir)!r} already holds a run; "
                              "pass --resume or choose another directory")
        return None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"run.output_dir: --resume given but {str(run_dir)!r} holds no complete checkpoint")
    if not change_objective and (change := _objective_change(cfg, run_dir / "config.yaml")):
        raise ConfigError(f"run.output_dir: {str(run_dir)!r} was trained with {change[0]} and this config "
                          f"says {change[1]}; resume it with its own objective, or pass --change-objective "
                          "to go on under the new one")
    return ckpt


def _objective_change(cfg: Config, saved_path: Path) -> tuple[str, str] | None:
    """(before, now) when the saved run's objective differs from ``cfg``'s, else None."""
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None  # a run directory of an older layout: nothing to compare

    def objective(algorithm: str, teacher_section: dict) -> str:
        """The objective and, where it follows it, the teacher divergence."""
        key = f"{TEACHER_SECTION}.divergence"
        follows = algorithm in REGISTRY and REGISTRY[algorithm].teacher == "divergence"
        return f"algorithm={algorithm}" + (f", {key}={teacher_section.get('divergence', 'sampled')}"
                                           if follows else "")

    before = objective(str(saved.get("algorithm", DEFAULT)), saved.get(TEACHER_SECTION) or {})
    now = objective(cfg.algorithm, cfg.teacher_settings.model_dump())
    return None if before == now else (before, now)


def untokenizable_rows(tok, rows: list[dict], split: str) -> list[str]:
    """Rows whose prompt the tokenizer cannot represent: characters it drops or maps to its unknown token. A
    character-level tokenizer silently drops what it does not know, so the model would see another
    question."""
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
        raise ConfigError(f"models.student: the tokenizer of {student_dir!r} cannot represent {len(bad)} "
                          "prompts; it would drop these characters:\n"
                          + "\n".join(f"  {b}" for b in bad[:_SHOWN]) + more)
