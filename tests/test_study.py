"""The alignment-versus-diversity study: its metrics against float64 references, and a shortened quick run.

The completion statistics (log-prob sums of policy and reference, entropy) are checked against the
float64 log-softmax of the materialized logits of the models' own final hidden states; the KL
estimate is exactly 0 when the policy is the reference, and otherwise the float64 mean of
log pi(y) - log pi_ref(y) over the samples the policy drew; distinct-n against a direct count.
"""

import copy
import json
import math
import statistics
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from benchmarks import study
from fdpo.train import CausalLM, byte_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def counted_distinct(sequences, n):
    """distinct-n by counting n-grams in a Counter (independent of the implementation's set of tuples)."""
    counts = Counter()
    for seq in sequences:
        for i in range(len(seq) - n + 1):
            counts[" ".join(map(str, seq[i:i + n]))] += 1
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def test_distinct_n_counts_distinct_ngrams_over_all_ngrams():
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 4, (int(length),), generator=g).tolist()
                 for length in torch.randint(0, 7, (12,), generator=g)]
    for n in (1, 2, 3):
        assert study.distinct_n(sequences, n) == counted_distinct(sequences, n)
    assert study.distinct_n([[5, 5, 5, 5]], 1) == 1 / 4
    assert study.distinct_n([[1, 2, 3], [3, 2, 1]], 2) == 1.0
    assert study.distinct_n([[1, 2], [1, 2]], 2) == 1 / 2
    assert study.distinct_n([[1], []], 2) == 0.0


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_distinct_n_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        study.distinct_n([[1, 2]], n)


