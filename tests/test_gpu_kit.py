"""The device check's kit (arkv_local/bench/gpu.py), the parts that run without a GPU: the stamp
that tells run.sh whether prebuilt libraries are of the checkout's sources, and the profile's
per-token arithmetic."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

from arkv_local.bench.gpu import RUN_SH, per_token

ROOT = Path(__file__).resolve().parent.parent


def stamp(tree: Path) -> str:
    """run.sh's digest of the native sources under tree."""
    p = subprocess.run(["bash", str(RUN_SH), "stamp"], cwd=tree, capture_output=True, text=True,
                       check=True)
    return p.stdout.strip()


def test_the_stamp_follows_every_native_source(tmp_path: Path) -> None:
    # a copy of what the libraries are built from: CMake, the pin, the patches, our C++
    for item in ("CMakeLists.txt", "vendor/pin.json", "patches", "arkv_local/csrc"):
        src, dst = ROOT / item, tmp_path / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    first = stamp(tmp_path)
    assert len(first) == 16 and first == stamp(tmp_path)
    assert first == stamp(ROOT)  # the same sources, wherever they lie
    seen = {first}
    for edit in ("arkv_local/csrc/llama-arkv-graph.cpp", "patches/0001-arkv-memory-hooks.patch",
                 "CMakeLists.txt"):
        with open(tmp_path / edit, "a") as f:
            f.write("\n")
        seen.add(stamp(tmp_path))
    (tmp_path / "arkv_local/csrc/llama-arkv-new.cpp").write_text("// a new source file\n")
    seen.add(stamp(tmp_path))
    assert len(seen) == 5


def event(key: str, count: int, device_us: float = 0.0, device: str = "CPU") -> SimpleNamespace:
    """A row of torch.profiler's key_averages(), as per_token reads it."""
    return SimpleNamespace(key=key, count=count, self_device_time_total=device_us,
                           device_type=f"DeviceType.{device}")


def test_profile_numbers_are_per_token() -> None:
    prof = SimpleNamespace(key_averages=lambda: [
        event("mul_mat_vec_q<4>", 64, 6400.0, "CUDA"),
        event("flash_attn_ext_vec<128>", 128, 12800.0, "CUDA"),
        event("k_sum_rows_f32", 32, 0.0, "CUDA"),        # took no device time: left out
        event("cudaLaunchKernel", 200), event("cuLaunchKernel_v2", 40),
        event("cudaGraphLaunch_v10000", 4), event("aten::empty", 9),
    ])
    got = per_token(prof, n_gen=4, top=1)
    assert got == dict(device_ms_per_token=4.8, kernels_per_token=48.0, launches_per_token=60.0,
                       graph_launches_per_token=1.0,
                       top=[dict(kernel="flash_attn_ext_vec<128>", per_token=32.0,
                                 us_per_token=3200.0)])
