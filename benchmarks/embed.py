"""Embedding throughput on one demo slide with the default encoder (efficientnet_lite0_imagenet).

    python benchmarks/embed.py [--tiles 0] [--batch-size 64] [--repeats 2]
                               [--precision-tiles 64] [--encoder efficientnet_lite0_imagenet]

The slide (4096 µm², 0.5 µm/px, tiled JPEG) is generated into a temp folder and tiled with the
default tiling parameters; all its tissue tiles are used (or the first ``--tiles``).  Prints images/s for

- model only: ``encoder(x)`` on already preprocessed float tensors in memory (same batches);
- preprocess + model: uint8 tiles in memory -> ``encoder.preprocess`` -> ``encoder``;
- end to end: :func:`netsurv.pathology.embed.embed_slide` (slide -> tiles (prefetch thread,
  raw tiled-JPEG decode) -> preprocess -> model -> HDF5);

and the ratio end-to-end / model-only (best of ``--repeats``, variants interleaved so that load
from other jobs hits them alike).  Then, on ``--precision-tiles`` tiles: fp32 vs bf16 autocast
and contiguous vs channels_last on CPU, with the cosine similarity of each variant's embeddings
to the fp32 ones (min over tiles).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_slide(d: Path, n_tiles: int) -> Path:
    import h5py

    from netsurv.cohort.demo_wsi import write_demo_slide
    from netsurv.pathology.slides import open_slide
    from netsurv.pathology.tiling import TILING_DEFAULTS, tile_slide, write_coords

    p = d / "bench.tiff"
    write_demo_slide(p, rng=np.random.default_rng(0), density_z=0.0, size_z=0.0,
                     pleomorphism_z=0.0, mpp=0.5, width_um=4096, height_um=4096)
    with open_slide(p) as s:
        res = tile_slide(s, TILING_DEFAULTS)
        h5 = write_coords(d / "bench.h5", res, s, slide_id="bench")
    with h5py.File(h5, "r+") as f:  # keep the first n_tiles tiles
        c = f["coords"][:n_tiles] if n_tiles else f["coords"][:]
        attrs = dict(f["coords"].attrs)
        del f["coords"]
        ds = f.create_dataset("coords", data=c)
        for k, v in attrs.items():
            ds.attrs[k] = v
    print(f"slide {p.name}: {len(res.coords)} tissue tiles, using {len(c)}")
    return h5


def cos_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="efficientnet_lite0_imagenet")
    ap.add_argument("--tiles", type=int, default=0, help="first N tissue tiles (0: all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision-tiles", type=int, default=64)
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=None, help="batches read ahead (0: read "
                    "synchronously between forward passes; default: the job's, 0 on CPU)")
    ap.add_argument("--skip-throughput", action="store_true",
                    help="only the precision / memory-format comparison")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="keep: glibc keeps freed memory, as the embedding job sets it "
                         "(netsurv.runtime); default: leave malloc alone")
    a = ap.parse_args()
    import contextlib

    from netsurv.runtime import keep_freed_memory

    with keep_freed_memory() if a.malloc == "keep" else contextlib.nullcontext(False) as on:
        print(f"malloc: {'keeps freed memory (netsurv.runtime, as the embedding job)' if on else 'glibc defaults'}")
        run(a)


def run(a):

    from netsurv.pathology.embed import embed_slide, read_embeddings
    from netsurv.pathology.encoders import build_encoder
    from netsurv.pathology.tiling import TileDataset
    from netsurv.tasks.embed import default_prefetch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        h5 = make_slide(td, a.tiles)
        enc = build_encoder(a.encoder)  # default weights, precision auto (fp32 on CPU)
        print(f"encoder {enc.name} ({enc.weights_source}), precision {enc.precision}, "
              f"channels_last {enc.channels_last}, batch {a.batch_size}")
        ds = TileDataset(h5, backend="auto")
        tiles = np.stack([ds[i] for i in range(len(ds))])
        n, bs = len(tiles), a.batch_size
        pre = [enc.preprocess(tiles[s:s + bs]) for s in range(0, n, bs)]
        with torch.inference_mode():
            enc(pre[0][:4])  # warm-up

        def model_only():
            with torch.inference_mode():
                for x in pre:
                    enc(x)

        def pre_model():
            with torch.inference_mode():
                for s in range(0, n, bs):
                    enc(enc.preprocess(tiles[s:s + bs]))

        def end_to_end():
            embed_slide(h5, enc, td / "emb.h5", batch_size=bs, num_workers=0,
                        decode_threads=a.decode_threads,
                        prefetch=default_prefetch(a.prefetch, enc.device))

        variants = {} if a.skip_throughput else {
            "model only": model_only, "preprocess + model": pre_model, "end to end": end_to_end}
        best = {k: float("inf") for k in variants}
        for _ in range(a.repeats):
            for k, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
        for k, t in best.items():
            print(f"  {k:20s} {n / t:8.2f} images/s  ({t:.2f} s for {n} tiles)")
        if not a.skip_throughput:
            print(f"  ratio end-to-end / model-only        "
                  f"{best['model only'] / best['end to end']:.3f}")
            print(f"  ratio end-to-end / preprocess+model  "
                  f"{best['preprocess + model'] / best['end to end']:.3f}")
            feats, _, _ = read_embeddings(td / "emb.h5")
            with torch.inference_mode():
                ref_all = torch.cat([enc(x) for x in pre]).numpy()
            print(f"  end-to-end vs in-memory embeddings: max |diff| "
                  f"{np.abs(feats - ref_all).max():.2e}, min cosine {cos_min(feats, ref_all):.6f}",
                  flush=True)

        # precision / memory format on CPU
        m = min(a.precision_tiles, n)
        x = torch.cat(pre)[:m]
        rows = []
        print(f"precision / memory format ({m} tiles, batch {bs}, best of {a.repeats}):",
              flush=True)
        for prec in ("fp32", "bf16"):
            for cl in (False, True):
                e = build_encoder(a.encoder, precision=prec)
                if cl:
                    e.model = e.model.to(memory_format=torch.channels_last)
                    e.channels_last = True
                with torch.inference_mode():
                    e(x[:4])
                    t_best, out = float("inf"), None
                    for _ in range(a.repeats):
                        t0 = time.perf_counter()
                        out = torch.cat([e(x[s:s + bs]) for s in range(0, m, bs)]).numpy()
                        t_best = min(t_best, time.perf_counter() - t0)
                rows.append((prec, cl, m / t_best, out))
                print(f"  {prec:5s} channels_last={str(cl):5s} {m / t_best:8.2f} images/s  "
                      f"min cosine vs fp32 {cos_min(out, rows[0][3]):.5f}", flush=True)


if __name__ == "__main__":
    main()
