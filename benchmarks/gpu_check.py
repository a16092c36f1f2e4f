"""GPU figures for the WSI pipeline in one prepared run (< 10 min on one H100/H200).

    python benchmarks/gpu_check.py [--slides 6] [--slide-um 4096] [--repeats 3] [--json out.json]
    python benchmarks/gpu_check.py --dry-run      # same code paths on the CPU, tiny sizes, < 30 s

Needs only the repository and its ``.venv`` (no network: the ViT-L has random weights).
Generates ``--slides`` synthetic slides (tiled JPEG, 0.5 µm/px), tiles them, then measures and
prints one table:

1. tissue segmentation of each slide's thumbnail: numpy/scipy on the CPU vs torch on the GPU
   (``tile.device=cuda``), with the masks' agreement;
2. JPEG decode of the slides' file tiles: libjpeg-turbo on the CPU threads
   (:class:`~netsurv.pathology.rawtiles.RawTileReader`, the pipeline's reader) vs
   ``torchvision.io.decode_jpeg(device="cuda")`` in batches;
3. per encoder (EfficientNet-Lite0 with its packaged weights; ViT-L/16 at the UNI
   architecture, random weights), ``precision=auto`` (bf16 autocast on the GPU):
   model-only images/s (preprocessed batches already on the GPU) and the embedding job's
   pipeline end to end (slides -> CPU decode threads -> pinned batches -> GPU -> HDF5), and
   their ratio.

``--dry-run`` runs every step on the CPU with two small slides and a 2-block ViT instead of
the ViT-L (figures meaningless; it checks that the script works).  Without ``--dry-run`` and
without a CUDA device it stops with exit status 2 before doing anything.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere without installing
    sys.path.insert(0, str(ROOT))


def _write_slide(args):
    path, seed, um = args
    from netsurv.demo.wsi import write_demo_slide

    write_demo_slide(path, rng=np.random.default_rng(seed), density_z=0.0, size_z=0.0,
                     pleomorphism_z=0.0, mpp=0.5, width_um=um, height_um=um)
    return path


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median seconds of ``repeats`` calls (after one warm-up call) and the last result."""
    fn()
    ts, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU only, tiny sizes: checks the script's code paths")
    ap.add_argument("--slides", type=int, default=None, help="default 6 (dry run: 2)")
    ap.add_argument("--slide-um", type=float, default=None,
                    help="slide side in µm, default 4096 (~570 tissue tiles; dry run: 512)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (dry run: 1)")
    ap.add_argument("--decode-threads", type=int, default=None,
                    help="CPU decode threads, default min(16, CPUs)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args(argv)
    import torch

    dry = a.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False; "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU "
              "machine, or with --dry-run to check the script on the CPU.", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    n_slides = a.slides or (2 if dry else 6)
    um = a.slide_um or (512.0 if dry else 4096.0)
    repeats = a.repeats or (1 if dry else 3)
    threads = a.decode_threads or min(16, os.cpu_count() or 1)
    encoders = ([("efficientnet_lite0_imagenet", "package", 8), ("test_tiny", "random", 8)]
                if dry else [("efficientnet_lite0_imagenet", "package", 256),
                             ("uni", "random", 128)])
    info = {"torch": torch.__version__, "device": device, "dry_run": dry,
            "cpus": os.cpu_count(), "decode_threads": threads}
    if not dry:
        info["gpu"] = torch.cuda.get_device_name(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    rows = []

    def row(what, value, unit, note=""):
        rows.append({"what": what, "value": round(float(value), 3), "unit": unit,
                     "note": note})
        print(f"  {what:52s} {value:10.1f} {unit:9s} {note}", flush=True)

    import pandas as pd

    from netsurv.pathology.embed import CohortEmbedder, SlideJob
    from netsurv.pathology.encoders import build_encoder
    from netsurv.pathology.rawtiles import RawTileReader, decode_jpeg_torch
    from netsurv.pathology.slides import open_slide
    from netsurv.pathology.tiling import TileDataset
    from netsurv.pathology.tissue import segment_tissue
    from netsurv.runtime import keep_freed_memory
    from netsurv.tasks.tile import output_dir, tile_cohort

    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        t0 = time.perf_counter()
        jobs = [(td / f"s{k}.tiff", k, um) for k in range(n_slides)]
        if dry or n_slides == 1:
            paths = [_write_slide(j) for j in jobs]
        else:
            with ProcessPoolExecutor(min(n_slides, os.cpu_count() or 1)) as ex:
                paths = list(ex.map(_write_slide, jobs))
        rows_df = pd.DataFrame([{"patient_id": f"P{k}", "slide_id": f"s{k}", "path": str(p)}
                                for k, p in enumerate(paths)])
        tiles_dir = output_dir(td / "derived", {})
        res = tile_cohort(rows_df, {}, tiles_dir, qc=False, progress=False, device=device)
        if res["n_failed"]:
            raise RuntimeError(f"tiling failed: {res['failures'].to_dict('records')}")
        coords = {s: tiles_dir / f"{s}.h5" for s in rows_df.slide_id}
        n_tiles = sum(len(TileDataset(c)) for c in coords.values())
        print(f"{n_slides} slides of {um:.0f} µm, {n_tiles} tissue tiles, ready in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

        # 1. tissue segmentation
        print("tissue segmentation (thumbnails):", flush=True)
        secs, masks = [], []
        for dev in (None, device):  # None: numpy/scipy
            def run_seg(dev=dev):
                out = []
                for p in paths:
                    with open_slide(p) as s:
                        out.append(segment_tissue(s, device=dev).mask)
                return out

            t, m = timed(run_seg, dev or "cpu", repeats)
            secs.append(t)
            masks.append(m)
        agree = min(float((a_ == b_).mean()) for a_, b_ in zip(*masks))
        row("tissue: numpy/scipy (CPU)", n_slides / secs[0], "slides/s")
        row(f"tissue: torch on {device}", n_slides / secs[1], "slides/s",
            f"mask agreement >= {agree:.4f}")

        # 2. JPEG decode of the file tiles under the tissue tiles (level 0, 256 px tiles)
        print("JPEG decode:", flush=True)
        readers, wanted = [], []
        for c in coords.values():
            ds = TileDataset(c)
            rd = RawTileReader(ds.slide_path)
            tw, th = rd.tile_size(0)
            cells = sorted({(int(x) // tw, int(y) // th) for x, y in ds.coords})
            readers.append(rd)
            wanted.append(cells)
        n_dec = sum(map(len, wanted))

        def cpu_decode():
            with ThreadPoolExecutor(threads) as ex:
                for rd, cells in zip(readers, wanted):
                    list(ex.map(lambda t, rd=rd: rd.decode_tile(0, *t), cells))

        def torch_decode(chunk=256):
            for rd, cells in zip(readers, wanted):
                for i in range(0, len(cells), chunk):
                    decode_jpeg_torch(rd, 0, cells[i:i + chunk], device=device)

        t_cpu, _ = timed(cpu_decode, "cpu", repeats)
        t_gpu, _ = timed(torch_decode, device, repeats)
        row(f"decode: libjpeg-turbo, {threads} CPU threads", n_dec / t_cpu, "tiles/s")
        row(f"decode: torchvision decode_jpeg on {device}", n_dec / t_gpu, "tiles/s",
            "(batches of 256, incl. reading the bytes)")
        for rd in readers:
            rd.close()

        # 3. encoders: model only vs the pipeline end to end
        x_tiles = np.stack([TileDataset(coords["s0"], backend="raw")[i]
                            for i in range(min(len(TileDataset(coords["s0"])), 64))])
        for name, weights, bs in encoders:
            try:
                enc = build_encoder(name, weights=weights, device=device)
            except Exception as e:  # noqa: BLE001 - report it, measure the others
                print(f"encoder {name}: could not be built: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
                rows.append({"what": f"{name}: not built", "value": 0.0, "unit": "",
                             "note": f"{type(e).__name__}: {e}"[:200]})
                continue
            print(f"encoder {name} ({enc.weights_source}), precision {enc.precision}, "
                  f"batch {bs}:", flush=True)
            reps = -(-bs // len(x_tiles))
            batch = enc.preprocess(np.concatenate([x_tiles] * reps)[:bs])
            k = 2 if dry else max(2, min(20, n_tiles // bs))

            def model_only(enc=enc, batch=batch, k=k):
                with torch.inference_mode():
                    for _ in range(k):
                        enc(batch)

            t_m, _ = timed(model_only, device, repeats)
            out = td / f"emb-{name}"

            def pipeline(enc=enc, bs=bs, out=out):
                import shutil

                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                with CohortEmbedder(enc, bs, prefetch=2, decode_threads=threads) as ce:
                    ce.plan([SlideJob(s, c, out / f"{s}.h5", None, s) for s, c in coords.items()])
                    for s in coords:
                        ce.embed(s)

            with keep_freed_memory():
                t_p, _ = timed(pipeline, device, repeats)
            ips_m, ips_p = k * bs / t_m, n_tiles / t_p
            row(f"{name}: model only ({enc.precision})", ips_m, "images/s")
            row(f"{name}: pipeline end to end", ips_p, "images/s",
                f"ratio {ips_p / ips_m:.3f}")
            del enc, batch, model_only, pipeline  # the defaults hold the encoder too
            if not dry:
                torch.cuda.empty_cache()

    print("\n| what | value | unit | note |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['value']} | {r['unit']} | {r['note']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
