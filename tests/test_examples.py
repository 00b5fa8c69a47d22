"""The shipped example job loads, and its custom verifier resolves from its file and scores as documented."""

from __future__ import annotations

from pathlib import Path

from opd.config import load_config
from opd.rewards import resolve

ROOT = Path(__file__).parents[1]


def test_custom_verifier_example(monkeypatch):
    # verifier paths in a config are relative to the working directory, as for `opd run`
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "examples" / "custom_verifier.yaml")
    assert [v.name for v in cfg.verifiers.functions][0] == "exact_answer"
    fn = resolve(cfg.verifiers.functions[1].name)
    scores = fn(["123+45=", "9+9=", "5+0="], ["861", "8", ""], answer=["861", "81", "5"])
    assert scores == [1.0, 0.5, 0.0]
