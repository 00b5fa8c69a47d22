"""Where the tool task's student is stuck: the first digit of a call's ``a``, copied from the prompt.

Reads a tool job's run directory (``configs/tools.yaml`` with ``run.log_samples=true`` and
``checkpoint.every`` > 0): at that position of every logged episode of the last step whose first call opens
``{"a":``, the teacher's probability of the right digit (the prompt's) and how often it is its top-1;
the student's probability of it at the start and at each kept checkpoint, on the same prefixes.

    opd run configs/tools.yaml run.output_dir=runs/tools run.log_samples=true checkpoint.every=100 \\
        trainer.total_steps=300
    python benchmarks/tool_copy.py --models models/tools --run runs/tools

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPERANDS = re.compile(r"(\d+)\*(\d+)[+-](\d+)=")


def copy_positions(tok, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(prefix ids, the right digit's id) at the first digit of ``a`` in each episode's first call."""
    out = []
    for r in rows:
        question = OPERANDS.search(tok.decode(r["prompt_ids"]))
        segments = r["segments"]
        first = next((s for s in segments if s["origin"] == "sampled"), None)
        if question is None or first is None:
            continue
        pieces = [tok.decode([i]) for i in first["ids"]]
        opened = re.search(r'\{"a":', "".join(pieces))
        ends = [sum(len(p) for p in pieces[:k]) for k in range(len(pieces) + 1)]
        if opened is None or opened.end() not in ends[:-1]:
            continue
        before = sum(len(s["ids"]) for s in segments[:segments.index(first)])
        ids = r["prompt_ids"] + [t for s in segments for t in s["ids"]]
        cut = len(r["prompt_ids"]) + before + ends.index(opened.end())
        out.append((ids[:cut], tok.convert_tokens_to_ids(question.group(1)[0])))
    return out


def probabilities(model_dir: Path, positions: list[tuple[list[int], int]]) -> tuple[float, float]:
    """(mean probability of the right digit, share where it is the top-1)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    p = top = 0.0
    with torch.no_grad():
        for ids, right in positions:
            probs = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
            p += probs[right].item()
            top += float(int(probs.argmax()) == right)
    return round(p / len(positions), 3), round(top / len(positions), 3)


def main() -> None:
    from emit import emit  # beside this script

    from opd.tasks.tokenizer import build_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models" / "tools",
                    help="holds student/ and teacher/")
    ap.add_argument("--run", type=Path, required=True, help="the tool job's run directory")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    rows = [json.loads(line) for line in (args.run / "samples.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in rows)
    positions = copy_positions(build_tokenizer(tools=True), [r for r in rows if r["step"] == last])
    if not positions:
        sys.exit(f"tool_copy: no episode of step {last} in {args.run} opens a call with {{\"a\":")
    teacher = probabilities(args.models / "teacher", positions)
    student = {"0": probabilities(args.models / "student", positions)[0]}
    for ckpt in sorted((args.run / "checkpoints").glob("step_*")):
        student[str(int(ckpt.name.split("_")[1]))] = probabilities(ckpt / "model", positions)[0]
    emit({"run": str(args.run), "episodes_step": last, "positions": len(positions),
          "teacher_p_right": teacher[0], "teacher_top1_right": teacher[1],
          "student_p_right_by_step": student}, args.out)


if __name__ == "__main__":
    main()
