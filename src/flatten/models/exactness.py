"""What a family's norms make exact, and what is refused where they do not: the half of ``Architecture`` that
says why two blocks' attentions or MLPs do not lie side by side exactly in one block, or why a ``down_proj``
refit is refused or approximate, and which registered strategies run instead."""

from __future__ import annotations

DROPS = ("shortgpt", "sleb", "angular", "blockpruner", "laco")  # delete blocks, silence or collapse sub-layers
REFITS = ("cut-absorb", "replaceme", "prune-only")  # refit a down_proj by least squares; blocks kept whole
MERGES = ("flattengpt", "cut-merge", "cut-flatten")  # lay blocks side by side and prune back


class Exactness:
    """Read from an ``Architecture``'s norm fields (``attn_post_norm``, ``mlp_post_norm``, ``q_norm``,
    ``k_norm``, ``qk_norm``, ``post_norm_refit``) and its ``model_type``."""

    @property
    def attention_inexact(self) -> str | None:
        """Why no two blocks' attentions of this family lie side by side exactly in one block (None: they do,
        up to a shared q/k norm, see ``flatten.merge.flatten_blocks``)."""
        reasons = []
        if self.attn_post_norm is not None:
            reasons.append(f"{self.attn_post_norm} normalises the attention's output after o_proj, and the norm of "
                           "two blocks' outputs summed is not the sum of their norms (nor is the output linear in "
                           "o_proj)")
        if self.q_norm is not None and self.qk_norm == "channel":
            reasons.append(f"{self.q_norm} and {self.k_norm} take the RMS over all heads' queries (keys) together, "
                           "so in a wide block it would run over both blocks' heads, and over fewer heads in a "
                           "block that keeps only some")
        return "; ".join(reasons) or None

    @property
    def mlp_post_norm_inexact(self) -> str | None:
        """Why no two blocks' MLPs of this family lie side by side exactly (None: they do)."""
        if self.mlp_post_norm is None:
            return None
        return (f"{self.mlp_post_norm} normalises the MLP's output after down_proj, and the norm of two MLPs' "
                "outputs summed is not the sum of their norms")

    @property
    def mlp_inexact(self) -> str | None:
        """Why a least-squares refit of ``down_proj`` is refused on this family and no two blocks' MLPs lie side
        by side exactly (None: a refit runs, exactly, or approximately where ``refit_approximation`` says so;
        ``mlp_post_norm_inexact`` then says whether the MLPs lie side by side)."""
        if self.mlp_post_norm is None or self.post_norm_refit:
            return None
        return (f"{self.mlp_post_norm} normalises the MLP's output after down_proj, so the block's output is not "
                "linear in down_proj (a least-squares refit of it does not fit the output) and the norm of two "
                "MLPs' outputs summed is not the sum of their norms")

    @property
    def refit_approximation(self) -> str | None:
        """What a ``down_proj`` refit approximates on this family (None: it is an exact least-squares fit of
        the block's output, or refused, see ``mlp_inexact``)."""
        if self.mlp_post_norm is None or not self.post_norm_refit:
            return None
        return (f"approximate: {self.mlp_post_norm} normalises the MLP's output after down_proj, so the block's "
                "output is not linear in down_proj; down_proj is fitted by least squares to the output direction, "
                "per token, that comes closest to the target through that norm (its weight fixes the output's "
                "scale), scaled to the size of the MLP's output before the norm; the refitted block's error on the "
                "calibration tokens is measured and recorded with each refit")

    @property
    def merge_refusal(self) -> str | None:
        """Why no two blocks of this family flatten into one exactly (None: they can)."""
        return "; ".join(r for r in (self.attention_inexact, self.mlp_inexact or self.mlp_post_norm_inexact)
                         if r) or None

    def runs(self) -> str:
        """The registered strategies that run on this family, in words, for refusals."""
        names = list(DROPS) + ([] if self.mlp_inexact else
                               [f"{name} (approximate refit)" if self.refit_approximation else name for name in REFITS])
        text = ", ".join(names)
        if self.merge_refusal is None:
            text += ", " + ", ".join(MERGES)
            if self.q_norm is not None:
                text += f" (merges only of two blocks whose {self.q_norm} and {self.k_norm} weights are equal)"
        return text

    def refusal(self, what: str, why: str) -> str:
        """The message of a refused step: what, why, and what runs instead."""
        return f"{what} is refused on {self.model_type!r}: {why}. Strategies that run on {self.model_type!r}: {self.runs()}"
