"""The device check's kit (arkv_local/bench/gpu.py), the parts that run without a GPU: the stamp
that tells run.sh whether prebuilt libraries are of the checkout's sources, and the profile's
per-token arithmetic."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

from arkv_local.bench.gpu import RUN_SH, device_profile, read_prompt, sched_summary

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
    """A row of torch.profiler's key_averages(), as device_profile reads it."""
    return SimpleNamespace(key=key, count=count, self_device_time_total=device_us,
                           device_type=f"DeviceType.{device}")


def test_profile_numbers_are_per_unit() -> None:
    prof = SimpleNamespace(key_averages=lambda: [
        event("mul_mat_vec_q<4>", 64, 6400.0, "CUDA"),
        event("flash_attn_ext_vec<128>", 128, 12800.0, "CUDA"),
        event("Memcpy HtoD (Pinned -> Device)", 8, 800.0, "CUDA"),
        event("k_sum_rows_f32", 32, 0.0, "CUDA"),        # took no device time: left out
        event("cudaLaunchKernel", 200), event("cuLaunchKernel_v2", 40),
        event("cudaGraphLaunch_v10000", 4), event("aten::empty", 9),
    ])
    got = device_profile(prof, n=4, top=2)
    assert got == dict(ms=5.0, copies_ms=0.2, kernels=50.0, launches=60.0, graph_launches=1.0,
                       top=[dict(kernel="flash_attn_ext_vec<128>", calls=32.0, us=3200.0),
                            dict(kernel="mul_mat_vec_q<4>", calls=16.0, us=1600.0)])


def test_a_prompt_read_says_where_its_time_went() -> None:
    from arkv_local import Llama
    from arkv_local.tiny_models import tiny_model_path

    model = str(tiny_model_path("llama", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=128))
    toks = [10 + i % 200 for i in range(1200)]
    llm = Llama(model, kv_policy="arkv", kv_budget=256, n_ctx=1536, verbose=False)
    row = read_prompt(llm, toks, profile=False)
    st = llm.kv_stats()
    assert row["plans"] == st.n_tailorings > 3 and row["recalls"] == st.n_recalls == 1
    assert row["plan_py_s"] > 0 and row["apply_s"] > 0 and row["graphs_s"] > 0
    parts = row["plan_py_s"] + row["apply_s"] + row["graphs_s"]
    assert abs(parts - row["prefill_s"]) < 0.003 and row["recall_s"] < row["prefill_s"]
    # the timers count this object's calls only, and from now on
    assert read_prompt(llm, [5], profile=False)["plans"] == 0
    llm.close()
    full = Llama(model, n_ctx=1536, verbose=False)
    assert set(read_prompt(full, toks, profile=False)) == {"prefill", "prefill_s"}
    full.close()


def test_the_schedulers_log_is_summed_by_backend() -> None:
    # GGML_SCHED_DEBUG=2's lines (ggml_backend_sched_print_assignments), two graphs
    log = "\n".join([
        "## SPLIT #0: CUDA0 # 2 inputs: [arkv_k_s_l0 (  12M)] [node_(view) (  512K)] ",
        "node #  0 (  GET_ROWS):      arkv_stage_k_l0 (   2K) [CUDA0         ] use=1,c=1:   x",
        "node #  1 (    CUSTOM):            kqv_out-0 (   2K) [CUDA0         ] use=1,c=1:   x",
        "## SPLIT #1: CPU # 1 inputs: [arkv_stage_k_l0 (   1M)] ",
        "node #  2 (  SET_ROWS):          arkv_k_s_l0 (   2K) [  CPU         ] use=1,c=1:   x",
        "some other log line",
        "## SPLIT #0: CUDA0 # 0 inputs",
        "node #  0 (  SET_ROWS):          arkv_k_s_l1 (   2K) [  CPU         ] use=1,c=1:   x",
        "node #  1 (    CUSTOM):            kqv_out-1 (   2K) [CUDA0         ] use=1,c=1:   x",
    ])
    assert sched_summary(log) == dict(
        nodes=5, splits=3, custom_on_cuda=2, inputs_mib={"CUDA0": 12.5, "CPU": 1.0},
        not_on_cuda={"SET_ROWS on CPU": "2 nodes, e.g. arkv_k_s_l0, arkv_k_s_l1"})
