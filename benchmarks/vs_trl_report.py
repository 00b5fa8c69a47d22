"""The report of ``benchmarks/vs_trl.py``: speed ratios against TRL, each stage's time against its FLOP bound,
the targets, and the pairing of several seeds' reports. Pure functions over the systems' results (no runs
here)."""

from __future__ import annotations

import statistics

from flops import Shape, generate, score, train

SPEED_TARGETS = {"like_for_like": 1.0, "fastest": 1.3}  # x TRL-HF's speed per step
BOUND_TARGET = 1.25  # a stage's median time / its FLOP bound


def stage_bounds(system: str, res: dict, student: Shape, teacher: Shape, prompt_len: float, g: int,
                 n_prompts: int, rates: dict[int, float], plan: dict) -> dict:
    """Per stage: median seconds, GFLOP and time / (GFLOP / matmul rate at that stage's threads). ``plan``:
    the system's ``threads`` per stage, whether the learner runs the teacher (``learner_teacher``), whether
    prompts are shared in the learner (``share``) and in the teacher's scoring (``teacher_share``), and
    whether the teacher's head runs at every position (``score_all``, vLLM's prompt_logprobs)."""
    resp = [round(x / (n_prompts * g)) for x in res["response_tokens"][1:] or res["response_tokens"]]
    mean_resp = max(1, round(statistics.mean(resp)))
    prompts, responses = [round(prompt_len)] * (n_prompts * g), [mean_resp] * (n_prompts * g)
    learn_group = g if plan.get("share") else 1
    gflop = {"generate": generate(student, prompts, responses) / 1e9}
    gflop["train"] = train(student, prompts, responses, learn_group) / 1e9
    if plan["learner_teacher"]:
        gflop["train"] += score(teacher, prompts, responses, False, learn_group) / 1e9
    else:
        gflop["score"] = score(teacher, prompts, responses, plan["score_all"],
                               g if plan.get("teacher_share") else 1) / 1e9
    out = {}
    for stage, gf in gflop.items():
        secs = res.get("stage_seconds", {}).get(stage)
        if not secs or stage not in plan["threads"]:
            continue
        med = statistics.median(secs)
        threads = plan["threads"][stage]
        bound = gf / rates[threads]
        out[stage] = {"s_median": round(med, 3), "gflop": round(gf, 1), "threads": threads,
                      "bound_s": round(bound, 3), "time_over_bound": round(med / bound, 2)}
    if other := res.get("stage_seconds", {}).get("other"):  # opd: the sync and probe, verification, Ray hops
        step = statistics.median(res["step_seconds"][1:] or res["step_seconds"])
        out["other"] = {"s_median": round(statistics.median(other), 3),
                        "share_of_step": round(statistics.median(other) / step, 3)}
    return out


def targets(ok: dict) -> dict:
    """Like-for-like: opd's fastest full-vocabulary (TRL's loss) system against TRL-HF; fastest: opd's fastest
    system of any kind against TRL-HF. Both as TRL's seconds per step / opd's."""
    if "trl-hf" not in ok:
        return {}
    trl = ok["trl-hf"]["s_per_step_median"]
    out = {}
    for kind, names in (("like_for_like", [k for k in ok if k.startswith("opd-full_vocab")]),
                        ("fastest", [k for k in ok if k.startswith("opd")])):
        if not names:
            continue
        best = min(names, key=lambda k: ok[k]["s_per_step_median"])
        speed = round(trl / ok[best]["s_per_step_median"], 3)
        out[kind] = {"system": best, "x_trl_hf_speed": speed, "target": SPEED_TARGETS[kind],
                     "met": speed >= SPEED_TARGETS[kind]}
    return out


def ratios(ok: dict) -> dict:
    trl = [k for k in ok if k.startswith("trl")]
    return {f"{t}/{o}": round(ok[t]["s_per_step_median"] / ok[o]["s_per_step_median"], 3)
            for o in ok if o.startswith("opd") for t in trl}


def pair_seeds(reports: list[dict]) -> dict:
    """Per-seed accuracy, held-out teacher KL and s/step of every system, and for each opd system against each
    TRL system the mean paired difference (opd - TRL) of accuracy and KL with its standard error over the
    seeds both ran. Reports may hold different systems of one seed (a later report's figure for a system and
    seed wins)."""
    seeds = [r["settings"].get("seed", 0) for r in reports]
    systems = sorted({k for r in reports for k, v in r["systems"].items() if "error" not in v})
    fields = ("accuracy_after", "teacher_kl_after", "s_per_step_median")
    table = {name: {str(s): {f: r["systems"][name].get(f) for f in fields}
                    for s, r in zip(seeds, reports, strict=True)
                    if "error" not in r["systems"].get(name, {"error": 1})}
             for name in systems}
    pairs = {}
    for o in (k for k in systems if k.startswith("opd")):
        for t in (k for k in systems if k.startswith("trl")):
            common = [s for s in table[o] if s in table[t]]
            entry = {"seeds": len(common), "speedup_median": round(statistics.median(
                table[t][s]["s_per_step_median"] / table[o][s]["s_per_step_median"] for s in common), 3)
                if common else None}
            for f, key in (("accuracy_after", "accuracy"), ("teacher_kl_after", "teacher_kl")):
                diffs = [table[o][s][f] - table[t][s][f] for s in common
                         if table[o][s][f] is not None and table[t][s][f] is not None]
                if diffs:
                    entry[f"{key}_diff_mean"] = round(statistics.mean(diffs), 4)
                    entry[f"{key}_diff_se"] = (round(statistics.stdev(diffs) / len(diffs) ** 0.5, 4)
                                               if len(diffs) > 1 else None)
            pairs[f"{o} - {t}"] = entry
    means = {name: {f: round(statistics.mean(v[f] for v in table[name].values() if v[f] is not None), 4)
                    for f in fields if any(v[f] is not None for v in table[name].values())}
             for name in systems}
    return {"seeds": sorted(set(seeds)),
            "settings": {k: v for k, v in reports[0]["settings"].items() if k != "overrides"},
            "mean": means, "paired": pairs, "per_seed": table,
            "targets_per_seed": {str(s): r.get("targets") for s, r in zip(seeds, reports, strict=True)}}
