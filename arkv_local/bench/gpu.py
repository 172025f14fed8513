"""The CUDA device check, prepared here and run in one call on a lent GPU machine.

`python -m arkv_local.bench.gpu kit` (on the CPU machine, after `make install`) fills `.gpu/`:
the patched llama.cpp tree trimmed to what a CUDA build of our libraries needs (a few MB), the
pure-Python packages the device image lacks (llama_cpp, gguf, diskcache), a dist-info for
arkv_local, and `run.sh`. `kit --prebuild` also builds the CUDA libraries here (nvcc, cuBLAS's
headers from the nvidia-cublas wheel; about 25 minutes on 2 cores the first time, incremental
after) into .gpu/lib (about 45 MB), stamped with a digest of the native sources. Carry `.gpu`
and run `bash .gpu/run.sh [SECTION...]` there: it takes .gpu/lib when its stamp matches the
checkout's sources, else builds for sm_90 into build/cuda (16 cores, about 4 minutes; kept
between calls while the machine is warm), then runs the sections (env sched exact plan bench
decode profile reference; default all but profile), each a separate command that prints its
result and writes $OUT/gpu_<section>.json, so a call cut short by the time limit resumes with
the sections left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / ".gpu"
PACKAGES = ("llama_cpp", "gguf", "diskcache")
SECTIONS = ("env", "sched", "exact", "plan", "bench", "decode", "profile", "reference")
# of vendor/llama.cpp, what a build of the libraries reads (no other backend, tool or model)
TREE = ("CMakeLists.txt", "LICENSE", "cmake", "include", "src", "vendor", "licenses",
        ".arkv-stamp.json", "ggml")
BACKENDS_KEPT = ("ggml-cpu", "ggml-cuda", "ggml-blas")

# Llama-3-8B's attention (32 layers, 32 heads, 8 KV heads x 128) with a small FFN and vocabulary:
# the KV cache, which this project is about, has the real model's size
BENCH_MODEL = dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=1024,
                   n_ctx_train=65536, dtype="f16")
# tiny shapes of the checks: K/V rows of 128 (Llama) and 192 (SmolLM2's 3 x 64) values, which
# ggml-cuda pads (ne0 % 512 != 0), and Qwen3 (its own K/Q norms)
TINY = {
    "llama-128": ("llama", dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512)),
    "llama-192": ("llama", dict(n_layer=2, n_embd=576, n_head=9, n_head_kv=3, n_ff=512)),
    "qwen3-128": ("qwen3", dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512)),
}
RUN_SH = Path(__file__).with_name("gpu_run.sh")  # becomes .gpu/run.sh
CUBLAS_WHEEL = "nvidia-cublas==13.0.*"  # the cuBLAS of CUDA 13.0, as on the device


# -- the kit (CPU machine) --------------------------------------------------------------------


def _trim(t: Any) -> Any:
    """Leave out other backends' sources and caches."""
    parts = Path(t.name).parts
    if "__pycache__" in parts:
        return None
    if len(parts) > 3 and parts[1:3] == ("ggml", "src") and parts[3].startswith("ggml-") \
            and "." not in parts[3] and parts[3] not in BACKENDS_KEPT:
        return None
    return t


def prebuild() -> int:
    """The CUDA libraries built here into .gpu/lib (run.sh's `prebuild`), cuBLAS's headers and
    link libraries from the nvidia-cublas wheel where no CUDA toolkit has them."""
    if not shutil.which("nvcc"):
        print("kit --prebuild needs nvcc (CUDA 13.0) on the PATH; without it, run.sh builds on "
              "the device", file=sys.stderr)
        return 2
    cublas = ROOT / "build" / "cublas"
    if not Path("/usr/local/cuda/include/cublas_v2.h").is_file() and not cublas.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(cublas),
                        CUBLAS_WHEEL], check=True)
    env = dict(os.environ, PYTHON=sys.executable,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(RUN_SH), "prebuild"], cwd=ROOT, env=env).returncode


