"""TransMIL's Nyström attention: exact when the landmarks cover the bag, closer with more
landmarks, blind to padding and to the other bags of a batch, linear memory in the bag size."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from netsurv.models.mil import NystromAttention, TransMIL, iterative_pinv


def _coherent_bag(n, d=16, kinds=10, seed=0, dtype=torch.float64):
    """Tiles of a few tissue types in contiguous runs plus noise (neighbouring tiles of a slide
    in row-major order resemble each other): where segment-mean landmarks are meaningful."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(kinds, d, generator=g, dtype=dtype) * 2
    lab = torch.repeat_interleave(torch.randperm(kinds, generator=g), n // kinds)
    return (centers[lab] + 0.3 * torch.randn(n, d, generator=g, dtype=dtype))[None]


def test_iterative_pinv_matches_svd_pinv_and_is_per_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(3 * torch.randn(3, 2, 12, 12, generator=g, dtype=torch.float64), -1)
    z = iterative_pinv(a, 40)
    torch.testing.assert_close(z, torch.linalg.pinv(a), rtol=1e-6, atol=1e-6)
    # scaling is per matrix: a matrix's pseudo-inverse does not depend on its batch neighbours
    big = torch.cat([a[:1], 1e3 * a[1:]])
    torch.testing.assert_close(iterative_pinv(big, 6)[0], iterative_pinv(a[:1], 6)[0])


def test_nystrom_equals_exact_attention_when_landmarks_cover_the_bag():
    torch.manual_seed(0)
    att = NystromAttention(16, heads=4, landmarks=64, pinv_iterations=40).double().eval()
    x = torch.randn(2, 50, 16, dtype=torch.float64)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, 35:] = False                          # two bags of 50 and 35 tokens, padded
    with torch.no_grad():
        out_n, cls_n = att(x, valid)
        att.exact = True
        out_e, cls_e = att(x, valid)
    torch.testing.assert_close(out_n[valid], out_e[valid], rtol=0, atol=1e-8)
    torch.testing.assert_close(cls_n, cls_e, rtol=0, atol=1e-8)
    assert cls_e[1, 35:].abs().max() == 0 and cls_e[valid].min() > 0
    torch.testing.assert_close(cls_e.sum(1), torch.ones(2, dtype=torch.float64))


def test_nystrom_error_shrinks_with_more_landmarks():
    torch.manual_seed(0)
    att = NystromAttention(16, heads=4, residual_kernel=0, pinv_iterations=20).double().eval()
    x = _coherent_bag(1000)
    valid = torch.ones(1, 1000, dtype=torch.bool)
    with torch.no_grad():
        att.exact = True
        ref, cls_ref = att(x, valid)
        att.exact = False
        err = {}
        for m in (16, 32, 64, 128):
            att.landmarks = m
            out, _ = att(x, valid)
            err[m] = float((out - ref).norm() / ref.norm())
        assert err[16] > err[32] > err[64] > err[128]
        assert err[128] < 1e-3
        # float32 and the default 6 pseudo-inverse iterations (what training uses): ~1 %
        att32 = NystromAttention(16, heads=4, residual_kernel=0, landmarks=64).eval()
        att32.load_state_dict({k: v.float() for k, v in att.state_dict().items()})
        out, cls = att32(x.float(), valid)
        assert float((out - ref.float()).norm() / ref.float().norm()) < 0.03
        assert float((cls - cls_ref.float()).norm() / cls_ref.float().norm()) < 0.1


@pytest.mark.parametrize("attention", ["nystrom", "exact"])
def test_transmil_padding_and_batch_neighbours_do_not_change_a_bag(attention):
    torch.manual_seed(0)
    net = TransMIL(in_dim=12, dim=16, attention=attention, landmarks=4).eval()
    x = torch.randn(1, 30, 12)
    with torch.no_grad():
        z1, a1 = net(x, torch.ones(1, 30, dtype=torch.bool))
        other = 5 * torch.randn(1, 57, 12)
        xp = torch.cat([torch.cat([x, 100 * torch.randn(1, 27, 12)], 1), other])
        mask = torch.ones(2, 57, dtype=torch.bool)
        mask[0, 30:] = False
        z2, a2 = net(xp, mask)
    torch.testing.assert_close(z2[:1], z1, rtol=0, atol=1e-5)
    torch.testing.assert_close(a2[:1, :30], a1, rtol=0, atol=1e-6)
    assert a2[0, 30:].abs().max() == 0 and (a2 >= 0).all()
    torch.testing.assert_close(a2.sum(1), torch.ones(2))


def test_transmil_trains_on_a_padded_batch():
    torch.manual_seed(0)
    net = TransMIL(in_dim=8, dim=16, landmarks=8)
    x = torch.randn(3, 40, 8)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 25:] = False
    mask[2, :] = False                             # a patient without tiles
    z, a = net(x, mask)
    (z.sum() + a.sum()).backward()
    assert torch.equal(z[2], torch.zeros(16)) and torch.equal(a[2], torch.zeros(40))
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    net.attention = "exact"
    assert net.layer1.attn.exact and net.layer2.attn.exact


_MEM_SCRIPT = textwrap.dedent("""
    import json, torch
    from netsurv.models.mil import TransMIL

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = TransMIL(in_dim=64, dim=64, heads=4, landmarks=64).eval()
    out = {}
    with torch.no_grad():
        net(torch.randn(1, 300, 64), torch.ones(1, 300, dtype=torch.bool))   # warm-up
        for n in (5000, 20000):
            x = torch.randn(1, n, 64)
            mask = torch.ones(1, n, dtype=torch.bool)
            base = status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            z, a = net(x, mask)
            out[n] = status("VmHWM") - base
            assert torch.isfinite(z).all() and abs(float(a.sum()) - 1) < 1e-4
    print(json.dumps(out))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_transmil_forward_of_a_20k_tile_bag_takes_linear_memory():
    res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    g = {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}
    exact_matrix = 20001 ** 2 * 4 * 4               # one layer's attention, 4 heads, float32
    assert g[20000] < 1.0e9 < exact_matrix          # 6.4 GB for exact attention
    assert g[20000] / g[5000] < 6                   # 4x the tiles: quadratic would be 16x
