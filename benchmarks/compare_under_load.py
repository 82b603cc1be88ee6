"""fastvq and its anchors on a busy machine: each case quiet, then beside 1 and 2 busy-loop processes.

  sampling          fastvq.sample_with_past on fastvq.GPT.from_mingpt(taming's minGPT) against
                    taming's sample_with_past: vocab 1024, 8 layers, 8 heads, width 512, 128 new
                    tokens after a 1-token prefix, batch 1 (compare_sampling.py's model)
  window_attention  fastvq.sliding_window_attention (cpp) forward + backward against SDPA with the
                    dense boolean window mask, B=1 H=8 T=1024 W=128 Dh=64 fp32
  vqgan_step        one VQGAN training step (encoder, quantizer, decoder, L1 + codebook loss,
                    backward): fastvq.VQGAN against the same network (taming's architecture, the
                    same encoder and decoder weights) with taming's VectorQuantizer2 in place of fastvq's
                    quantizer, batch 4 of 64x64 images, a small encoder and
                    decoder (ch 64, ch_mult 1 1 2) and the codebook of taming's ImageNet VQGAN
                    (16384 codes of dimension 256)

"Busy" processes are `python -c "while True: pass"` started by the worker just before the warm-up
and killed after the timed calls, so the case and its load start and end together; each busy loop
wants one whole core, on a machine with --threads cores. Every case runs in its own process with
--threads torch threads (2: the machine has 2 cores). Median of at least 7 timed calls (a busy
machine is noisy). The figures the issue asks for: a case's slow-down (its time beside N busy
processes / its quiet time) and fastvq's ratio to its anchor under load as a share of the quiet
ratio. Results: benchmarks/results/under_load_<device>.json; `python benchmarks/report.py` writes
the README table.

  python benchmarks/compare_under_load.py              # the full CPU run (about 6 minutes)
  python benchmarks/compare_under_load.py --quick      # tiny sizes, to check the script
  python benchmarks/compare_under_load.py --busy 0 2   # only the quiet and the two-process cases
  FASTVQ_PARALLEL=openmp python benchmarks/compare_under_load.py --out X.json   # OpenMP's shares, to compare
"""
from __future__ import annotations

import subprocess
import sys

# First, before torch: fastvq sets how long OpenMP's threads spin (fastvq/_openmp.py) as the
# `fastvq` command does; the anchors' workers opt out (FASTVQ_OPENMP_SPIN=0: libgomp's default).
import fastvq  # noqa: F401, I001

import common

LABELS = {
    "fastvq_sampling": "fastvq.sample_with_past (cpp)",
    "taming_sampling": "taming sample_with_past",
    "fastvq_window": "fastvq.sliding_window_attention fwd+bwd (cpp)",
    "sdpa_mask_window": "SDPA with the dense window mask fwd+bwd",
    "fastvq_vqgan": "fastvq.VQGAN training step",
    "taming_vqgan": "the same VQGAN on taming's VectorQuantizer2, training step",
    "fastvq_window_fair": "fastvq.sliding_window_attention fwd+bwd (cpp), fastvq.FairThreads called per call",
    "fastvq_vqgan_fair": "fastvq.VQGAN training step, fastvq.FairThreads called per step (the trainers' --fair-threads)",
}
# fastvq with FairThreads (fastvq/threads.py): torch's thread count gives way to lasting load from
# other processes. Opt-in in the trainers (it makes float results depend on the load), so it is a
# row of its own beside fastvq as it runs by default.
FAIR = {"window_attention": "fastvq_window_fair", "vqgan_step": "fastvq_vqgan_fair"}
PAIRS = {"sampling": ("fastvq_sampling", "taming_sampling"), "window_attention": ("fastvq_window", "sdpa_mask_window"),
         "vqgan_step": ("fastvq_vqgan", "taming_vqgan")}
_FULL = {"gpt": {"vocab": 1024, "n_layer": 8, "n_head": 8, "n_embd": 512, "steps": 128},
         "window": {"B": 1, "H": 8, "T": 1024, "W": 128, "Dh": 64},
         "vqgan": {"batch": 4, "size": 64, "ch": 64, "ch_mult": [1, 1, 2], "n_embed": 16384, "embed_dim": 256}}
_TINY = {"gpt": {"vocab": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "steps": 16},
         "window": {"B": 1, "H": 2, "T": 128, "W": 32, "Dh": 16},
         "vqgan": {"batch": 2, "size": 16, "ch": 16, "ch_mult": [1, 2], "n_embed": 32, "embed_dim": 8}}
SIZES = {"cpu": _FULL, "cpu_quick": _TINY, "cuda": _FULL, "cuda_quick": _TINY}
BUSY = (0, 1, 2)


def plan(args) -> list[dict]:
    """Every suite's pair at each load, the loads interleaved per suite so slow drift in the
    machine falls on both members of a pair alike."""
    out = []
    for suite, impls in PAIRS.items():
        if args.suites and suite not in args.suites:
            continue
        impls = (*impls, FAIR[suite]) if suite in FAIR and not args.no_fair else impls
        for busy in args.busy or BUSY:
            out += [{"suite": suite, "impl": impl, "device": "cpu", "busy": busy, "sizes": args.sizes[_part(suite)]}
                    for impl in impls]
    return out


def _part(suite: str) -> str:
    return {"sampling": "gpt", "window_attention": "window", "vqgan_step": "vqgan"}[suite]


# ----------------------------------------------------------------------------- one case