def make_kit(prebuilt: bool) -> int:
    """Fill .gpu/ from vendor/llama.cpp and the venv (and the CUDA libraries built here when
    asked); print its size."""
    import importlib.util
    import tarfile
    from importlib.metadata import version

    tree = ROOT / "vendor" / "llama.cpp"
    if not (tree / ".arkv-stamp.json").is_file():
        print(f"{tree} is not prepared: run `make install` first", file=sys.stderr)
        return 2
    shutil.rmtree(KIT, ignore_errors=True)
    KIT.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.o")
    with tarfile.open(KIT / "llama.cpp.tar.gz", "w:gz") as tar:
        for item in TREE:
            if (tree / item).exists():
                tar.add(tree / item, f"llama.cpp/{item}", filter=_trim)
    site = KIT / "site"
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        assert spec and spec.origin, pkg
        shutil.copytree(Path(spec.origin).parent, site / pkg, ignore=skip)
    info = site / f"arkv_local-{version('arkv_local')}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: arkv_local\n"
                                   f"Version: {version('arkv_local')}\n")
    shutil.copy2(RUN_SH, KIT / "run.sh")
    if prebuilt and prebuild() != 0:
        return 1
    size = sum(f.stat().st_size for f in KIT.rglob("*") if f.is_file())
    print(f"{KIT}: {size / 2**20:.1f} MiB (a call carries at most 64 MiB with the checkout)")
    return 0


# -- the sections (device machine) ------------------------------------------------------------


def tiny(name: str) -> str:
    from ..tiny_models import tiny_model_path

    arch, kw = TINY[name]
    return str(tiny_model_path(arch, **kw))


def section_env() -> dict[str, Any]:
    """The card, the driver and whether our library offloads."""
    import llama_cpp

    from .. import arkv_cpp

    smi = nvidia_smi("--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
    return dict(gpu=smi, lib=str(arkv_cpp.LIB_DIR),
                offload=bool(llama_cpp.llama_supports_gpu_offload()),
                version=arkv_cpp.llama_arkv_version().decode())


def open_pair(path: str, budget_tokens: int, fa: bool, ngl: int = 99, **mem: Any):
    """A stock llama_cpp.Llama and one over the tri-state memory, same settings."""
    import llama_cpp

    from ..memory import MemoryParams, open_llama
    from ..models import f16_slot_bytes

    verbose = os.environ.get("ARKV_GPU_VERBOSE") == "1"  # GGML_SCHED_DEBUG prints through the log
    ctx = dict(n_ctx=1024, n_batch=512, n_ubatch=512, logits_all=True, verbose=verbose,
               flash_attn=fa, n_gpu_layers=ngl)
    stock = llama_cpp.Llama(path, **ctx)
    params = MemoryParams(budget_tokens * f16_slot_bytes(path), rotate=False, **mem)
    return stock, open_llama(path, params, **ctx)


def tokens_for(llm: Any, n: int, seed: int = 0) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, llm.n_vocab(), n).tolist()


def section_exact() -> list[dict[str, Any]]:
    """Nothing evicted: logits of the tri-state memory against the stock CUDA cache."""
    import numpy as np

    rows = []
    for name in TINY:
        for fa in (False, True):
            stock, ours = open_pair(tiny(name), 512, fa)
            toks = tokens_for(stock, 300)
            for llm in (stock, ours):
                llm.eval(toks[:292])
                for t in toks[292:]:
                    llm.eval([t])
            a, b = stock.scores[:300], ours.scores[:300]
            diff = float(np.abs(a - b).max())
            rows.append(dict(model=name, flash_attn=fa, max_abs_diff=diff, exact=diff == 0.0))
    return rows


def per_head_plan(mem: Any, rng: Any, n_o: int, n_q: int, cap_o: int) -> list[Any]:
    """Per KV head, random O rows kept and others quantized (the rest evicted)."""
    import numpy as np

    from ..memory import LayerPlan

    plan = []
    for info in mem.layers():
        o_src = np.empty((n_o, mem.n_head_kv), np.int32)
        q_src = np.empty((n_q, mem.n_head_kv), np.int32)
        for h in range(mem.n_head_kv):
            slots = rng.permutation(info.n_o)[:n_o + n_q]
            o_src[:, h], q_src[:, h] = np.sort(slots[:n_o]), slots[n_o:]
        plan.append(LayerPlan(cap_o, o_src, q_src, np.ones_like(q_src, bool)))
    return plan


