"""The float64 check sees the reference model and TDPO's KL: an implementation that ignores either is marked
wrong and not timed, in float32 and in bfloat16, while the right ones pass (tiny shapes, on CPU)."""

import pytest
import torch

import fdpo
from benchmarks import __main__ as cli
from benchmarks import workloads
from benchmarks.workloads import Implementation

CPU = torch.device("cpu")
TOKENS, VOCAB, HIDDEN = 256, 512, 16


def plain_dpo(reference_is_policy: bool = False):
    """Build an implementation of reverse-KL DPO from naive log-probs: no per-token KL term (wrong for tdpo);
    with `reference_is_policy`, the detached policy's log-probs in place of the reference's (wrong for all)."""
    def build(**_):
        def run(inputs: workloads.Inputs) -> torch.Tensor:
            hidden, ref_hidden, labels = workloads._rows(inputs)
            rows = inputs.labels.shape
            pairs = rows[0] // 2
            policy = workloads.naive_logprobs(hidden, inputs.weight, labels).float().view(rows).sum(dim=-1)
            with torch.no_grad():
                source = (hidden, inputs.weight) if reference_is_policy else (ref_hidden, inputs.ref_weight)
                ref = workloads.naive_logprobs(*source, labels).float().view(rows).sum(dim=-1)
            return fdpo.preference_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta=workloads.BETA,
                                        divergence="reverse_kl", backend="reference").loss
        return run
    return build


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("workload", "reference_is_policy"), [("tdpo", False), ("tdpo", True),
                                                               ("dpo-reverse_kl", True)])
def test_an_implementation_ignoring_the_reference_or_the_kl_is_wrong(monkeypatch, dtype, workload,
                                                                     reference_is_policy):
    monkeypatch.setitem(workloads.REGISTRY, "naive+compile",
                        Implementation("naive+compile", "wrong", plain_dpo(reference_is_policy)))
    args = cli.parse_args(["--quick", "--tokens", str(TOKENS), "--vocab", str(VOCAB), "--hidden", str(HIDDEN),
                           "--dtype", dtype, "--repeats", "1", "--workloads", workload,
                           "--impls", "naive", "naive+compile", "fdpo-torch"])
    shape = {"workload": workload, "tokens": TOKENS, "vocab": VOCAB, "hidden": HIDDEN, "dtype": dtype}
    records = {r["implementation"]: r for r in cli.measure_shape(args, cli.Runner(args, CPU), shape,
                                                                 cli.DTYPES[dtype], CPU)}
    wrong = records["naive+compile"]
    assert wrong["status"] == "wrong" and wrong["seconds"] is None, wrong
    allowed = workloads.tolerance(workload, cli.DTYPES[dtype])
    assert max(wrong["drift_errors"].values()) > allowed, "the check at CHECK_DRIFT alone finds it"
    for name in ("naive", "fdpo-torch"):
        r = records[name]
        assert r["status"] == "ok", r
        assert set(r["drift_errors"]) == {"value", "grad_hidden", "grad_weight"}
        assert max(r["drift_errors"].values()) <= allowed / 4, "the right implementations pass with room"


def test_the_drift_check_inputs_differ_from_the_timed_ones_in_the_reference_only():
    timed = workloads.make_inputs("tdpo", 64, 128, 8, dtype=torch.float32, device=CPU)
    drifted = workloads.make_inputs("tdpo", 64, 128, 8, dtype=torch.float32, device=CPU, drift=workloads.CHECK_DRIFT)
    for name in ("hidden", "weight", "labels"):
        assert torch.equal(getattr(timed, name), getattr(drifted, name))
    for name in ("ref_hidden", "ref_weight"):
        policy = getattr(timed, name.removeprefix("ref_"))
        ratio = ((getattr(drifted, name) - policy).norm() / (getattr(timed, name) - policy).norm()).item()
        assert ratio == pytest.approx(workloads.CHECK_DRIFT / workloads.REFERENCE_DRIFT, rel=1e-5)
    assert workloads.DRIFT_CHECKED == ("dpo-reverse_kl", "tdpo", "epsilon-dpo")


def test_plain_dpo_is_not_epsilon_dpo_where_its_steps_are_decided(monkeypatch):
    monkeypatch.setitem(workloads.REGISTRY, "naive+compile", Implementation("naive+compile", "wrong", plain_dpo()))
    # Rows of 256 tokens: plain DPO's beta, off by eps, moves the loss and gradients by about 1.2 % < 2 eps.
    args = cli.parse_args(["--quick", "--tokens", "1024", "--vocab", str(VOCAB), "--hidden", str(HIDDEN),
                           "--repeats", "1", "--workloads", "epsilon-dpo", "--impls", "naive", "naive+compile",
                           "fdpo-torch"])
    shape = {"workload": "epsilon-dpo", "tokens": 1024, "vocab": VOCAB, "hidden": HIDDEN, "dtype": "float32"}
    records = {r["implementation"]: r for r in cli.measure_shape(args, cli.Runner(args, CPU), shape, torch.float32,
                                                                 CPU)}
    wrong = records["naive+compile"]
    assert wrong["status"] == "wrong" and f"at reference drift {workloads.CHECK_DRIFT:g}" in wrong["reason"], wrong
    assert wrong["drift_errors"]["grad_hidden"] > 5 * workloads.TOLERANCE[torch.float32]
    assert max(wrong["errors"].values()) < 2 * workloads.EPS, "at the timed drift its steps are near ties"
    assert max(wrong["drift_errors"].values()) < 2 * workloads.EPS, "2 eps, the near-tie allowance, let it pass"
    for name in ("naive", "fdpo-torch"):
        assert records[name]["status"] == "ok", records[name]


def test_epsilon_dpo_is_checked_at_the_normal_tolerance_where_every_step_is_decided():
    timed = workloads.make_inputs("epsilon-dpo", TOKENS, VOCAB, HIDDEN, dtype=torch.float32, device=CPU)
    drifted = workloads.make_inputs("epsilon-dpo", TOKENS, VOCAB, HIDDEN, dtype=torch.float32, device=CPU,
                                    drift=workloads.CHECK_DRIFT)
    assert not workloads.steps_decided(timed) and workloads.steps_decided(drifted)
    assert workloads.allowed_error(timed) == workloads.tolerance("epsilon-dpo", torch.float32) == 2 * workloads.EPS
    assert workloads.allowed_error(drifted) == workloads.TOLERANCE[torch.float32]
    tdpo = workloads.make_inputs("tdpo", TOKENS, VOCAB, HIDDEN, dtype=torch.bfloat16, device=CPU)
    assert workloads.allowed_error(tdpo) == workloads.TOLERANCE[torch.bfloat16]