def _sampling_call(impl: str, s: dict):
    import torch

    import fastvq
    from compare_sampling import _taming_mingpt

    mingpt = _taming_mingpt()
    torch.manual_seed(0)
    ref = mingpt.GPT(s["vocab"], s["steps"] + 1, n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"]).eval()
    with torch.no_grad():
        ref.pos_emb.normal_(std=0.02)
    x = torch.randint(0, s["vocab"], (1, 1))
    if impl == "taming_sampling":
        return lambda: mingpt.sample_with_past(x, ref, s["steps"])
    model = fastvq.GPT.from_mingpt(ref).eval()
    gen = torch.Generator().manual_seed(0)
    return lambda: fastvq.sample_with_past(x, model, s["steps"], generator=gen)


def _window_call(impl: str, s: dict):
    import torch
    import torch.nn.functional as F

    import fastvq

    torch.manual_seed(0)
    q, k, v = (torch.randn(s["B"], s["H"], s["T"], s["Dh"], requires_grad=True) for _ in range(3))
    up = torch.randn(s["B"], s["H"], s["T"], s["Dh"])
    if impl == "fastvq_window":
        def attend():
            return fastvq.sliding_window_attention(q, k, v, window=s["W"], backend="cpp")
    else:
        i = torch.arange(s["T"])
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - s["W"])

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return lambda: torch.autograd.grad(attend(), (q, k, v), up)


def _vqgan_call(impl: str, s: dict):
    import torch

    from fastvq.models.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    cfg = VQGANConfig(ch=s["ch"], ch_mult=tuple(s["ch_mult"]), num_res_blocks=1, attn_resolutions=(),
                      resolution=s["size"], z_channels=s["embed_dim"], embed_dim=s["embed_dim"], n_embed=s["n_embed"])
    model = VQGAN(cfg).train()
    if impl == "taming_vqgan":
        from taming.modules.vqvae.quantize import VectorQuantizer2

        model.quantize = VectorQuantizer2(s["n_embed"], s["embed_dim"], beta=0.25)
    x = torch.rand(s["batch"], 3, s["size"], s["size"]) * 2 - 1
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        xrec, qloss = model(x)[:2]
        loss = (xrec - x).abs().mean() + qloss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def case_call(case: dict):
    make = {"sampling": _sampling_call, "window_attention": _window_call, "vqgan_step": _vqgan_call}[case["suite"]]
    return make(case["impl"].removesuffix("_fair"), case["sizes"])


def _busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def worker_env(case: dict) -> dict:
    """The anchors run as their users run them: OpenMP's spin left at libgomp's default (this
    process imported fastvq first, so the spin count it set is taken out again)."""
    from fastvq._openmp import state

    if case["impl"].startswith("fastvq_"):
        return {}
    return {"FASTVQ_OPENMP_SPIN": "0", **({"GOMP_SPINCOUNT": None} if state["set_by_fastvq"] else {})}


def measure(case: dict) -> dict:
    from fastvq import _backend
    from fastvq._openmp import spin_setting
    from fastvq.bench import time_call

    from fastvq.threads import FairThreads

    fn, fair = case_call(case), None
    if case["impl"].endswith("_fair"):
        fair, step = FairThreads(), fn

        def fn():
            fair()
            return step()
    procs = _busy_loops(case["busy"])
    try:
        timing = time_call(fn, warmup=2, min_runs=7, max_runs=25, target_s=4.0, slow_s=4.0, slow_runs=5)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        threads = None if fair is None else fair.threads
        if fair is not None:
            fair.restore()
    return {**timing, "parallel": _backend.parallel_mode(), "openmp_spin": spin_setting(),
            **({} if fair is None else {"fair_threads_at_end": threads, "fair_changes": fair.changes})}


def method(args) -> dict:
    return {"busy": "N processes running `while True: pass`, started after the model is built and before the "
                    "warm-up, killed after the timed calls",
            "timing": "2 warm-up calls, then the median of 7 to 25 timed calls (about 4 s), 5 for calls over 4 s",
            "threads": f"{args.threads} torch threads in every case's own process",
            "openmp_spin": "fastvq's cases import fastvq before torch, so they run with fastvq's GOMP_SPINCOUNT=10000 "
                           "(as the fastvq command does, fastvq/_openmp.py; set in this script's process and inherited "
                           "by the worker, so the worker's set_by_fastvq reads false); the anchors' workers get the "
                           "environment's own setting (FASTVQ_OPENMP_SPIN=0 and fastvq's value taken out: libgomp's "
                           "default unless the user exported one); each result records its setting (openmp_spin)",
            "figures": "slow-down = time beside N busy / quiet time of the same implementation; ratio = anchor time / "
                       "fastvq time at the same load; retained = ratio under load / quiet ratio"}


def summary(r: dict) -> str:
    fair = f", FairThreads ended at {r['fair_threads_at_end']} threads" if "fair_threads_at_end" in r else ""
    return f"beside {r['busy']} busy{fair}"


def options(p) -> None:
    p.add_argument("--busy", type=int, nargs="+", choices=BUSY, help="which loads to run (default 0 1 2)")
    p.add_argument("--suites", nargs="+", choices=tuple(PAIRS), help="which suites (default all)")
    p.add_argument("--no-fair", action="store_true", help="without the FairThreads rows")


COMPARISON = common.Comparison(
    name="under_load", doc=__doc__, script=__file__, labels=LABELS, sizes=SIZES, plan=plan, measure=measure,
    method=method, expected_s=420.0, summary=summary, options=options, shown=("busy",), worker_env=worker_env,
    budget_s={"cpu": 1800.0, "cuda": 1800.0}, timeout_s=600.0)

if __name__ == "__main__":
    sys.exit(common.main(COMPARISON))