def plan_logits(path: str, ngl: int, fa: bool, attn: str) -> Any:
    """Prefill 300 tokens, a per-head quantizing plan, 8 decoded tokens: their logits."""
    import numpy as np

    from ..memory import TriStateKV

    _, llm = open_pair(path, 512, fa, ngl, attn=attn)
    mem = TriStateKV(llm.ctx)
    toks = tokens_for(llm, 308)
    llm.eval(toks[:300])
    mem.submit(per_head_plan(mem, np.random.default_rng(1), 60, 180, 128))
    for t in toks[300:]:
        llm.eval([t])
    return np.array(llm.scores[300:308], np.float64)


def section_plan() -> list[dict[str, Any]]:
    """A per-head quantizing plan decoded on the GPU (auto: the fused kernels of
    ggml-cuda-arkv.cu; segments; dequant) against the same plan on the CPU backend."""
    import numpy as np

    rows = []
    for name in TINY:
        for fa in (False, True):
            cpu = plan_logits(tiny(name), 0, fa, "auto")
            for attn in ("auto", "segments", "dequant"):
                t0 = time.perf_counter()
                gpu = plan_logits(tiny(name), 99, fa, attn)
                rows.append(dict(model=name, flash_attn=fa, attn=attn,
                                 max_abs_diff_vs_cpu=float(np.abs(gpu - cpu).max()),
                                 finite=bool(np.isfinite(gpu).all()),
                                 seconds=round(time.perf_counter() - t0, 2)))
    return rows


SCHED_CASES = {
    # a decode after a per-head quantizing plan (no spill): the attention's nodes
    "decode": "plan_logits(tiny('llama-192'), 99, True, 'auto')",
    # a prompt 7x the budget: plans that spill to host memory and bring rows back, a recall pass
    # over the spilled rows, then decoding: what each graph copies between host and device
    "spill": "spill_read(tiny('llama-192'))",
}


def spill_read(path: str) -> None:
    """arkv at a budget of 128 tokens reads 900 (plans move rows to and from the spill; the
    prompt ends with a recall pass), then decodes 8 tokens."""
    from .. import Llama

    llm = Llama(path, kv_policy="arkv", kv_budget=128, n_ctx=1024, n_gpu_layers=99,
                flash_attn=True, verbose=os.environ.get("ARKV_GPU_VERBOSE") == "1")
    toks = tokens_for(llm, 908)
    llm.eval(toks[:900])
    for t in toks[900:]:
        llm.eval([t])
    assert llm.kv_stats().n_recalls == 1, "the prompt was to end with a recall pass"
    llm.close()


def _mib(size: str) -> float:
    """fmt_size's "12M" / "340K" as MiB."""
    return float(size[:-1]) / (1 if size.endswith("M") else 1024)


def sched_summary(log: str) -> dict[str, Any]:
    """GGML_SCHED_DEBUG=2's assignments: nodes, the fused attention's nodes on CUDA, nodes off
    CUDA by op (with example names), and the splits' inputs (what the scheduler copies to the
    split's backend before it runs) in MiB per backend, summed over every graph computed."""
    off: dict[str, list[str]] = {}  # "OP on BACKEND" -> node names
    copied: dict[str, float] = {}
    n_nodes = n_custom = n_splits = 0
    for line in log.splitlines():
        if line.startswith("## SPLIT #"):
            n_splits += 1
            backend = line.split(": ", 1)[1].split(" #", 1)[0]
            sizes = [part.rsplit("(", 1)[1].split(")")[0].strip()
                     for part in line.split("[")[1:]]
            copied[backend] = copied.get(backend, 0.0) + sum(_mib(x) for x in sizes if x)
        if not line.startswith("node #"):
            continue
        n_nodes += 1
        op = line.split("(", 1)[1].split(")", 1)[0].strip()
        backend = line.split("[", 1)[1].split()[0]
        n_custom += op == "CUSTOM" and backend.startswith("CUDA")  # the fused attention's kernels
        if not backend.startswith("CUDA"):
            name = line.split(":", 1)[1].split("(")[0].strip()
            off.setdefault(f"{op} on {backend}", []).append(name)
    return dict(nodes=n_nodes, splits=n_splits, custom_on_cuda=n_custom,
                inputs_mib={k: round(v, 1) for k, v in copied.items()},
                not_on_cuda={k: f"{len(v)} nodes, e.g. {', '.join(sorted(set(v))[:4])}"
                             for k, v in off.items()})


