"""A folder of the images a general model trains on: every image of each labelled set outside the
`val` split that set's own run scores on, plus the synthetic scenes outside theirs.

    python benchmarks/general_images.py --out data/general/images \\
        --set dubai ../shared/datasets/dubai 't(\\d+)_' 0.4 --set gid5 ../shared/datasets/gid5 '' 0.4 --synthetic

A set is NAME ROOT GROUP_REGEX TRAIN_FRACTION: ROOT holds `images/` and `labels/` (labels paired by
file stem, as the local provider pairs them by default), and the last two are the set's
`shards.group_regex` and `shards.train_fraction`, so each image's split is the one `build_shards`
gives it in that set's own run (`stages.build_shards.labelled_split` on its group key, with the
default `shards.metrics_train_fraction`). Images in `val` are left out; the others, labelled or
not, are linked (absolute symlinks) as `<NAME>_<file name>`. `--synthetic` writes the scenes of the
synthetic provider (params.yaml's `ingest.synthetic`) outside their `val` split as GeoTIFFs. The
folder is written complete or not at all; an existing one is replaced only with --overwrite.
Scoring the resulting model on each set's `val`: docs/evaluation.md, "A general model".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.build_shards import group_key, labelled_split  # noqa: E402
from stages.ingest import IngestError, _list_rasters, ingest_synthetic, safe_id  # noqa: E402
from stages.params import ShardsParams, load_params  # noqa: E402


def set_images(root: Path, group_regex: str, train_fraction: float, metrics_train_fraction: float) -> list[Path]:
    """The images of one labelled set outside its val split, in name order."""
    images = _list_rasters(str(root / "images"), f"{root}/images")
    labelled = {f.stem for f in _list_rasters(str(root / "labels"), f"{root}/labels")}
    keep = []
    for f in images:
        split = "train"
        if f.stem in labelled:
            split = labelled_split(group_key(safe_id(f.stem), group_regex), metrics_train_fraction, train_fraction)
        if split != "val":
            keep.append(f)
    return keep


def synthetic_scenes(dst: Path, metrics_train_fraction: float) -> list[str]:
    """The synthetic provider's scenes outside their val split, written into dst; their item ids."""
    params = load_params(REPO / "params.yaml")
    with tempfile.TemporaryDirectory(prefix="general_synthetic_") as tmp:
        for sub in ("images", "labels"):
            (Path(tmp) / sub).mkdir()
        entries, _ = ingest_synthetic(params.ingest, Path(tmp))
        kept = []
        for e in entries:
            split = "train"
            if e["has_label"]:
                split = labelled_split(group_key(e["item_id"], params.shards.group_regex), metrics_train_fraction,
                                       params.shards.train_fraction)
            if split != "val":
                shutil.move(str(Path(tmp) / e["image"]), dst / f"synthetic_{e['item_id']}.tif")
                kept.append(e["item_id"])
    return kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder to write (must not exist unless --overwrite)")
    ap.add_argument("--set", dest="sets", nargs=4, action="append", default=[],
                    metavar=("NAME", "ROOT", "GROUP_REGEX", "TRAIN_FRACTION"))
    ap.add_argument("--synthetic", action="store_true", help="add the synthetic scenes outside their val split")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    if not args.sets and not args.synthetic:
        ap.error("nothing to collect: give --set and/or --synthetic")
    if args.out.exists() and not args.overwrite:
        ap.error(f"{args.out} exists (use --overwrite to replace it)")
    metrics_train_fraction = ShardsParams().metrics_train_fraction
    picked: dict[str, list[Path]] = {}
    for name, root, regex, fraction in args.sets:
        root = Path(root)
        for sub in ("images", "labels"):
            if not (root / sub).is_dir():
                ap.error(f"--set {name}: {root / sub} is not a folder")
        try:
            fraction = float(fraction)
        except ValueError:
            ap.error(f"--set {name}: TRAIN_FRACTION must be a number in [0, 1], got {fraction!r}")
        try:
            picked[name] = set_images(root, regex, fraction, metrics_train_fraction)
        except IngestError as e:
            print(f"error: --set {name}: {e}", file=sys.stderr)
            return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        counts = {}
        for name, files in picked.items():
            for f in files:
                (tmp / f"{name}_{f.name}").symlink_to(f.resolve())
            counts[name] = len(files)
        if args.synthetic:
            counts["synthetic"] = len(synthetic_scenes(tmp, metrics_train_fraction))
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.rename(args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps({"out": str(args.out), "images": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
