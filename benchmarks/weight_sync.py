"""Weight sync, learner -> running vLLM engine: one pickled blob (opd's earlier path) against
``WeightTransfer``'s object-store buckets and the colocated in-place backend (``cluster.colocate``: the engine
in the learner's process reads its tensors), side by side in one run on the same model, engine and probe.

    python benchmarks/weight_sync.py   # models/smollm2-L20 (make smollm2 builds it)
    python benchmarks/weight_sync.py --student models/demo/student --repeats 10

Per sync: ``export`` (learner side: torch.save to bytes, or ray.put of the tensors in buckets), ``transfer``
(the worker gets the tensors: torch.load of the blob, zero-copy maps of the buckets, or the learner's own
tensors, forced by reading them),
``reload`` (vLLM's in-place ``reload_weights``), ``probe`` (the engine re-scores the probe sequence). Medians
over
``--repeats`` syncs after one warm-up; the weights change a little before each. Prints JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed_load(engine, pairs, probe_ids, expected) -> dict:
    """The phases of a load (the same engine calls ``load_weights`` makes)."""
    t0 = time.perf_counter()
    pairs = list(pairs)  # every tensor materialised (torch.load of a blob; a mapped view of a bucket)
    for _, t in pairs:
        t.view(-1)[:1].sum()  # touch each one
    t1 = time.perf_counter()
    engine.load_weights(iter(pairs))
    t2 = time.perf_counter()
    got = engine.score([probe_ids])[0].token_logprobs
    t3 = time.perf_counter()
    diff = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    return {"transfer_s": t1 - t0, "reload_s": t2 - t1, "probe_s": t3 - t2, "probe_max_diff": diff}


def _timed_worker():
    import torch

    from opd.rollout.weight_sync import TRANSFER
    from opd.rollout.worker import RolloutWorker

    class TimedWorker(RolloutWorker):
        """A rollout worker that times the phases of a load."""

        def _load(self, pairs, probe_ids, expected) -> dict:
            return timed_load(self.engine, pairs, probe_ids, expected)

        def load_blob(self, blob: bytes, probe_ids, expected) -> dict:
            return self._load(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True).items(),
                              probe_ids, expected)

        def load_buckets(self, handle, probe_ids, expected) -> dict:
            return self._load(TRANSFER.receive(handle), probe_ids, expected)

    return TimedWorker


def _timed_colocated():
    import torch

    from opd.colocated import Colocated
    from opd.rollout.weight_sync import IN_PLACE

    class TimedColocated(Colocated):
        """The learner with its engine in one process; a sync timed phase by phase, as ``sync_in_place``
        runs it."""

        def perturb(self, probe_ids) -> None:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(1e-4 * torch.randn_like(p))
            self._expected = self.probe_logprobs(probe_ids)

        def sync(self, probe_ids) -> dict:
            t0 = time.perf_counter()
            handle = IN_PLACE.publish(self.model.state_dict())
            t1 = time.perf_counter()
            out = timed_load(self.worker.engine, IN_PLACE.receive(handle), probe_ids, self._expected)
            return {"export_s": t1 - t0, **out, "bytes": sum(t.numel() * t.element_size()
                                                            for t in handle.tensors.values())}

    return TimedColocated


def measure(student: str, repeats: int) -> dict:
    import ray
    import torch

    from opd.rollout.weight_sync import TRANSFER
    from opd.trainer.learner import Learner

    learner = Learner(student, lr=1e-3, torch_threads=1)
    worker = ray.remote(_timed_worker()).options(num_cpus=1).remote(
        student, seed=0, max_model_len=128, kv_cache_gib=1, dtype="float32")
    ray.get(worker.__ray_ready__.remote())
    probe = list(range(100, 140))
    rows: dict[str, list[dict]] = {"blob": [], "buckets": []}
    for i in range(repeats + 1):
        for method in rows:
            with torch.no_grad():
                for p in learner.model.parameters():
                    p.add_(1e-4 * torch.randn_like(p))
            expected = learner.probe_logprobs(probe)
            t0 = time.perf_counter()
            if method == "blob":
                buf = io.BytesIO()
                torch.save({k: v.detach().contiguous() for k, v in learner.model.state_dict().items()}, buf)
                payload, nbytes = ray.put(buf.getvalue()), buf.getbuffer().nbytes
                call = worker.load_blob
            else:
                payload = TRANSFER.publish(learner.model.state_dict())
                nbytes, call = payload.nbytes, worker.load_buckets
            t1 = time.perf_counter()
            out = ray.get(call.remote(payload, probe, expected))
            t2 = time.perf_counter()
            if i:
                rows[method].append({"export_s": t1 - t0, **out, "sync_s": t2 - t0, "bytes": nbytes})
    ray.kill(worker)
    rows["in_place"] = in_place(student, repeats, probe)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in rows.items()}
    for m in med:
        med[m]["probe_max_diff"] = max(r["probe_max_diff"] for r in rows[m])
    return {"student": student, "params": sum(p.numel() for p in learner.model.parameters()),
            "repeats": repeats,
            "median": med, "ratio_blob_over_buckets": {k: round(med["blob"][k] / med["buckets"][k], 3)
                                                       for k in ("export_s", "transfer_s", "sync_s")},
            "ratio_buckets_over_in_place": {k: round(med["buckets"][k] / med["in_place"][k], 3)
                                            for k in ("export_s", "reload_s", "sync_s")}}


def in_place(student: str, repeats: int, probe: list[int]) -> list[dict]:
    """The colocated backend's syncs: one driver call into the learner's process, which publishes its tensors,
    loads them into its engine and probes (the learner's own probe computed before the clock starts, as the
    other methods' is)."""
    import ray

    actor = ray.remote(_timed_colocated()).options(num_cpus=1).remote(
        worker=dict(model_dir=student, seed=0, max_model_len=128, kv_cache_gib=1, dtype="float32"),
        engine_threads=1, model_dir=student, lr=1e-3, torch_threads=1)
    ray.get(actor.__ray_ready__.remote())
    rows = []
    for i in range(repeats + 1):
        ray.get(actor.perturb.remote(probe))
        t0 = time.perf_counter()
        out = ray.get(actor.sync.remote(probe))
        if i:
            rows.append({**out, "sync_s": time.perf_counter() - t0})
    ray.kill(actor)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default=str(ROOT / "models/smollm2-L20"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    import ray

    from opd.rollout.engine import ACTOR_ENV

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ACTOR_ENV},
             log_to_driver=False)
    try:
        result = measure(args.student, args.repeats)
    finally:
        ray.shutdown()
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
