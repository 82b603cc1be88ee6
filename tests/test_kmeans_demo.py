"""The k-means demo (nearest_code over image patches) and the `fastvq` command."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvq.cli import main
from fastvq.pipeline.kmeans_demo import from_patches, kmeans, run_demo, to_patches
from fastvq.pipeline.metrics import psnr

REPO = Path(__file__).resolve().parent.parent


def test_patches_round_trip():
    img = torch.rand(10, 13, 3)
    x, grid = to_patches(img, 4)
    assert x.shape == (2 * 3, 48) and grid == (2, 3)
    assert torch.equal(from_patches(x, grid, 4), img[:8, :12])


def test_kmeans_reseeds_empty_codes_and_never_gets_worse():
    # 8 distinct points, 40 copies each: the random initial codebook repeats some of them, and a
    # repeated code gets no vector (ties go to the lower index); only re-seeding reaches all 8.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 5, generator=g) * 10).repeat(40, 1)
    logged = []
    codebook, idx, dist = kmeans(x, 8, 10, backend="torch", log=logged.append)
    assert len(logged) == 10
    assert int(logged[0].split("codes used")[1].split("/")[0]) < 8
    means = [float(line.split("mean distance")[1].split()[0]) for line in logged]
    assert all(b <= a * (1 + 1e-4) + 1e-6 for a, b in zip(means, means[1:]))
    assert dist.max() < 1e-3 and idx.unique().numel() == 8


def test_demo_quick_writes_png_with_sane_psnr(tmp_path):
    logged = []
    result = run_demo(tmp_path, quick=True, log=logged.append)
    png = tmp_path / "quantize_demo.png"
    assert result["png"] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["psnr"] > 20, result["psnr_per_image"]
    assert result["codes_used"] > 32
    assert any(line.startswith("iter   1") for line in logged)
    assert "torch_reference_vectors_per_s" in result["throughput"]


def test_demo_bad_arguments_are_one_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["kmeans", "--codes", "0", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--codes" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        main(["kmeans", "--quick", "--codes", "100000", "--out", str(tmp_path)])
    assert "must not exceed the number of patches" in capsys.readouterr().err
    assert not (tmp_path / "quantize_demo.png").exists()


def test_python_m_fastvq_backends():
    out = subprocess.run([sys.executable, "-m", "fastvq", "backends"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert names == ["torch", "cpp", "triton"]


def test_psnr_is_the_same_in_either_value_range():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    mse = (a - b).double().pow(2).mean().item()
    assert psnr(a, b) == pytest.approx(-10 * math.log10(mse))
    assert psnr(a * 2 - 1, b * 2 - 1, value_range=(-1, 1)) == pytest.approx(psnr(a, b))
    assert psnr(a + 5, a) == pytest.approx(psnr(torch.ones_like(a), a))  # clamped into the range first
    assert psnr(a, a) == math.inf
    with pytest.raises(ValueError, match="value_range"):
        psnr(a, b, value_range=(1, 1))
