"""Which token-level divergence between two heads, and its parameter (docs/math.md 12).

`DivergenceSpec.of(divergence, alpha, beta)` validates the public arguments of
`fdpo.token_divergence` and resolves the endpoints: `js` at beta 0 / 1 and `alpha` at alpha 0 / 1
are the KLs themselves. The backends and kernels only ever see a resolved spec.
"""

from dataclasses import dataclass

# divergence=: p is the policy's next-token distribution, q the reference's (docs/math.md 12).
#   forward_kl  KL(q || p)   (reference || policy: TDPO's term, = fdpo.token_kl's kl)
#   reverse_kl  KL(p || q)   (policy || reference)
#   js          generalized Jensen-Shannon, mixture m = (1 - beta) p + beta q (TRL's convention)
#   alpha       Amari's alpha-divergence D_alpha(p || q) = (1 - sum p^alpha q^(1-alpha)) / (alpha (1 - alpha))
#   tv          total variation (1/2) sum |p - q|
TOKEN_DIVERGENCES = ("forward_kl", "reverse_kl", "js", "alpha", "tv")
# An alpha below this is its alpha -> 0 limit, KL(q || p), to within a relative alpha (far below
# float32 precision), where the kernels' float32 products alpha * d would be denormal or 0 (NaN).
# (js has no such limit: its value goes to 0 with beta, and only beta = 0 exactly is the KL.)
ALPHA_AT_ZERO = 1e-30
# The divergences whose value needs both LSEs before it can be accumulated: a second pass over the vocabulary.
SECOND_PASS = ("js", "alpha", "tv")


def check_unit_interval(name: str, value: float) -> None:
    """`value` must be a real number in [0, 1] (bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class DivergenceSpec:
    """A resolved divergence: `name` in TOKEN_DIVERGENCES and `param` (beta for js, alpha for alpha, else 0).

    Resolved means js has 0 < beta < 1 and alpha has 0 < alpha < 1: the endpoints are the KLs.
    """

    name: str
    param: float = 0.0

    @classmethod
    def of(cls, divergence: str, alpha: float = 0.5, beta: float = 0.5) -> "DivergenceSpec":
        """Validate the public arguments and resolve the endpoints (docs/math.md 12).

        Raises ValueError for an unknown divergence, or alpha / beta outside [0, 1] (both are
        checked whichever divergence is asked for, so a typo never passes silently).
        """
        if not isinstance(divergence, str) or divergence not in TOKEN_DIVERGENCES:
            raise ValueError(f"divergence must be one of {TOKEN_DIVERGENCES}, got {divergence!r}")
        check_unit_interval("alpha", alpha)
        check_unit_interval("beta", beta)
        if divergence == "js":
            return cls.endpoint(float(beta), "forward_kl", "reverse_kl", "js")
        if divergence == "alpha":
            return cls.endpoint(0.0 if alpha < ALPHA_AT_ZERO else float(alpha), "forward_kl", "reverse_kl", "alpha")
        return cls(divergence)

    @classmethod
    def endpoint(cls, param: float, at_zero: str, at_one: str, inside: str) -> "DivergenceSpec":
        """`at_zero` for param 0, `at_one` for param 1, `inside` with the parameter otherwise."""
        if param == 0.0:
            return cls(at_zero)
        if param == 1.0:
            return cls(at_one)
        return cls(inside, param)

    @property
    def second_pass(self) -> bool:
        """Whether the value needs a second pass over the vocabulary with both LSEs known."""
        return self.name in SECOND_PASS

    @property
    def code(self) -> int:
        """The kernels' constexpr for the divergence: its index in TOKEN_DIVERGENCES."""
        return TOKEN_DIVERGENCES.index(self.name)

    def describe(self) -> str:
        """A short label, e.g. "js(beta=0.5)", "reverse_kl"."""
        if self.name == "js":
            return f"js(beta={self.param:g})"
        if self.name == "alpha":
            return f"alpha(alpha={self.param:g})"
        return self.name

