"""The remote provider: COG windows read through /vsicurl/ with HTTP range requests.

A local HTTP server on 127.0.0.1 serves COGs written by rasterio's COG driver, honours Range
requests and logs every request, so the test can prove that only byte ranges (a fraction of the
file) were fetched. 404s and timeouts must fail with a clear error naming the URL.
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import GRID, blocky_labels, tiny_raw, write_params

from stages import ingest as ingest_stage
from stages.ingest import ingest
from stages.params import parse_params


class _RangeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes], delay_s: float = 0.0):
        self.files, self.delay_s, self.requests = files, delay_s, []
        super().__init__(("127.0.0.1", 0), _RangeHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RangeHandler(BaseHTTPRequestHandler):
    server: _RangeServer

    def log_message(self, *args):  # keep test output clean
        pass

    def _serve(self, body: bool) -> None:
        path = self.path.split("?")[0]
        rng = self.headers.get("Range")
        if path.startswith("/slow"):
            time.sleep(self.server.delay_s)
        data = self.server.files.get(path)
        if data is None:
            self.server.requests.append((self.command, path, rng, 0))
            self.send_error(404, "not found")
            return
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            chunk = data[start:end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            chunk = data
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        sent = len(chunk) if body else 0
        self.server.requests.append((self.command, path, rng, sent))
        if body:
            try:
                self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def do_GET(self):
        self._serve(True)

    def do_HEAD(self):
        self._serve(False)


@pytest.fixture
def serve():
    servers = []

    def start(files: dict[str, bytes], delay_s: float = 0.0) -> _RangeServer:
        server = _RangeServer(files, delay_s)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _cog(path: Path, data: np.ndarray) -> bytes:
    with rasterio.open(path, "w", driver="COG", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype.name, crs="EPSG:32611", transform=GRID,
                       blocksize=256, compress="deflate") as dst:
        dst.write(data)
    return path.read_bytes()


def _remote(urls, **kw):
    raw = tiny_raw(**{"ingest.provider": "remote", "ingest.dataset": "cogs", "ingest.remote.urls": urls,
                      **{f"ingest.remote.{k}": v for k, v in kw.items()}})
    return parse_params(raw).ingest


@pytest.fixture(scope="module")
def cogs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogs")
    rgb = np.random.default_rng(0).integers(0, 256, (3, 1024, 1024), dtype=np.uint8)
    label = blocky_labels(1024, 1024, 5, 1)
    return rgb, label, _cog(root / "scene.tif", rgb), _cog(root / "scene_label.tif", label[None])


def test_windowed_read_fetches_only_byte_ranges(tmp_path, serve, cogs):
    rgb, label, image_bytes, label_bytes = cogs
    server = serve({"/data/scene.tif": image_bytes, "/data/scene_label.tif": label_bytes})
    window = [300, 520, 200, 100]
    params = _remote([f"{server.url}/data/scene.tif"], label_urls=[f"{server.url}/data/scene_label.tif"],
                     windows=[window])
    (entry,) = ingest(params, tmp_path / "raw")
    c, r, w, h = window
    assert entry["item_id"] == "scene_c300_r520" and entry["source"] == f"{server.url}/data/scene.tif"
    with rasterio.open(tmp_path / "raw" / entry["image"]) as src:
        assert np.array_equal(src.read(), rgb[:, r:r + h, c:c + w])
        assert src.transform == GRID @ rasterio.Affine.translation(c, r) and src.crs.to_epsg() == 32611
    with rasterio.open(tmp_path / "raw" / entry["label"]) as lab:
        assert np.array_equal(lab.read(1), label[r:r + h, c:c + w])
    image_gets = [q for q in server.requests if q[0] == "GET" and q[1] == "/data/scene.tif"]
    assert image_gets and all(q[2] and q[2].startswith("bytes=") for q in image_gets)
    fetched = sum(q[3] for q in image_gets)
    assert fetched < 0.3 * len(image_bytes), (fetched, len(image_bytes))


def test_16_bit_window_is_stretched_from_its_own_pixels_without_reading_the_whole_cog(tmp_path, serve):
    from runtime.rescale import percentile_limits, to_uint8

    rng = np.random.default_rng(1)
    dn = rng.integers(0, 60000, (3, 1024, 1024), dtype=np.uint16)
    c, r, w, h = 300, 520, 200, 100
    dn[:, r:r + h, c:c + w] = rng.integers(1000, 2000, (3, h, w), dtype=np.uint16)  # the window differs
    server = serve({"/dn.tif": _cog(tmp_path / "dn.tif", dn)})
    (entry,) = ingest(_remote([f"{server.url}/dn.tif"], windows=[[c, r, w, h]]), tmp_path / "raw")
    window = dn[:, r:r + h, c:c + w].transpose(1, 2, 0)
    expected = percentile_limits(window)
    np.testing.assert_allclose(entry["rescale"], expected)
    with rasterio.open(tmp_path / "raw" / entry["image"]) as src:
        np.testing.assert_array_equal(src.read().transpose(1, 2, 0), to_uint8(window, expected))
    gets = [q for q in server.requests if q[0] == "GET" and q[1] == "/dn.tif"]
    assert sum(q[3] for q in gets) < 0.3 * (tmp_path / "dn.tif").stat().st_size


def test_bounding_box_selects_the_covering_window(tmp_path, serve, cogs):
    rgb, label, image_bytes, label_bytes = cogs
    server = serve({"/scene.tif": image_bytes, "/scene_label.tif": label_bytes})
    # Pixels [300, 500) x [520, 620) of a 0.5 m grid; the box edges fall inside pixels (rounded outward).
    col0, col1, row0, row1 = 300.2, 499.6, 520.4, 619.9  # fractional pixel edges
    left, right = GRID.c + col0 * 0.5, GRID.c + col1 * 0.5
    top, bottom = GRID.f - row0 * 0.5, GRID.f - row1 * 0.5
    params = _remote([f"{server.url}/scene.tif"], label_urls=[f"{server.url}/scene_label.tif"],
                     bounds=[[left, bottom, right, top]])
    (entry,) = ingest(params, tmp_path / "raw")
    with rasterio.open(tmp_path / "raw" / entry["image"]) as src, \
            rasterio.open(tmp_path / "raw" / entry["label"]) as lab:
        assert np.array_equal(src.read(), rgb[:, 520:620, 300:500])
        assert np.array_equal(lab.read(1), label[520:620, 300:500])
    far = _remote([f"{server.url}/scene.tif"], bounds=[[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ingest_stage.IngestError, match="do not overlap"):
        ingest(far, tmp_path / "raw2")


def test_404_is_a_clear_error(tmp_path, serve, capsys, cogs):
    server = serve({"/data/scene.tif": cogs[2]})
    url = f"{server.url}/data/missing.tif"
    params = write_params(tmp_path / "p.yaml", tiny_raw(**{"ingest.provider": "remote", "ingest.remote.urls": [url]}))
    assert ingest_stage.main(["--params", str(params), "--out", str(tmp_path / "raw")]) == 2
    err = capsys.readouterr().err
    assert url in err and "404" in err
    assert not (tmp_path / "raw").exists()


def test_timeout_is_a_clear_error(tmp_path, serve, cogs):
    server = serve({"/slow/scene.tif": cogs[2]}, delay_s=4.0)
    params = _remote([f"{server.url}/slow/scene.tif"], timeout_s=1)
    t = time.perf_counter()
    with pytest.raises(ingest_stage.RasterError, match=r"slow/scene.tif.*cannot open"):
        ingest(params, tmp_path / "raw")
    assert time.perf_counter() - t < 4.0
    assert not (tmp_path / "raw").exists()


def test_urls_must_be_http_or_s3(tmp_path):
    with pytest.raises(ingest_stage.IngestError, match="ftp://x/y.tif"):
        ingest(_remote(["ftp://x/y.tif"]), tmp_path / "raw")
    assert ingest_stage.vsi_path("s3://bucket/key/a.tif") == "/vsis3/bucket/key/a.tif"