def section_sched(out: Path) -> dict[str, Any]:
    """GGML_SCHED_DEBUG=2 over each of SCHED_CASES: where the nodes ran, what crossed."""
    env = dict(os.environ, GGML_SCHED_DEBUG="2", ARKV_GPU_VERBOSE="1")
    res = {}
    for case, call in SCHED_CASES.items():
        code = f"from arkv_local.bench.gpu import plan_logits, spill_read, tiny; {call}"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        (out / f"gpu_sched_{case}.log").write_text(r.stderr[-4_000_000:])
        res[case] = dict(rc=r.returncode, **sched_summary(r.stderr))
    return res


def section_reference() -> dict[str, Any]:
    """tests/test_reference.py (the numpy reference), tests/test_spill.py's memory checks
    (spill and recall against a cache that never spilled), tests/test_shift.py (seq_add and
    seq_rm of a middle range: K re-roped and rows removed on the device) and the tailored tail's
    cut (tests/test_tristate.py) with every layer offloaded."""
    env = dict(os.environ, ARKV_TEST_N_GPU_LAYERS="99")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_reference.py", "tests/test_spill.py", "tests/test_shift.py",
                        "tests/test_tristate.py::test_a_tailored_tail_is_cut_where_heads_lose_alike",
                        "--timeout=300",
                        "-k", "not smollm2 and not pass_keys and not errors"  # no hub model:
                        " and not spill_holds_the_window"],  # its smollm2 fixture neither
                       env=env, capture_output=True, text=True, cwd=ROOT)
    return dict(rc=r.returncode, tail=r.stdout[-3000:])


def nvidia_smi(*args: str) -> str:
    """nvidia-smi's output, or "" where there is none (a dry run on the CPU machine)."""
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        return ""


def vram_mib() -> int:
    """GPU memory this process holds (nvidia-smi)."""
    q = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    for line in q.splitlines():
        pid, mem = (x.strip() for x in line.split(","))
        if int(pid) == os.getpid():
            return int(mem)
    return -1


def bench_one(spec: str) -> int:
    """One benchmark configuration in its own process: prefill and decode tok/s, VRAM."""
    from .child import open_config
    from .speed import timed

    cfg = json.loads(spec)
    depth, n_gen = cfg["depth"], cfg["n_gen"]
    llm = open_config(cfg, cfg["model"], depth + n_gen + 256,
                      int(cfg.get("fraction", 1.0) * depth), n_batch=2048, n_ubatch=512)
    prefill, decode = timed(llm, depth, n_gen)
    res = dict(name=cfg["name"], depth=depth, prefill=round(prefill, 1), decode=round(decode, 2),
               vram_mib=vram_mib())
    if cfg["kind"] not in ("f16", "llama_q4_0"):
        st = llm.kv_stats()
        res.update(kv_mib=round(st.bytes_used / 2**20, 1),
                   budget_mib=round(st.bytes_budget / 2**20, 1),
                   tailorings=st.n_tailorings, tailoring_s=round(st.tailoring_seconds, 2))
    print(json.dumps(res), flush=True)
    return 0


def bench_model() -> str:
    """The bench model's file (generated once); ARKV_GPU_DRY_RUN=1: a 2-layer one of the same
    head shape, to try the sections on the CPU machine."""
    from ..tiny_models import tiny_model_path

    dry = dict(n_layer=2, n_embd=1024, n_head=8, n_head_kv=2)  # head_dim 128, as the real one
    shape = dict(BENCH_MODEL, **dry) if os.environ.get("ARKV_GPU_DRY_RUN") else BENCH_MODEL
    return str(tiny_model_path("llama", **shape))