def test_completion_batch_masks_prompts_and_padding():
    input_ids, mask, labels = study.completion_batch([(7, 1, 2), (7, 3)], [(4, 5, 9), (6,)], pad_token_id=0)
    assert input_ids.tolist() == [[7, 1, 2, 4, 5], [7, 3, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, 4, 5, 9], [-100, 6, -100, -100, -100]]
    with pytest.raises(ValueError, match="one prompt per completion"):
        study.completion_batch([(1,)], [], pad_token_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        study.completion_batch([(1,)], [()], pad_token_id=0)


def float64_statistics(model, input_ids, mask, labels):
    """Log-prob sums and entropy sums from the float64 log-softmax of the materialized logits."""
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.double()
        logp = torch.log_softmax(hidden @ model.lm_head.weight.double().T, dim=-1)
    scored = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return (picked * scored).sum(-1), (entropy * scored).sum(-1)


def record_samples(monkeypatch) -> list:
    """Patch `study.sample_completions` to append (prompt ids, completions) of every call to the returned list."""
    drawn, sample = [], study.sample_completions

    def recording(model, prompts, **options):
        completions = sample(model, prompts, **options)
        drawn.append((prompts, completions))
        return completions

    monkeypatch.setattr(study, "sample_completions", recording)
    return drawn


def float64_kl(policy, reference, prompt_ids, samples, pad_token_id):
    """(KL estimate, tolerance) of the policy's samples: the mean over every sample of log pi(y) - log pi_ref(y),
    each a float64 sum over the completion's tokens (stop token included) of the materialized log-softmax.

    The library's estimate is a mean of differences of float32 sums of a few nats per token, so its rounding
    error scales with the sums, not with their difference (float32 rounds a 33-nat sum at 2e-6): the
    tolerance is 2e-7 of the sums' mean magnitude, about 9x the error of both backends here and at most
    about 1 % of the KLs checked, so a wrong sign or scale fails.
    """
    rows = [(ids, completion) for ids, completions in zip(prompt_ids, samples, strict=True)
            for completion in completions]
    input_ids, mask, labels = study.completion_batch([r[0] for r in rows], [r[1] for r in rows],
                                                     pad_token_id=pad_token_id)
    logprob, _ = float64_statistics(policy, input_ids, mask, labels)
    ref_logprob, _ = float64_statistics(reference, input_ids, mask, labels)
    scale = (logprob.abs().mean() + ref_logprob.abs().mean()).item()
    return (logprob - ref_logprob).mean().item(), 2e-7 * scale


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_completion_statistics_match_float64_materialized_logits(tokenizer, device, backend):
    """Models and batch on `device`; the float64 references from the same models' hidden states there."""
    policy, reference = tiny_llama(seed=0).eval().to(device), tiny_llama(seed=1).eval().to(device)
    g = torch.Generator().manual_seed(3)
    prompts = [[257, *torch.randint(0, 256, (int(k),), generator=g).tolist()] for k in (4, 9, 6)]
    completions = [torch.randint(0, 259, (int(k),), generator=g).tolist() for k in (5, 2, 11)]
    batch = study.completion_batch(prompts, completions, pad_token_id=tokenizer.pad_token_id)
    input_ids, mask, labels = (t.to(device) for t in batch)

    stats = study.completion_statistics(CausalLM(policy, backend=backend), CausalLM(reference, backend=backend),
                                        input_ids, mask, labels)

    logprob, entropy = float64_statistics(policy, input_ids, mask, labels)
    ref_logprob, _ = float64_statistics(reference, input_ids, mask, labels)
    torch.testing.assert_close(stats["logprob"].double(), logprob, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats["ref_logprob"].double(), ref_logprob, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats["entropy"].double(), entropy, rtol=1e-5, atol=1e-4)
    assert stats["tokens"].tolist() == [5.0, 2.0, 11.0]
    assert not torch.allclose(logprob, ref_logprob)


def test_sampling_is_seeded_and_stops_at_the_stop_tokens(tokenizer):
    model = tiny_llama(seed=0).eval()
    prompts = [[257, 1, 2], [257, 3], [257, 4, 5]]
    options = {"samples_per_prompt": 3, "max_new_tokens": 5, "stop_ids": [258, 10]}
    first = study.sample_completions(model, prompts, generator=torch.Generator().manual_seed(1), **options)
    again = study.sample_completions(model, prompts, generator=torch.Generator().manual_seed(1), **options)
    assert first == again
    assert [len(c) for c in first] == [3, 3, 3]
    for completions in first:
        for c in completions:
            assert 1 <= len(c) <= 5
            assert all(t not in (258, 10) for t in c[:-1])
            assert len(c) == 5 or c[-1] in (258, 10)


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose next-token logits are the same at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_sampling_draws_from_the_full_distribution_at_temperature_one():
    logits = [0.0, 1.0, 2.0, -1.0, 0.5, -3.0]
    draws = 6000
    samples = study.sample_completions(FixedLogits(logits), [[0]], samples_per_prompt=draws, max_new_tokens=1,
                                       stop_ids=[5], generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([c[0] for c in samples[0]]), minlength=6).double()
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    sigma = (draws * p * (1 - p)).sqrt()
    assert ((counts - draws * p).abs() <= 5 * sigma).all(), (counts, draws * p)
    assert counts[5] > 0   # a token of probability 0.2 % is still drawn: no top-k / top-p truncation


def test_sampling_stops_at_a_stop_token():
    always_stop = FixedLogits([0.0, 0.0, 80.0])
    samples = study.sample_completions(always_stop, [[0, 1], [1]], samples_per_prompt=3, max_new_tokens=4,
                                       stop_ids=[2], generator=torch.Generator().manual_seed(0))
    assert samples == [[(2,)] * 3] * 2
    never_stop = FixedLogits([0.0, 0.0, -80.0])
    samples = study.sample_completions(never_stop, [[0, 1]], samples_per_prompt=2, max_new_tokens=4,
                                       stop_ids=[2], generator=torch.Generator().manual_seed(0))
    assert all(len(c) == 4 and 2 not in c for c in samples[0])


# auto: what the study runs. Its models stay on the CPU (evaluate_samples scores CPU batches), where auto is
# the interpreted Triton kernels under TRITON_INTERPRET=1 and torch otherwise.
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_kl_estimate_is_zero_when_the_policy_is_the_reference(tokenizer, monkeypatch, backend):
    """KL is exactly 0 against a copy of the policy, and against another reference it is the float64
    mean of log pi(y) - log pi_ref(y) over the very samples the policy drew (sign and scale included)."""
    drawn = record_samples(monkeypatch)
    model = tiny_llama(seed=0)
    prompts = ["sort: 3 1 2\n", "sort: 9 0 4 4\n"]
    metrics = study.evaluate_samples(model, copy.deepcopy(model), tokenizer, prompts, samples_per_prompt=3,
                                     max_new_tokens=6, seed=0, backend=backend)
    assert metrics["kl"] == 0.0
    assert 0.0 <= metrics["reward"] <= 1.0 and 0.0 < metrics["entropy"] <= math.log(259) + 1e-5
    reference = tiny_llama(seed=1)
    other = study.evaluate_samples(model, reference, tokenizer, prompts, samples_per_prompt=3,
                                   max_new_tokens=6, seed=0, backend=backend)
    assert (other["reward"], other["entropy"]) == (metrics["reward"], metrics["entropy"])

    assert len(drawn) == 2 and drawn[0] == drawn[1]   # one sampling per evaluation, the same seeded samples
    prompt_ids, samples = drawn[1]
    assert prompt_ids == [[tokenizer.bos_token_id, *p.encode()] for p in prompts]
    assert [len(c) for c in samples] == [3, 3]
    expected, tolerance = float64_kl(model, reference, prompt_ids, samples, tokenizer.pad_token_id)
    assert abs(expected) > 1000 * tolerance            # a sign or scale error cannot hide in the tolerance
    assert other["kl"] == pytest.approx(expected, rel=0, abs=tolerance)


def test_summary_means_and_sample_deviations():
    runs = [{"method": "js", "beta": 0.1, "seed": s, "metrics": {"reward": r, "ece": e}}
            for s, r, e in ((0, 0.5, 0.1), (1, 0.7, 0.3), (2, 0.9, None))]
    runs.append({"method": "reference", "beta": None, "seed": 0, "metrics": {"reward": 0.4, "ece": None}})
    js, reference = study.summarize(runs)
    assert js["seeds"] == [0, 1, 2]
    assert js["reward"] == pytest.approx(statistics.mean([0.5, 0.7, 0.9]))
    assert js["reward_std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    assert js["ece"] == pytest.approx(0.2) and js["ece_std"] == pytest.approx(statistics.stdev([0.1, 0.3]))
    assert reference["reward"] == 0.4 and reference["reward_std"] is None and reference["ece"] is None


def test_quick_study_writes_every_configuration_with_distinct_bounded_metrics(tmp_path, capsys, restore_threads,
                                                                            monkeypatch):
    # Every evaluation's KL against the float64 estimate over its own samples, computed as it returns.
    drawn, evaluate, expected_kl = record_samples(monkeypatch), study.evaluate_samples, []

    def checked_evaluation(policy, reference, tokenizer, prompts, **options):
        metrics = evaluate(policy, reference, tokenizer, prompts, **options)
        prompt_ids, samples = drawn[-1]
        expected_kl.append((metrics, *float64_kl(policy, reference, prompt_ids, samples, tokenizer.pad_token_id)))
        return metrics

    monkeypatch.setattr(study, "evaluate_samples", checked_evaluation)
    # The torch backend: the interpreted Triton kernels are checked above, and would make this minutes long.
    argv = ["--quick", "--max-steps", "5", "--warm-start-steps", "5", "--eval-prompts", "4",
            "--samples-per-prompt", "2", "--max-new-tokens", "8", "--backend", "torch", "--output", str(tmp_path)]
    assert study.main(argv) == 0
    table = capsys.readouterr().out

    results = json.loads((tmp_path / "study_quick.json").read_text())
    assert results["command"] == "python -m benchmarks.study " + " ".join(argv)
    assert results["settings"]["betas"] == [study.QUICK_BETA] and results["settings"]["seeds"] == [0]
    assert len(results["load_average"]["start"]) == 3 and results["wall_seconds"] > 0
    assert results["versions"]["torch"] == torch.__version__
    configurations = {(r["method"], r["beta"], r["seed"]) for r in results["runs"]}
    assert configurations == {(m, study.QUICK_BETA, 0) for m in study.METHODS} | {("reference", None, 0)}
    for run in results["runs"]:
        trained = run["method"] != "reference"
        for name in study.METRICS:
            value = run["metrics"][name]
            if trained or name not in ("accuracy", "ece"):
                assert math.isfinite(value), (run["method"], name, value)
        assert 0.0 <= run["metrics"]["reward"] <= 1.0
        assert 0.0 <= run["metrics"]["distinct_2"] <= 1.0
    assert next(r for r in results["runs"] if r["method"] == "reference")["metrics"]["kl"] == 0.0
    assert len(expected_kl) == len(results["runs"]) and len(drawn) == len(results["runs"])
    for run, (metrics, expected, tolerance) in zip(results["runs"], expected_kl, strict=True):
        assert run["metrics"] == metrics, run["method"]                # runs are recorded in evaluation order
        if run["method"] != "reference":
            assert abs(expected) > 50 * tolerance, run["method"]    # a sign error cannot hide in the tolerance
        assert run["metrics"]["kl"] == pytest.approx(expected, rel=0, abs=tolerance), run["method"]
    trained_runs = [r for r in results["runs"] if r["method"] != "reference"]
    for run in trained_runs:
        metrics = run["metrics"]
        assert metrics["kl"] != 0.0, run["method"]                    # every method moved its policy
        assert 0.0 <= metrics["entropy"] <= math.log(259) + 1e-6
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["ece"] <= 1.0
    # each configuration trains its own objective: no two methods end at the same policy
    fingerprints = {(r["metrics"]["kl"], r["metrics"]["entropy"], r["metrics"]["eval_loss"]) for r in trained_runs}
    assert len(fingerprints) == len(trained_runs)
    assert "final_beta" in next(r for r in results["runs"] if r["method"] == "epsilon_dpo")
    assert len(results["summary"]) == len(study.METHODS) + 1
    assert (tmp_path / "study_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in study.METHODS:
        assert f"| {method} | {study.QUICK_BETA:g} | 1 |" in table


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "kto"], "invalid choice: 'kto'"),
    (["--betas", "0"], "betas must be a non-empty list of finite numbers > 0"),
    (["--max-steps", "0"], "max_steps must be an integer >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--eval-prompts", "257", "--output", "unused"], "eval_prompts must be at most 256"),
])
def test_bad_flags_are_refused_with_the_allowed_values(argv, message, capsys, restore_threads):
    with pytest.raises(SystemExit):
        study.main(argv)
    assert message in capsys.readouterr().err
