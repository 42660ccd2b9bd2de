"""Does one set of centres over several rasters (`fit_shared_centres`) give a better single legend
than centres fitted per raster?

Each labelled image of `data/raw` whose item id matches `--items` (e.g. Dubai's area 8, `^t8_`) is
one raster, segmented through `segment_raster` as a GIS user would run it, two ways:

    per_raster: centres fitted on each raster (`segment_raster`'s default, balanced)
    shared    : one set fitted over all the rasters (`fit_shared_centres`, plain by default), then
                every raster segmented with it (`centres=`)

and scored under both of evaluate's protocols: `global` (one Hungarian matching for all rasters,
what a user with one legend for the whole area sees) and `per_raster` (a matching per raster,
confusions summed). The last line is JSON with the four mIoUs and shared / per_raster under the
global protocol.

    python benchmarks/shared_centres_check.py --raw data/raw --model model/best --items '^t8_' [--k 5]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raster_scoring import labelled_items_args  # noqa: E402

from runtime import fit_shared_centres, segment_raster  # noqa: E402
from runtime.model import load_model  # noqa: E402
from stages.metrics import GlobalProtocol, PerTileProtocol  # noqa: E402


def main() -> int:
    args, items, num_classes, k = labelled_items_args(__doc__.splitlines()[0])
    import rasterio

    model = load_model(args.model)
    t0 = time.perf_counter()
    shared = fit_shared_centres([args.raw / it["image"] for it in items], k, model)
    scores = {f"{how}/{protocol}": cls(k, num_classes) for how in ("per_raster", "shared")
              for protocol, cls in (("global", GlobalProtocol), ("per_raster", PerTileProtocol))}
    with tempfile.TemporaryDirectory() as tmp:
        for it in items:
            with rasterio.open(args.raw / it["label"]) as ds:
                label = ds.read(1)
            for how, centres in (("per_raster", None), ("shared", shared.centres)):
                res = segment_raster(args.raw / it["image"], Path(tmp) / "out.tif", k, model, centres=centres,
                                     overwrite=True)
                with rasterio.open(res.dst) as ds:
                    pred = ds.read(1)
                for protocol in ("global", "per_raster"):
                    scores[f"{how}/{protocol}"].add(pred, label)
    result = {name: round(p.result()["miou"], 4) for name, p in scores.items()}
    result["shared_over_per_raster_global"] = round(result["shared/global"] / result["per_raster/global"], 3)
    result.update(rasters=len(items), items=args.items, cells=shared.cells,
                  seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
