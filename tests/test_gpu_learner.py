"""benchmarks/gpu_learner.py --tiny: the GPU benchmark's whole path on a CPU, in a process where vLLM and Ray
cannot be imported (the lent GPU machines have neither), and the LM head in pieces holding less memory than
all at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run the script as __main__ behind an import hook that refuses ray and vllm, as a machine without them would.
BLOCKED_RUN = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "vllm"):
            raise ImportError(f"{name} is not installed here")
        return None
sys.meta_path.insert(0, Block())
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_tiny_runs_without_vllm_or_ray_and_pieces_use_less_memory(tmp_path):
    out = tmp_path / "gpu_learner.json"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(ROOT / "benchmarks" / "gpu_learner.py"), "--tiny",
         "--device", "cpu", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    assert {"what", "device", "setup", "formula", "cases", "targets", "wall_seconds"} <= set(report)
    assert report["device"]["type"] == "cpu" and "mfu" in report["formula"]
    by = {c["name"]: c for c in report["cases"]}
    assert set(by) == {"opd_topk20", "grpo", "opd_full_vocab_chunked", "opd_full_vocab_unchunked"}
    for c in by.values():
        assert "error" not in c, c
        assert c["update_skipped"] == 0.0 and c["tokens_per_s"] > 0 and c["model_tflops_per_step"] > 0
        assert c["mfu"] is None  # no peak FLOP/s is known for a CPU
    chunked, whole = by["opd_full_vocab_chunked"], by["opd_full_vocab_unchunked"]
    assert chunked["logits_chunk_tokens"] > 0 and whole["logits_chunk_tokens"] == 0
    # The learner's own count of tensors saved for backward: deterministic, so it always decides.
    assert chunked["learner_activation_mib"] < 0.5 * whole["learner_activation_mib"]
    # the RSS peak, where /proc/self/clear_refs lets it be reset per case
    if chunked["memory_method"] is not None:
        assert chunked["step_peak_over_resident_mib"] < whole["step_peak_over_resident_mib"]
        assert "full_vocab_chunked_over_unchunked_tiny" in report["targets"]
