"""Embedding throughput vs the model alone: one slide, the demo cohort, a cohort of small slides.

    python benchmarks/embed.py [--cohorts slide,demo,small] [--repeats 2] [--warmup 1]
                               [--batch-size N] [--ablations]
                               [--encoder efficientnet_lite0_imagenet]
                               [--precision-tiles 0]

Prints the CPU's bf16 flags and the precision ``precision=auto`` chose (force the other CPU
branch with ``NETSURV_CPU_FLAGS=none``), then for each cohort, in images/s:

- model only: the pipeline's own forward step (``CohortEmbedder._forward`` minus the
  preprocessing: ``inference_mode``, the encoder's precision/autocast and memory format, the
  float32 numpy copy) on preprocessed float tensors in memory, full batches of the job's batch
  size (for ``slide``: the slide's own batches);
- end to end: the embedding job's pipeline (:class:`netsurv.pathology.embed.CohortEmbedder`:
  slides -> tiles -> preprocess -> model -> one HDF5 per slide), claimed slide by slide as
  ``scripts/embed.py`` does;

and the ratio end-to-end / model-only.  Every variant first runs once untimed (``--warmup``:
oneDNN primitives for every batch shape, the heap grown to its working set; the pipeline on the
first slides holding two batches, the whole cohort for ``slide``), then the variants are
interleaved, in alternating order (model, pipeline; pipeline, model; ...), and the median of
``--repeats`` is kept, so that load from other jobs and the order hit them alike (the ratio of
the medians; "paired" is the median of the per-repeat ratios, steadier when one run of a
variant is slowed down by the machine); user and
system CPU seconds and minor page faults per tile show allocator churn (page faults are system
time).  The figures are steady state: one-time set-up costs belong to neither variant.

``--before`` adds the job as it was before the pipeline (``per-slide + trim`` below);
``--ablations`` adds, per cohort, the choices the pipeline is made of, one changed at a time:
``per-slide + trim`` (the job before: one reader / batch set per slide, a partial batch at
the end of every slide, ``malloc_trim`` after each), ``per-slide`` (same, no trim),
``pipeline + trim`` (trim after each slide), ``pipeline prefetch=2`` (a reader thread two
batches ahead instead of reading between forward passes).

Cohorts: ``slide`` = one generated 4096 µm² slide (0.5 µm/px, ~600 tiles); ``demo`` = the
demo cohort (``data=demo``: generated into ``$NETSURV_CACHE`` on first use, tiled with the
default parameters, both cached); ``small`` = ``--small-slides`` generated 640 µm² slides
(~25 tiles each).  Embedding files go to a temp folder.  On 2 quiet cores the default run
takes about 8 minutes in bf16 and 15 in fp32 (plus the demo cohort's generation if it is not
cached yet).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch


def make_slide(path: Path, seed: int, um: float) -> Path:
    from netsurv.demo.wsi import write_demo_slide

    write_demo_slide(path, rng=np.random.default_rng(seed), density_z=0.0, size_z=0.0,
                     pleomorphism_z=0.0, mpp=0.5, width_um=um, height_um=um)
    return path


def tiled(rows: list[dict], derived: Path, params: dict | None = None,
          tile_kw: dict | None = None) -> list[tuple[str, Path, str]]:
    """(slide_id, coords file, slide path) of every slide tiled without failure."""
    import pandas as pd

    from netsurv.tasks.tile import output_dir, tile_cohort

    params = dict(params or {})
    out = output_dir(derived, params)
    res = tile_cohort(pd.DataFrame(rows), params, out, **{"qc": False, "progress": False,
                                                          **(tile_kw or {})})
    failed = set(res["failures"].slide_id) if len(res["failures"]) else set()
    return [(r["slide_id"], out / f"{r['slide_id']}.h5", str(r["path"])) for r in rows
            if r["slide_id"] not in failed]


def demo_cohort():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from netsurv.tasks.cohort import resolve_cohort
    from netsurv.tasks.tile import tile_options

    cfg_dir = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=cfg_dir, version_base="1.3"):
        cfg = compose("embed", overrides=["tile.progress=false"])
    cohort = resolve_cohort(cfg.data)
    params = OmegaConf.to_container(cfg.tiling, resolve=True)
    rows = cohort.slides.to_dict("records")
    return tiled(rows, Path(str(cfg.data.derived)), params,
                 tile_options(OmegaConf.to_container(cfg.tile, resolve=True)))


def cos_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGESIZE") / 2**20


class _Preprocessed:
    """The encoder as :meth:`CohortEmbedder._forward` sees it, for batches that are already
    preprocessed: ``preprocess`` is the identity, everything else is the encoder's."""

    def __init__(self, enc):
        self._enc = enc

    def preprocess(self, x):
        return x

    def __call__(self, x):
        return self._enc(x)

    def __getattr__(self, name):
        return getattr(self._enc, name)