def section_bench(depths: list[int], n_gen: int) -> list[dict[str, Any]]:
    """Llama-3-8B-shaped attention: f16 cache, llama.cpp's q4_0, quant@25%, arkv@25%."""
    t0 = time.perf_counter()
    model = bench_model()
    print(f"bench model ready in {time.perf_counter() - t0:.0f} s", flush=True)
    configs = [("f16", "f16", None), ("q4_0", "llama_q4_0", None), ("quant@25%", "quant", 0.25),
               ("arkv@25%", "arkv", 0.25)]
    rows = []
    for depth in depths:
        for name, kind, frac in configs:
            cfg = dict(name=name, kind=kind, model=model, depth=depth, n_gen=n_gen,
                       n_gpu_layers=99, threads=8)
            if frac:
                cfg["fraction"] = frac
            r = subprocess.run([sys.executable, "-m", "arkv_local.bench.gpu", "_one",
                                json.dumps(cfg)], capture_output=True, text=True)
            try:
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            except (IndexError, json.JSONDecodeError):
                rows.append(dict(name=name, depth=depth, error=r.stderr[-600:]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


DECODE_CACHES = [("full", ""), ("q4_0", ""), ("quant", "auto"), ("arkv", "auto"),
                 ("quant", "segments"), ("arkv", "segments"),
                 ("quant", "dequant"), ("arkv", "dequant")]
PROFILE_CACHES = [("full", ""), ("q4_0", ""), ("quant", "auto"), ("quant", "segments"),
                  ("arkv", "auto"), ("arkv", "segments")]


def timed_phases(llm: Any) -> dict[str, float]:
    """Seconds a Llama under a policy spends, from now on, in its policy's plans (Python) and in
    applying them (the graphs that move rows); the rest of a read is llama.cpp's graphs (the
    recall pass's included). The counters are filled in as it runs."""
    import functools

    spent = {"plan_py_s": 0.0, "apply_s": 0.0}
    tailor = llm._tailor
    if tailor is None:
        return spent

    def timer(fn: Any, key: str) -> Any:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t0
        return run

    policy = tailor.policy
    policy.plan = timer(policy.plan, "plan_py_s")  # instance attributes: this object only
    policy.drop_plan = timer(policy.drop_plan, "plan_py_s")
    tailor.kv.apply = timer(tailor.kv.apply, "apply_s")
    return spent


def read_prompt(llm: Any, toks: list[int], profile: bool) -> dict[str, Any]:
    """Read a prompt and say where its time went: the policy's plans, applying them, the recall
    pass, llama.cpp's graphs; with `profile`, also the device's kernels and copies."""
    spent = timed_phases(llm)
    n_plans = llm.kv_stats().n_tailorings if llm._tailor else 0
    prof = _profiler() if profile else None
    if prof:
        prof.__enter__()
    t0 = time.perf_counter()
    llm.eval(toks)
    dt = time.perf_counter() - t0
    if prof:
        prof.__exit__(None, None, None)
    row: dict[str, Any] = dict(prefill=round(len(toks) / dt, 1), prefill_s=round(dt, 3))
    if llm._tailor:
        st = llm.kv_stats()
        row.update(plans=st.n_tailorings - n_plans, recalls=st.n_recalls,
                   recall_s=round(st.recall_seconds, 3),
                   **{k: round(v, 3) for k, v in spent.items()},
                   graphs_s=round(dt - sum(spent.values()), 3))
    if prof:
        row["device"] = device_profile(prof, 1)
    return row


def section_decode(depth: int, n_gen: int, caches: list[tuple[str, str]] = DECODE_CACHES,
                   profile: bool = False) -> list[dict[str, Any]]:
    """Steady-state decode tok/s on the bench model (no plan during the timing): the f16 and
    q4_0 caches, and quant/arkv at 25% through the fused kernels (auto), the segments and the
    dequant paths; and where the prompt's time went (read_prompt). With `profile`, the prompt
    (of the first row of each policy) and the timed tokens run under PyTorch's profiler (CUPTI
    sees every kernel of the process, ggml's too): where a token's device time goes."""
    import functools

    from .. import llama as arkv_llama
    from ..memory import MemoryParams
    from .speed import bench_text_tokens

    model = bench_model()
    rows = []
    profiled = set()
    for policy, attn in caches:
        common: dict[str, Any] = dict(n_ctx=depth + 512, n_gpu_layers=99, flash_attn=True,
                                      n_batch=2048, verbose=False)
        if policy == "q4_0":
            common.update(type_k=2, type_v=2)
        elif policy != "full":
            common.update(kv_policy=policy, kv_budget=depth // 4)
        arkv_llama.MemoryParams = functools.partial(MemoryParams, attn=attn or "auto")
        llm = arkv_llama.Llama(model, **common)
        toks = bench_text_tokens(llm, depth + n_gen + 8)
        # the prompt path does not depend on attn: one profile of it per policy
        read = read_prompt(llm, toks[:depth], profile and policy not in profiled)
        profiled.add(policy)
        for t in toks[depth:depth + 8]:
            llm.eval([t])  # warm-up: the decode graph is built
        n_plans = llm.kv_stats().n_tailorings
        prof = _profiler() if profile else None
        t0 = time.perf_counter()
        if prof:
            prof.__enter__()
        for t in toks[depth + 8:]:
            llm.eval([t])
        if prof:
            prof.__exit__(None, None, None)
        dt = time.perf_counter() - t0
        rows.append(dict(cache=f"{policy} {attn}".strip(), depth=depth, decode=round(n_gen / dt, 1),
                         ms_per_token=round(1000 * dt / n_gen, 2),
                         plans_during=llm.kv_stats().n_tailorings - n_plans))
        if prof:
            rows[-1]["device"] = device_profile(prof, n_gen)
        rows[-1]["prompt"] = read
        print(json.dumps(rows[-1]), flush=True)
        llm.close()
    arkv_llama.MemoryParams = MemoryParams
    return rows


def _profiler() -> Any:
    """PyTorch's profiler over the CUDA activity (kernels, memcpys) and the host's CUDA calls."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


def device_profile(prof: Any, n: int, top: int = 12) -> dict[str, Any]:
    """A profile per unit of n (decoded tokens, or 1 prompt): device ms (kernels and copies),
    of it the copies (Memcpy/Memset), kernels, launches and graph launches (CUDA graphs in use
    or not), and the kernels and copies that take the most device time."""
    kernels, host = [], {}
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0)
        if str(getattr(e, "device_type", "")).endswith("CUDA") and dev_us > 0:
            kernels.append((dev_us, e.count, e.key))
        elif e.key.startswith(("cuda", "cu")):
            host[e.key] = e.count
    kernels.sort(reverse=True)

    def calls(*names: str) -> float:  # the runtime's and the driver's names, any version suffix
        return sum(c for k, c in host.items() if k.startswith(names)) / n

    copies = [k for k in kernels if k[2].startswith(("Memcpy", "Memset"))]
    return dict(ms=round(sum(k[0] for k in kernels) / 1000 / n, 3),
                copies_ms=round(sum(k[0] for k in copies) / 1000 / n, 3),
                kernels=round(sum(k[1] for k in kernels) / n, 1),
                launches=round(calls("cudaLaunchKernel", "cuLaunchKernel"), 1),
                graph_launches=round(calls("cudaGraphLaunch", "cuGraphLaunch"), 2),
                top=[dict(kernel=name[:90], calls=round(c / n, 1), us=round(us / n, 1))
                     for us, c, name in kernels[:top]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m arkv_local.bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=("kit", "_one", *SECTIONS))
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--depths", type=int, nargs="+",
                   help="bench and decode: 8192 32768; profile: 32768")
    p.add_argument("--n-gen", type=int, default=32)
    p.add_argument("--prebuild", action="store_true",
                   help="kit: also build the CUDA libraries here (nvcc), into .gpu/lib")
    args = p.parse_args(argv)
    if args.section == "kit":
        return make_kit(args.prebuild)
    if args.section == "_one":
        return bench_one(args.spec)
    if args.section == "profile":
        import torch  # noqa: F401  (first: its cuBLAS, loaded by path, then serves ggml-cuda too)
    import arkv_local  # noqa: F401  (binds llama_cpp to our library)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: Any
    if args.section == "env":
        result = section_env()
    elif args.section == "sched":
        result = section_sched(out)
    elif args.section == "exact":
        result = section_exact()
    elif args.section == "plan":
        result = section_plan()
    elif args.section == "reference":
        result = section_reference()
    elif args.section == "decode":
        result = [r for d in args.depths or [8192, 32768] for r in section_decode(d, args.n_gen)]
    elif args.section == "profile":
        result = [r for d in args.depths or [32768]
                  for r in section_decode(d, args.n_gen, PROFILE_CACHES, profile=True)]
    else:
        result = section_bench(args.depths or [8192, 32768], args.n_gen)
    (out / f"gpu_{args.section}.json").write_text(json.dumps(result, indent=1))
    print(f"== {args.section} ({time.perf_counter() - t0:.0f} s)")
    print(json.dumps(result, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
