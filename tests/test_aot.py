"""Every kernel compiles for sm_80 and sm_90 with the block sizes used on GPU, on this machine.

`python -m fdpo.kernels.aot --json` runs in a subprocess without TRITON_INTERPRET (the
interpreter replaces `triton.jit` functions, which the compiler cannot take). The table of shared
memory, registers and spills per kernel is printed (pytest -s shows it; it is also in the report
of any failure).
"""

import json
import os
import subprocess
import sys

# Per-block shared-memory limits (opt-in maximum) of the architectures.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# The GPU tiles in kernels/launch.py were chosen so that no variant spills more registers than this
# to local memory (most spill none); a kernel change that spills more must retune its tiles.
SPILL_LIMIT = 40
# The only float min / max of the token-divergence kernels (forward and backward) allowed to drop a NaN
# operand on the GPU, by source site (`fdpo.kernels.aot.nan_dropping_sites`), each with the reason it
# cannot turn a NaN input into a finite result. Every other min / max there must propagate NaN.
DIVERGENCE_NAN_DROPPING_ALLOWED = {
    "tiles.py: m_new = tl.maximum(m, tl.max(z, axis=1))":
        "the online max of `online_lse_update` / `online_moments_update`: a NaN logit dropped from the "
        "running max m' still reaches the running sum through exp(z - m') = NaN, so the row's LSE (and "
        "every later term of the row) is NaN",
}


def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fdpo.kernels.aot", "--json"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    reports = json.loads(run.stdout)
    for r in reports:
        print(f"{r['kernel']:30} {r['variant']:40} {r['dtype']:9} sm_{r['capability']} "
              f"smem {r['shared_bytes'] / 1024:6.1f} KB  regs {r['registers']:3}  spill {r['spill_bytes']} B")
    variants = {(r["variant"], r["dtype"]) for r in reports}
    assert {r["capability"] for r in reports} == {80, 90}
    assert len(reports) == 2 * len(variants), "every variant must compile for both architectures"
    for module in ("head_logprob_fwd", "head_stats_fwd", "head_stats_bwd", "head_stats_split_bwd", "preference_loss"):
        assert any(v.startswith(f"{module}:") for v, _ in variants), f"no variant of {module} compiled"
    # float32 operands with bfloat16 products (a float32 model under bf16 autocast): tensor-core dots.
    autocast = [r for r in reports if r["variant"].endswith("bf16 products")]
    assert {r["variant"].split(":")[0] for r in autocast} == {
        "head_logprob_fwd", "head_stats_fwd", "head_stats_bwd", "head_stats_split_bwd", "token_divergence_fwd",
        "token_divergence_bwd"}
    for r in autocast:
        assert r["dtype"] == "float32" and r["tensor_cores"] and not r["ieee_fp32"], r["variant"]
    for r in reports:
        where = f"{r['kernel']} ({r['variant']}, {r['dtype']}, sm_{r['capability']})"
        assert r["shared_bytes"] <= SHARED_LIMIT[r["capability"]], f"{where} needs too much shared memory"
        assert r["spill_bytes"] <= SPILL_LIMIT, f"{where} spills {r['spill_bytes']} B of registers"
        if r["uses_dot"] and not r["ieee_fp32"]:
            assert r["tensor_cores"], f"{where} has a tl.dot but no tensor-core instruction"
        if r["variant"].startswith("preference_loss:"):
            # A NaN log-prob sum must give a NaN loss on the GPU too (the interpreter cannot show it).
            assert r["nan_dropping_minmax"] == 0, f"{where} has min / max that drop a NaN operand"
        assert sum(r["nan_dropping_sites"].values()) == r["nan_dropping_minmax"], f"{where}: unattributed sites"
        if r["variant"].startswith(("token_divergence_fwd:", "token_divergence_bwd:")):
            # A NaN hidden state must give a NaN divergence and NaN gradients on the GPU too: a NaN-dropping
            # min turned a NaN log-prob into 0 (p = 1) there, a finite JS of 15 > log 2.
            dropping = {site: n for site, n in r["nan_dropping_sites"].items()
                        if site not in DIVERGENCE_NAN_DROPPING_ALLOWED}
            assert not dropping, f"{where} has min / max that drop a NaN operand: {dropping}"


def test_a_launch_makes_its_tensors_cuda_device_current(monkeypatch):
    """Triton launches on the current CUDA device: a launch whose tensors are on cuda:1 (where
    device_map="auto" may put the LM head while cuda:0 is current) runs with cuda:1 current, and a CPU
    launch (the interpreter) enters no device. Fake CUDA tensors and a recording kernel stand in for a GPU."""
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fdpo.kernels.launch import Launch

    events = []

    @contextlib.contextmanager
    def current_device(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    class Kernel:
        def __getitem__(self, grid):
            return lambda **kwargs: events.append(("launch", grid, sorted(kwargs)))

    monkeypatch.setattr(torch.cuda, "device", current_device)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(4, device="cuda:1")
    Launch(Kernel(), (2,), {"n": 4, "x_ptr": x}, {"BLOCK": 4}, num_warps=4, num_stages=1)()
    cuda1 = torch.device("cuda:1")
    assert events == [("enter", cuda1), ("launch", (2,), ["BLOCK", "n", "num_stages", "num_warps", "x_ptr"]),
                      ("exit", cuda1)]
    events.clear()
    Launch(Kernel(), (1,), {"x_ptr": torch.empty(4)}, {}, num_warps=4, num_stages=1)()
    assert events == [("launch", (1,), ["num_stages", "num_warps", "x_ptr"])]


# Run without the interpreter, which replaces the kernels by functions Triton's launch binder cannot take.
COMPILE_KEYS = """
import json
import torch
from fdpo.kernels.aot import compile_key, representative_launches
from fdpo.kernels.launch import BATCH_SIZED

changed = []
for dtype in (torch.bfloat16, torch.float32):
    for variant, launch in representative_launches(dtype).items():
        for name in BATCH_SIZED:
            if isinstance(launch.args.get(name), int):
                keys = {compile_key(launch, **{name: value}) for value in (1, 16, 17, 4096, 4099)}
                changed += [] if len(keys) == 1 else [f"{variant} {dtype}: {name}"]
print(json.dumps(changed))
"""


def test_batch_sizes_do_not_change_a_kernels_compile_key():
    """T, P and the split count change with every batch; Triton's default `== 1` / `% 16`
    specialisation of ints would compile a new variant of the kernel whenever one changes class."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE_KEYS], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads(run.stdout.splitlines()[-1]) == []