def model_forward(enc):
    """``fn(x) -> float32 numpy [B, dim]`` for a preprocessed batch ``x``: the embedding
    pipeline's own forward step (:meth:`CohortEmbedder._forward`: ``inference_mode``, the
    encoder's precision policy / autocast and memory format, the shape check, the copy out),
    without the preprocessing, so that model-only runs the model exactly as the job does."""
    from netsurv.pathology.embed import CohortEmbedder

    host = types.SimpleNamespace(encoder=_Preprocessed(enc))
    return lambda x: CohortEmbedder._forward(host, x, len(x))


def model_tile_count(n_tiles: int, want: int | None, bs: int) -> int:
    """Tiles in memory for the model-only figure: all (``want`` None: one slide, in its own
    batches) or ``want`` rounded down to full batches of ``bs`` (at least one batch), never
    more than ``n_tiles``."""
    if want is None:
        return n_tiles
    return min(n_tiles, max(bs, min(want, n_tiles) // bs * bs))


def warmup_slides(counts: list[int], bs: int, batches: int = 2) -> int:
    """Length of the shortest prefix of the slides holding ``batches`` full batches of tiles
    (all the slides when they hold fewer): the pipeline's warm-up."""
    total = 0
    for i, c in enumerate(counts):
        total += c
        if total >= batches * bs:
            return i + 1
    return len(counts)


class Run:
    """One end-to-end variant over a cohort: ``pipeline`` (one CohortEmbedder, as the job) or
    per-slide (a fresh one per slide, as the job before); optional trim after each slide."""

    def __init__(self, enc, slides, out: Path, bs: int, *, cohort: bool, trim: bool,
                 prefetch: int, decode_threads: int):
        self.enc, self.slides, self.out, self.bs = enc, slides, out, bs
        self.cohort, self.trim, self.prefetch, self.dt = cohort, trim, prefetch, decode_threads

    def on(self, slides, out: Path) -> Run:
        """The same variant on other slides, writing to ``out`` (warm-up)."""
        r = copy.copy(self)
        r.slides, r.out = slides, out
        return r

    def __call__(self):
        from netsurv.pathology.embed import CohortEmbedder, SlideJob
        from netsurv.runtime import release_free_memory

        self.out.mkdir(parents=True, exist_ok=True)
        jobs = [SlideJob(s, c, self.out / f"{s}.h5", p, s) for s, c, p in self.slides]

        def new():
            return CohortEmbedder(self.enc, self.bs, prefetch=self.prefetch,
                                  decode_threads=self.dt)

        n = 0
        with new() if self.cohort else contextlib.nullcontext() as ce:
            if ce is not None:
                ce.plan(jobs)
            for j in jobs:
                if ce is None:
                    with new() as one:
                        one.plan([j])
                        n += one.embed(j.key)
                else:
                    n += ce.embed(j.key)
                if self.trim:
                    release_free_memory()
        return n


def bench_cohort(name, enc, slides, a, td: Path, tiles_for_model: int | None = None):
    from netsurv.pathology.embed import read_embeddings
    from netsurv.pathology.tiling import TileDataset
    from netsurv.tasks.embed import default_prefetch

    bs = a.batch_size
    counts = [len(TileDataset(c)) for _, c, _ in slides]
    n_tiles = sum(counts)
    print(f"\n[{name}] {len(slides)} slide(s), {n_tiles} tiles (median {int(np.median(counts))}"
          f" per slide), batch {bs}", flush=True)
    # model-only input: the first tiles, in full batches (one slide: its own batches)
    want = model_tile_count(n_tiles, tiles_for_model, bs)
    tiles = []
    for _, c, p in slides:
        ds = TileDataset(c, p, backend="auto")
        tiles += [ds[i] for i in range(min(len(ds), want - len(tiles)))]
        if len(tiles) >= want:
            break
    tiles = np.stack(tiles)
    pre = [enc.preprocess(tiles[s:s + bs]) for s in range(0, len(tiles), bs)]
    # Model-only used to measure slower than end to end because its only warm-up was one
    # forward of 4 tiles: the first timed pass at the job's batch size paid the oneDNN
    # primitive creation for every batch shape and the growth of the heap to the batch's
    # working set (on the bench slide: 37 img/s, 1.3 M minor faults, as much sys as user
    # time, vs 65-85 img/s and no faults warm), and model-only always ran first, so the
    # pipeline after it found everything warm; with --repeats 2 the "median" is the mean of
    # the cold and a warm pass.  Inputs, call path (same forward: inference_mode, autocast,
    # channels_last), batch size, threads and malloc settings were already the same.  Now:
    # an untimed warm-up of every variant (below), alternating order, and the pipeline's own
    # forward step on the preloaded batches.
    forward = model_forward(enc)

    def model_only():
        for x in pre:
            forward(x)
        return len(tiles)

    pf = default_prefetch(a.prefetch, enc.device)
    kw = dict(prefetch=pf, decode_threads=a.decode_threads)
    variants = {"model only": model_only,
                "pipeline": Run(enc, slides, td / name / "pipe", bs, cohort=True, trim=False,
                                **kw)}
    if a.ablations or a.before:
        variants["per-slide + trim"] = Run(enc, slides, td / name / "ps-trim", bs,
                                           cohort=False, trim=True, **kw)
    if a.ablations:
        variants.update({
            "per-slide": Run(enc, slides, td / name / "ps", bs, cohort=False, trim=False, **kw),
            "pipeline + trim": Run(enc, slides, td / name / "pipe-trim", bs, cohort=True,
                                   trim=True, **kw),
            f"pipeline prefetch={2 if pf == 0 else 0}": Run(
                enc, slides, td / name / "pipe-pf", bs, cohort=True, trim=False,
                prefetch=2 if pf == 0 else 0, decode_threads=a.decode_threads)})
    threads = torch.get_num_threads()

    def timed(fn):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        n = fn()
        t, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        if torch.get_num_threads() != threads:
            print(f"  WARNING: torch threads {threads} -> {torch.get_num_threads()} during a "
                  "run (figures not comparable)", flush=True)
        return n, t, ((r1.ru_utime - r0.ru_utime) / n, (r1.ru_stime - r0.ru_stime) / n,
                      (r1.ru_minflt - r0.ru_minflt) / n)

    if a.warmup:
        # untimed: every batch shape's primitives, the heap at its working set (the pipeline
        # on the first slides holding two batches: its own buffers and preprocessing)
        j = warmup_slides(counts, bs)
        warm = []
        for _ in range(a.warmup):
            for k, fn in variants.items():
                fn = fn.on(slides[:j], td / name / "warm" / k) if isinstance(fn, Run) else fn
                n, t, c = timed(fn)
                warm.append(f"{k} {n / t:.1f} ({c[2]:.0f} faults/tile)")
        print(f"  warm-up, untimed (images/s, first slides {sum(counts[:j])} tiles): "
              + ", ".join(warm), flush=True)
    secs = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    order = list(variants)
    for r in range(a.repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            n, t, c = timed(variants[k])
            secs[k].append(t / n)
            cpu[k].append(c)
    med = {k: statistics.median(v) for k, v in secs.items()}
    # also the median of the per-repeat ratios: the two variants of a repeat run back to back,
    # so a slow spell of the machine (seen on shared VMs: one run 30 % off) hits both
    paired = {k: statistics.median(m / v for m, v in zip(secs["model only"], secs[k]))
              for k in variants}
    for k in variants:
        u, s, f = (statistics.median(c[i] for c in cpu[k]) for i in range(3))
        ratio = med["model only"] / med[k]
        print(f"  {k:22s} {1 / med[k]:8.1f} images/s  ratio {ratio:5.3f} (paired "
              f"{paired[k]:5.3f})  "
              f"(cpu ms/tile: user {u * 1000:6.2f} sys {s * 1000:5.2f}; "
              f"{f:5.0f} faults/tile)  runs: "
              + " ".join(f"{1 / v:.1f}" for v in secs[k]), flush=True)
    print(f"  RSS now {rss_mb():.0f} MiB, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    # the pipeline's embeddings vs the in-memory model-only ones (first slide: its tiles in
    # the slide's own batches) and, with --ablations, vs the per-slide path on every slide
    s0, _, _ = slides[0]
    f0 = read_embeddings(td / name / "pipe" / f"{s0}.h5")[0]
    with torch.inference_mode():
        k0 = counts[0]
        ref = torch.cat([enc(enc.preprocess(tiles[s:min(s + bs, k0)]))
                         for s in range(0, min(k0, len(tiles)), bs)]).numpy()
    m = min(len(ref), len(f0))
    line = (f"  pipeline vs in-memory, slide {s0}: max |diff| "
            f"{np.abs(f0[:m] - ref[:m]).max():.2e}, min cosine {cos_min(f0[:m], ref[:m]):.6f}")
    if a.ablations or a.before:
        worst, diff = 1.0, 0.0
        for s, _, _ in slides:
            fa = read_embeddings(td / name / "pipe" / f"{s}.h5")[0]
            fb = read_embeddings(td / name / "ps-trim" / f"{s}.h5")[0]
            worst, diff = min(worst, cos_min(fa, fb)), max(diff, float(np.abs(fa - fb).max()))
        line += f"; vs per-slide, all slides: max |diff| {diff:.2e}, min cosine {worst:.6f}"
    print(line, flush=True)
    return {**{k: 1 / v for k, v in med.items()}, "paired": paired["pipeline"]}


@contextlib.contextmanager
def malloc_mode(mode: str):
    """``keep``: :func:`netsurv.runtime.keep_freed_memory`, as the embedding job; ``no-trim``:
    the same with ``M_TRIM_THRESHOLD = -1`` (no trimming at all: mallopt's int caps the job's
    threshold at 2 GiB, and a batch that leaves more than that free at the top of the heap is
    trimmed and faulted in again by the next one); ``default``: glibc's defaults.  Yields
    whether the settings were applied."""
    if mode == "default":
        yield False
        return
    from netsurv.runtime import _M_TRIM_THRESHOLD, _libc, keep_freed_memory

    with keep_freed_memory() as on:
        if on and mode == "no-trim":
            on = bool(_libc().mallopt(_M_TRIM_THRESHOLD, -1))
        yield on


def precision_table(a, x, bs):
    from netsurv.pathology.encoders import build_encoder

    m = min(a.precision_tiles, len(x))
    x = x[:m]
    rows = []
    print(f"\nprecision / memory format ({m} tiles, batch {bs}, best of {a.repeats}):")
    for prec in ("fp32", "bf16"):
        for cl in (False, True):
            e = build_encoder(a.encoder, precision=prec)
            e.model = e.model.to(memory_format=torch.channels_last if cl else
                                 torch.contiguous_format)
            e.channels_last = cl
            with torch.inference_mode():
                for s in range(0, m, bs):  # warm-up: every batch shape, the heap grown
                    e(x[s:s + bs])
                t_best, out = float("inf"), None
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    out = torch.cat([e(x[s:s + bs]) for s in range(0, m, bs)]).numpy()
                    t_best = min(t_best, time.perf_counter() - t0)
            rows.append(out)
            print(f"  {prec:5s} channels_last={str(cl):5s} {m / t_best:8.2f} images/s  "
                  f"min cosine vs fp32 {cos_min(out, rows[0]):.5f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="efficientnet_lite0_imagenet")
    ap.add_argument("--cohorts", default="slide,demo,small",
                    help="comma-separated: slide, demo, small")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default: the encoder config's batch_size (the job's)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed runs of every variant before the timed ones (0: none)")
    ap.add_argument("--small-slides", type=int, default=48)
    ap.add_argument("--model-tiles", type=int, default=512,
                    help="tiles in memory for the cohorts' model-only figure")
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=None,
                    help="batches read ahead (default: the job's, 0 on CPU)")
    ap.add_argument("--ablations", action="store_true",
                    help="also measure each choice of the pipeline against its alternative")
    ap.add_argument("--before", action="store_true",
                    help="also measure the job before the pipeline (per-slide + trim)")
    ap.add_argument("--precision-tiles", type=int, default=0,
                    help="> 0: also compare fp32/bf16 x contiguous/channels_last on so many "
                         "tiles (with min cosine to fp32)")
    ap.add_argument("--malloc", choices=["keep", "no-trim", "default"], default="keep",
                    help="keep: glibc keeps freed memory, as the embedding job sets it "
                         "(netsurv.runtime); no-trim: the same without any trimming "
                         "(M_TRIM_THRESHOLD=-1); default: leave malloc alone")
    a = ap.parse_args()
    from omegaconf import OmegaConf

    from netsurv.pathology.encoders import build_encoder
    from netsurv.pathology.encoders.core import NATIVE_BF16_FLAGS, cpu_flags

    cfg_file = Path(__file__).resolve().parents[1] / "configs" / "encoder" / f"{a.encoder}.yaml"
    if a.batch_size is None:
        a.batch_size = int(OmegaConf.load(cfg_file).get("batch_size") or 64) \
            if cfg_file.is_file() else 64
    flags = cpu_flags()
    enc = build_encoder(a.encoder)  # the job's defaults: precision auto
    env = os.environ.get("NETSURV_CPU_FLAGS")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}; native bf16 flags: "
          f"{sorted(flags & NATIVE_BF16_FLAGS) or 'none'}"
          f"{' (NETSURV_CPU_FLAGS=' + env + ')' if env is not None else ''}")
    print(f"encoder {enc.name} ({enc.weights_source}): precision=auto -> {enc.precision}, "
          f"channels_last {enc.channels_last}, batch {a.batch_size}")
    wanted = [c.strip() for c in a.cohorts.split(",") if c.strip()]
    bad = set(wanted) - {"slide", "demo", "small"}
    if bad:
        ap.error(f"unknown cohort(s) {sorted(bad)}: choose from slide, demo, small")
    with malloc_mode(a.malloc) as on, tempfile.TemporaryDirectory() as td:
        print("malloc: " + ("glibc defaults" if not on else
                            "keeps freed memory (netsurv.runtime, as the embedding job)"
                            + (", no trimming at all (M_TRIM_THRESHOLD=-1)"
                               if a.malloc == "no-trim" else "")))
        td = Path(td)
        res = {}
        for c in wanted:
            t0 = time.perf_counter()
            if c == "slide":
                p = make_slide(td / "slide.tiff", 0, 4096)
                slides = tiled([{"patient_id": "P", "slide_id": "slide", "path": str(p)}],
                               td / "d-slide")
                res[c] = bench_cohort(c, enc, slides, a, td)
            elif c == "demo":
                slides = demo_cohort()
                print(f"(demo cohort ready in {time.perf_counter() - t0:.0f} s)")
                res[c] = bench_cohort(c, enc, slides, a, td, a.model_tiles)
            else:
                rows = [{"patient_id": f"P{k}", "slide_id": f"s{k:03d}",
                         "path": str(make_slide(td / f"s{k:03d}.tiff", k, 640))}
                        for k in range(a.small_slides)]
                slides = tiled(rows, td / "d-small")
                res[c] = bench_cohort(c, enc, slides, a, td, a.model_tiles)
        print(f"\nsummary ({enc.precision}, batch {a.batch_size}): ratio end-to-end / model-only "
              "(of the medians; median of the per-repeat ratios)")
        for c, r in res.items():
            print(f"  {c:6s} {r['pipeline'] / r['model only']:.3f}; paired {r['paired']:.3f}  "
                  f"({r['pipeline']:.1f} vs {r['model only']:.1f} images/s)")
        if a.precision_tiles > 0:
            from netsurv.pathology.tiling import TileDataset

            s, c, p = slides[0]
            ds = TileDataset(c, p)
            x = enc.preprocess(np.stack([ds[i] for i in range(min(len(ds), a.precision_tiles))]))
            precision_table(a, x, a.batch_size)


if __name__ == "__main__":
    main()
