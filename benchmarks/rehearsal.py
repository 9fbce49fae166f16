"""ImageNet-1K-scale rehearsal on a CPU box: every stage of the real job on a data set of ImageNet-1K's
shape (1,281,167 small images in 1,000 classes), K = 1,000, cached mode with a cheap backbone, 2 ranks.

    python benchmarks/rehearsal.py                      # the full size (~30-60 min on 2 cores)
    python benchmarks/rehearsal.py --n 20000 --tag small

Stages, each timed with the peak resident memory of the process(es) doing it:
  write     the project's shard writer (scp_dist.shards.writer.write_shards), 8x8 RGB PNGs whose
            pixels are a class prototype plus noise (so the clustering has something to find)
  plan      one epoch's global-batch plan for one rank (scp_dist.data.plan.train_plan)
  job       `torchrun -m scp_dist.train` on 2 gloo ranks: its own stage records (features = the
            extraction, train = --steps steps, evaluate = predict + k-means baseline + Hungarian
            scores at K = 1,000 + assignments), read back from its metrics.jsonl
  checkpoint  size of the job's last checkpoint and the time to write it again (save_checkpoint)
Results: benchmarks/results/rehearsal-<tag>.json and benchmarks/rehearsal_<tag>.md, with the
command line and a projection to 8 GPUs per node (see `project`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

IMAGENET_TRAIN = 1_281_167


def _child(code: str, *args: str, env: dict | None = None) -> tuple[float, float, str]:
    """Run python code in a child process: (seconds, peak RSS MiB of that child alone, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"stage failed with {p.returncode}: {code[:80]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, out


WRITE = """
import sys, zlib, numpy as np
from pathlib import Path
from scp_dist.shards.sources import encode_png
from scp_dist.shards.writer import Sample, write_shards
n, k, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
protos = np.random.default_rng(0).integers(0, 256, (k, 8, 8, 3))
def samples():
    rng = np.random.default_rng(1)
    for i in range(n):
        y = int(rng.integers(k))
        px = np.clip(protos[y] + rng.normal(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
        yield Sample(f"s{i:08d}", encode_png(px), "png", y)
write_shards(samples(), out / "train", source="synthetic-imagenet-shape", split="train",
             classes=[f"c{j:04d}" for j in range(k)], max_count=10_000, total=n, progress=False)
"""

PLAN = """
import sys, time
from scp_dist.data.plan import train_plan
from scp_dist.shards.manifest import read_manifest
m = read_manifest(sys.argv[1])
t = time.perf_counter()
p = train_plan([s.num_samples for s in m.shards], int(sys.argv[2]), 2, 0, 0, 0)
print(time.perf_counter() - t, p.shape[0])
"""


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
           "-m", "scp_dist.train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"job failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    metrics = [json.loads(x) for x in (runs / "rehearsal" / "metrics.jsonl").read_text().splitlines()]
    return seconds, metrics, " ".join(["torchrun --standalone", f"--nproc_per_node={args.ranks}",
                                        "-m scp_dist.train", *overrides])


def checkpoint_stage(run: Path) -> dict:
    import torch

    from scp_dist.checkpoint import list_checkpoints, save_checkpoint

    path = list_checkpoints(run)[-1]
    state = torch.load(path, weights_only=False)
    t0 = time.perf_counter()
    save_checkpoint(run / "rewrite", state, keep=1)
    return {"bytes": path.stat().st_size, "write_s": round(time.perf_counter() - t0, 3)}


def project(res: dict, backbones: dict[str, float], gpus: int, num_pairs: int = 8) -> dict:
    """The 8-GPU estimate of the stages a GPU changes, from measured inputs: each backbone's forward
    images/s on one GPU (`python -m benchmarks.bench step`, BENCHMARKS.md) and the CPU-measured
    stages here. Extraction runs the backbone on 2 * num_pairs + 1 views per image; one streaming
    epoch on 2 views. Shard writing and the plan are CPU work that GPUs do not change; the head
    steps and evaluation on cached features are measured on the CPU here and only get faster."""
    n = res["n"]
    out: dict = {"gpus": gpus, "cache.num_pairs": num_pairs,
                 "write_s_cpu_per_1M_images": round(res["stages"]["write"]["seconds"] / n * 1e6, 1),
                 "plan_s": res["stages"]["plan"]["seconds"]}
    for name, ips in backbones.items():
        out[name] = {"forward_img_per_s_per_gpu": ips,
                     "extraction_s": round(n * (2 * num_pairs + 1) / (ips * gpus), 1),
                     "streaming_epoch_s": round(n * 2 / (ips * gpus), 1)}
    return out


def render(res: dict) -> str:
    lines = [f"# ImageNet-1K-scale rehearsal ({res['tag']})", "",
             f"Machine: {res['machine']}. Command: `{res['command']}`", "",
             f"Job command: `{res['job_command']}`", "",
             "| stage | seconds | peak memory (MiB, largest process) | notes |", "|---|---|---|---|"]
    for name, s in res["stages"].items():
        lines.append(f"| {name} | {s['seconds']:.1f} | {s.get('peak_rss_mib', float('nan')):.0f} | {s.get('note', '')} |")
    ck = res["checkpoint"]
    lines += ["", f"Checkpoint: {ck['bytes'] / 2**20:.1f} MiB, written again in {ck['write_s']:.2f} s.", "",
              "Scores of the short run (labels: the synthetic classes): " + json.dumps(res["scores"]), "",
              "Projection to 8 GPUs (see `project` in benchmarks/rehearsal.py):", "",
              "```json", json.dumps(res.get("projection", {}), indent=1), "```"]
    return "\n".join(lines) + "\n"


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
    args = p.parse_args(argv)
    data, runs = args.work / "data", args.work / "runs"
    stages: dict[str, dict] = {}
    if not (data / "train" / "manifest.json").is_file():
        s, rss, _ = _child(WRITE, str(args.n), str(args.classes), str(data))
        stages["write"] = {"seconds": s, "peak_rss_mib": rss, "note": f"{args.n} PNGs, 10k per shard"}
    else:
        stages["write"] = json.loads((args.work / "write.json").read_text())
    (args.work / "write.json").write_text(json.dumps(stages["write"]))
    s, rss, out = _child(PLAN, str(data / "train"), str(args.batch))
    stages["plan"] = {"seconds": float(out.split()[0]), "peak_rss_mib": rss,
                      "note": f"{out.split()[1]} steps/epoch, whole child {s:.1f} s incl. imports"}
    shutil.rmtree(runs, ignore_errors=True)  # the feature cache too: extraction is a measured stage
    seconds, metrics, job_cmd = job(args, data, runs)
    for rec in metrics:
        if rec["kind"] == "stage":
            stages[f"job:{rec['stage']}"] = {"seconds": rec["seconds"], "peak_rss_mib": rec["peak_rss_mib"]}
    stages["job (whole, with launch)"] = {"seconds": seconds, "note": f"{args.ranks} gloo ranks"}
    ev = next(r for r in metrics if r["kind"] == "eval")
    res = {
        "tag": args.tag, "n": args.n, "classes": args.classes, "ranks": args.ranks, "steps": args.steps,
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, no GPU, load {os.getloadavg()[0]:.1f}",
        "command": " ".join(["python benchmarks/rehearsal.py", *(argv if argv is not None else sys.argv[1:])]),
        "job_command": job_cmd, "stages": stages, "checkpoint": checkpoint_stage(runs / "rehearsal"),
        "scores": {"scp": ev["splits"]["train"]["scores"], "kmeans": ev["splits"]["train"].get("kmeans")},
        "rusage_children_max_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    if args.gpu_backbone:
        res["projection"] = project(res, {k: float(v) for k, v in (b.split("=") for b in args.gpu_backbone)}, 8)
    out_json = REPO / "benchmarks" / "results" / f"rehearsal-{args.tag}.json"
    out_json.write_text(json.dumps(res, indent=1) + "\n")
    (REPO / "benchmarks" / f"rehearsal_{args.tag}.md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
