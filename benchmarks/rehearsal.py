"""ImageNet-1K-scale rehearsal on a CPU box: every stage of the real job on a data set of ImageNet-1K's
shape (1,281,167 small images in 1,000 classes), K = 1,000, cached mode with a cheap backbone, 2 ranks.

    python benchmarks/rehearsal.py                      # the full size (~30-60 min on 2 cores)
    python benchmarks/rehearsal.py --n 20000 --tag small
    python benchmarks/rehearsal.py --render benchmarks/results/rehearsal-imagenet1k-shape.json

Stages, each timed with the peak resident memory of the process(es) doing it:
  write     the project's shard writer (scp_dist.shards.writer.write_shards), 8x8 RGB PNGs whose
            pixels are a class prototype plus noise (so the clustering has something to find)
  plan      one epoch's global-batch plan for one rank (scp_dist.data.plan.train_plan)
  job       `torchrun -m scp_dist.train` on 2 gloo ranks: its own stage records (features = the
            extraction, train = --steps steps, evaluate = predict + k-means baseline + Hungarian
            scores at K = 1,000 + assignments), read back from its metrics.jsonl
  checkpoint  size of the job's last checkpoint and the time to write it again (save_checkpoint)
write and plan run in a fresh interpreter each (`--stage`), so their peak memory is theirs alone.
Results: benchmarks/results/rehearsal-<tag>.json and benchmarks/rehearsal_<tag>.md, with the
command line and a projection to 8 GPUs per node (see `project`).
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # `python benchmarks/rehearsal.py`: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness as H  # noqa: E402

IMAGENET_TRAIN = 1_281_167
COLUMNS = [H.Column("stage", "stage"), H.Column("seconds", "seconds", ".1f"),
           H.Column("peak_rss_mib", "peak memory (MiB, largest process)", ".0f"), H.Column("note", "notes")]


def write_stage(args: argparse.Namespace) -> dict[str, Any]:
    from scp_dist.shards.sources import encode_png
    from scp_dist.shards.writer import Sample, write_shards

    protos = np.random.default_rng(0).integers(0, 256, (args.classes, 8, 8, 3))

    def samples() -> Iterator[Sample]:
        rng = np.random.default_rng(1)
        for i in range(args.n):
            y = int(rng.integers(args.classes))
            px = np.clip(protos[y] + rng.normal(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
            yield Sample(f"s{i:08d}", encode_png(px), "png", y)

    write_shards(samples(), args.work / "data" / "train", source="synthetic-imagenet-shape", split="train",
                 classes=[f"c{j:04d}" for j in range(args.classes)], max_count=10_000, total=args.n, progress=False)
    return {"note": f"{args.n} PNGs, 10k per shard"}


def plan_stage(args: argparse.Namespace) -> dict[str, Any]:
    from scp_dist.data.plan import train_plan
    from scp_dist.shards.manifest import read_manifest

    m = read_manifest(args.work / "data" / "train")
    return {"steps": int(train_plan([s.num_samples for s in m.shards], args.batch, 2, 0, 0, 0).shape[0])}


STAGES = {"write": write_stage, "plan": plan_stage}


def child_stage(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """A stage in a fresh interpreter; it reports its own time and peak memory as its last line."""
    cmd = [sys.executable, "-m", "benchmarks.rehearsal", "--stage", name, "--n", str(args.n), "--classes",
           str(args.classes), "--batch", str(args.batch), "--work", str(args.work)]
    t0 = time.perf_counter()
    rc, tail = H.run(cmd)
    if rc != 0:
        raise RuntimeError(f"stage {name} failed ({rc}): " + "\n".join(tail[-20:]))
    return {**json.loads(tail[-1]), "child_s": round(time.perf_counter() - t0, 1)}


def job(args: argparse.Namespace, data: Path, runs: Path) -> tuple[float, list[dict], str]:
    overrides = [
        f"data.root={data}", "data.prepare=", "data.test_split=", "data.loader=torch", "data.num_workers=0",
        "backbone.name=pixels", "backbone.image_size=8", f"head.num_clusters={args.classes}",
        "train.mode=cached", "cache.num_pairs=1", "cache.dtype=fp16", "cache.batch_size=2048",
        f"train.global_batch={args.batch}", "train.epochs=30", f"train.max_steps={args.steps}",
        "train.checkpoint_every=100", "train.log_every=50", "train.eval_batch=8192", "train.resume=false",
        "output.overwrite=true", f"output.dir={runs}", "output.run_name=rehearsal",
        "output.kmeans_niter=10", "output.kmeans_nredo=1", f"output.kmeans_max_points={args.kmeans_points}",
    ]
    t0 = time.perf_counter()
    rc, tail = H.run(H.torchrun(args.ranks, overrides), H.child_env(OMP_NUM_THREADS="1"))
    if rc != 0:
        raise RuntimeError(f"job failed ({rc}):\n" + "\n".join(tail))
    return (time.perf_counter() - t0, H.read_jsonl(runs / "rehearsal" / "metrics.jsonl"),
            shlex.join(["torchrun", "--standalone", f"--nproc_per_node={args.ranks}", "-m", "scp_dist.train",
                        *overrides]))


def checkpoint_stage(run: Path) -> dict[str, Any]:
    import torch

    from scp_dist.checkpoint import list_checkpoints, save_checkpoint

    path = list_checkpoints(run)[-1]
    state = torch.load(path, weights_only=False)
    t0 = time.perf_counter()
    save_checkpoint(run / "rewrite", state, keep=1)
    return {"bytes": path.stat().st_size, "write_s": round(time.perf_counter() - t0, 3)}


def project(res: dict[str, Any], backbones: dict[str, float], gpus: int, num_pairs: int = 8) -> dict[str, Any]:
    """The 8-GPU estimate of the stages a GPU changes, from measured inputs: each backbone's forward
    images/s on one GPU (`python -m benchmarks.bench step`, BENCHMARKS.md) and the CPU-measured
    stages here. Extraction runs the backbone on 2 * num_pairs + 1 views per image; one streaming
    epoch on 2 views. Shard writing and the plan are CPU work that GPUs do not change; the head
    steps and evaluation on cached features are measured on the CPU here and only get faster."""
    n = res["n"]
    out: dict[str, Any] = {"gpus": gpus, "cache.num_pairs": num_pairs,
                           "write_s_cpu_per_1M_images": round(res["stages"]["write"]["seconds"] / n * 1e6, 1),
                           "plan_s": res["stages"]["plan"]["seconds"]}
    for name, ips in backbones.items():
        out[name] = {"forward_img_per_s_per_gpu": ips,
                     "extraction_s": round(n * (2 * num_pairs + 1) / (ips * gpus), 1),
                     "streaming_epoch_s": round(n * 2 / (ips * gpus), 1)}
    return out


def render(res: dict[str, Any]) -> str:
    ck = res["checkpoint"]
    return "\n".join([
        f"# ImageNet-1K-scale rehearsal ({res['tag']})", "",
        *H.provenance(res, "benchmarks/rehearsal.py", "results", f"benchmarks/results/rehearsal-{res['tag']}.json"),
        f"Job command: `{res['job_command']}`", "",
        H.table(COLUMNS, [{"stage": name, "note": "", **s} for name, s in res["stages"].items()]), "",
        f"Checkpoint: {ck['bytes'] / 2**20:.1f} MiB, written again in {ck['write_s']:.2f} s.", "",
        "Scores of the short run (labels: the synthetic classes): " + json.dumps(res["scores"]), "",
        "Projection to 8 GPUs (see `project` in benchmarks/rehearsal.py):", "",
        "```json", json.dumps(res.get("projection", {}), indent=1), "```", ""])


def write_report(res: dict[str, Any]) -> Path:
    md = H.REPO / "benchmarks" / f"rehearsal_{res['tag']}.md"
    md.write_text(render(res))
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=IMAGENET_TRAIN)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--kmeans-points", type=int, default=64, help="output.kmeans_max_points")
    p.add_argument("--work", type=Path, default=Path("/tmp/scp_rehearsal"))
    p.add_argument("--tag", default="imagenet1k-shape")
    p.add_argument("--gpu-backbone", action="append", default=[], metavar="NAME=IMG_PER_S",
                   help="a backbone's measured forward images/s on one GPU, for the 8-GPU projection")
    p.add_argument("--render", type=Path, default=None, help="only re-render the markdown of a stored JSON")
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        from scp_dist.runlog import peak_rss_mib

        t0 = time.perf_counter()
        out = STAGES[args.stage](args)
        print(json.dumps({**out, "seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}))
        return 0
    if args.render:
        print(f"updated {write_report(H.load_json(args.render))}")
        return 0
    data, runs, t_start = args.work / "data", args.work / "runs", time.perf_counter()
    stages: dict[str, dict[str, Any]] = {}
    if not (data / "train" / "manifest.json").is_file():
        stages["write"] = child_stage("write", args)
    else:  # written by an earlier run: its measurement stands
        stages["write"] = json.loads((args.work / "write.json").read_text())
    (args.work / "write.json").write_text(json.dumps(stages["write"]))
    plan = child_stage("plan", args)
    stages["plan"] = {"seconds": plan["seconds"], "peak_rss_mib": plan["peak_rss_mib"],
                      "note": f"{plan['steps']} steps/epoch, whole child {plan['child_s']:.1f} s incl. imports"}
    shutil.rmtree(runs, ignore_errors=True)  # the feature cache too: extraction is a measured stage
    seconds, metrics, job_cmd = job(args, data, runs)
    for rec in metrics:
        if rec["kind"] == "stage":
            stages[f"job:{rec['stage']}"] = {"seconds": rec["seconds"], "peak_rss_mib": rec["peak_rss_mib"]}
    stages["job (whole, with launch)"] = {"seconds": seconds, "note": f"{args.ranks} gloo ranks"}
    ev = next(r for r in metrics if r["kind"] == "eval")
    res = {
        "tag": args.tag, "n": args.n, "classes": args.classes, "ranks": args.ranks, "steps": args.steps,
        "machine": H.machine(), "created": H.now(),
        "command": H.command("python benchmarks/rehearsal.py", sys.argv[1:] if argv is None else argv),
        "job_command": job_cmd, "stages": stages, "checkpoint": checkpoint_stage(runs / "rehearsal"),
        "scores": {"scp": ev["splits"]["train"]["scores"], "kmeans": ev["splits"]["train"].get("kmeans")},
        "rusage_children_max_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    if args.gpu_backbone:
        res["projection"] = project(res, {k: float(v) for k, v in (b.split("=") for b in args.gpu_backbone)}, 8)
    res["wall_s"] = time.perf_counter() - t_start
    print(f"wrote {H.save_json(H.RESULTS / f'rehearsal-{args.tag}.json', res)}\nupdated {write_report(res)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
