"""What to quantize and how: the user-facing bit settings (``QuantSpec``, the ``quant`` config group)
and the runtime ``QuantConfig`` (the spec plus the sampler's timesteps and the table mode)."""

from dataclasses import asdict, dataclass, field
from typing import List, Optional

from dq.quant.fake_quant import check_bits

BITS = "the integers 2..8"


LOWRANK_SCOPES = ("all", "skip_shortcuts")


def check_scope(scope: object, what: str) -> str:
    if scope not in LOWRANK_SCOPES:
        raise ValueError(f"{what}={scope!r} is not valid; valid choices: {', '.join(LOWRANK_SCOPES)}")
    return scope


def check_rank(rank: object, what: str) -> int:
    """A low-rank branch's rank: a non-negative int (0 = no branch)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"{what}={rank!r} must be a non-negative integer (0: no low-rank branch)")
    return rank


@dataclass(frozen=True)
class LowRank:
    """A low-rank branch setting: ``rank`` (0 = none) on the layers of ``scope``. A method's own choice is
    used where the user leaves ``quant.lowrank_rank`` unset (:meth:`QuantSpec.resolve_lowrank`)."""

    rank: int = 0
    scope: str = "all"

    def __post_init__(self) -> None:
        check_rank(self.rank, "low-rank rank")
        check_scope(self.scope, "low-rank scope")


@dataclass
class QuantSpec:
    """The ``quant`` config group (conf/quant/*.yaml). Validated on construction.

    Attributes:
        w_bits: weight bits (per output channel).
        a_bits: activation bits (per tensor, per step), or None for weight-only quantization.
        prob_bits: attention probabilities (softmax output); None leaves them in float.
        first_last_bits: the family's first and last layers (weights and input); None = same as the rest.
        quantize_attention: quantize q, k, v and the probabilities of every attention.
        quantize_time_embedding: quantize the timestep / class embedding MLPs.
        quantize_embedding_acts: quantize the input activations of the conditioning branch — the layers
            that read only the timestep / class / prompt embedding, not the image (the embedding MLPs and
            each block's projection of the embedding: UNet ``time_emb_proj``, DiT adaLN Linears). False
            keeps those inputs in float; their weights keep w_bits (docs/w4a4_gap.md).
        skip: qualified module-name prefixes left in float, e.g. ["mid_block"].
        a8_layers: qualified module-name prefixes whose input activations use 8 bits (weights keep
            w_bits), e.g. ["up_blocks.2.resnets.0.conv_shortcut"] (docs/w4a4_gap.md).
        split_concat: layers that read a skip concatenation (the model family names them: a UNet's up-path
            resnets) get one activation quantizer per part of it, each with its own per-step tables.
        lowrank_rank: SVDQuant's float low-rank branch of this rank on the layers of ``lowrank_scope``
            (dq.quant.lowrank); 0 = none. Trained with the weights where a method trains them. None (the
            default): the method's own choice (:class:`LowRank`; DilateQuant: rank 16 on the skip shortcuts,
            SVDQuant: ``method.rank`` on all layers, the others: none).
        lowrank_scope: which layers get the branch: ``all`` (every layer it fits) or ``skip_shortcuts``
            (the layers the model family names as reading a raw skip concatenation: a UNet's up-path 1×1
            shortcuts, where the W4A4 error sits, docs/w4a4_gap.md). None: the method's choice where
            ``lowrank_rank`` is None too, else ``all``.
        lowrank_layers: qualified module-name prefixes that further restrict the branch's layers; empty = no
            restriction.
    """

    name: str = "w4a4"
    w_bits: int = field(default=4, metadata={"choices": BITS})
    a_bits: Optional[int] = field(default=4, metadata={"choices": BITS + " or null"})
    prob_bits: Optional[int] = field(default=8, metadata={"choices": BITS + " or null"})
    first_last_bits: Optional[int] = field(default=8, metadata={"choices": BITS + " or null"})
    quantize_attention: bool = True
    quantize_time_embedding: bool = True
    quantize_embedding_acts: bool = True
    skip: List[str] = field(default_factory=list)
    a8_layers: List[str] = field(default_factory=list)
    split_concat: bool = False
    lowrank_rank: Optional[int] = None
    lowrank_scope: Optional[str] = field(default=None, metadata={"choices": ", ".join(LOWRANK_SCOPES) + " or null"})
    lowrank_layers: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "quant.w_bits")
        if self.lowrank_rank is not None:
            check_rank(self.lowrank_rank, "quant.lowrank_rank")
        if self.lowrank_scope is not None:
            check_scope(self.lowrank_scope, "quant.lowrank_scope")
        for name in ("a_bits", "prob_bits", "first_last_bits"):
            v = getattr(self, name)
            if v is not None:
                check_bits(v, f"quant.{name}")

    @property
    def label(self) -> str:
        return f"W{self.w_bits}A{self.a_bits if self.a_bits is not None else 'FP'}"

    def resolve_lowrank(self, method_choice: LowRank = LowRank()) -> LowRank:
        """The branch this spec asks for: ``quant.lowrank_rank`` / ``lowrank_scope`` where set, the method's
        choice where not (a scope given without a rank takes the method's rank; a rank without a scope: all)."""
        if self.lowrank_rank is None:
            if self.lowrank_scope is not None and not method_choice.rank:
                raise ValueError(f"quant.lowrank_scope={self.lowrank_scope} names no branch: this method has none "
                                 "of its own, so set quant.lowrank_rank too")
            return LowRank(method_choice.rank, self.lowrank_scope or method_choice.scope)
        return LowRank(self.lowrank_rank, self.lowrank_scope or "all")


@dataclass(frozen=True)
class QuantConfig:
    """Runtime quantization settings of one student.

    Attributes:
        w_bits, a_bits, prob_bits, first_last_bits, quantize_attention, quantize_time_embedding,
        quantize_embedding_acts, skip, a8_layers, split_concat, lowrank_rank, lowrank_scope, lowrank_layers:
        as in :class:`QuantSpec`.
        timesteps: raw timesteps of the sampler schedule, one table row each (T = len); unique.
        shared_tables: one table shared by all steps (T = 1); ``timesteps`` may then be empty, and
            calls are not checked against them.
        tpq_knots: 0 = the paper's free per-step table; K ≥ 1 = the continuous form Δ(t) = Δ·exp(r(t)),
            z(t) = z + o(t) with r, o piecewise linear over K knots in raw t (dq.quant.knots).
    """

    w_bits: int = 4
    a_bits: int | None = 4
    timesteps: tuple[int, ...] = ()
    shared_tables: bool = False
    prob_bits: int | None = 8
    first_last_bits: int | None = 8
    quantize_attention: bool = True
    skip: tuple[str, ...] = ()
    quantize_time_embedding: bool = True
    quantize_embedding_acts: bool = True
    tpq_knots: int = 0
    a8_layers: tuple[str, ...] = ()
    split_concat: bool = False
    lowrank_rank: int = 0
    lowrank_layers: tuple[str, ...] = ()
    lowrank_scope: str = "all"

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        check_rank(self.lowrank_rank, "lowrank_rank")
        check_scope(self.lowrank_scope, "lowrank_scope")
        for name in ("a_bits", "prob_bits", "first_last_bits"):
            v = getattr(self, name)
            if v is not None:
                check_bits(v, name)
        try:
            ts = tuple(int(t) for t in self.timesteps)
        except (TypeError, ValueError) as e:
            raise ValueError(f"timesteps={self.timesteps!r} must be a sequence of integers") from e
        if not ts and not self.shared_tables:
            raise ValueError("timesteps is empty; give the sampler's raw timesteps, or set shared_tables=True")
        if len(set(ts)) != len(ts):
            raise ValueError(f"timesteps contain duplicates: {sorted({t for t in ts if ts.count(t) > 1})}")
        if self.tpq_knots and (self.shared_tables or not 1 <= self.tpq_knots <= len(ts)):
            raise ValueError(f"tpq_knots={self.tpq_knots} must be 0 (per-step table) or in 1..{len(ts)} (the sampler's "
                             f"steps), and needs per-step tables (shared_tables=False)")
        object.__setattr__(self, "timesteps", ts)
        object.__setattr__(self, "skip", tuple(str(s) for s in self.skip))
        object.__setattr__(self, "a8_layers", tuple(str(s) for s in self.a8_layers))
        object.__setattr__(self, "lowrank_layers", tuple(str(s) for s in self.lowrank_layers))

    @classmethod
    def from_spec(cls, spec: QuantSpec, timesteps: tuple[int, ...] | list[int], shared_tables: bool,
                  tpq_knots: int = 0, lowrank: LowRank | None = None) -> "QuantConfig":
        """``lowrank``: the branch to build (default: the spec's own, :meth:`QuantSpec.resolve_lowrank`)."""
        lowrank = spec.resolve_lowrank() if lowrank is None else lowrank
        fields = {k: v for k, v in asdict(spec).items() if k != "name"}
        fields.update(lowrank_rank=lowrank.rank, lowrank_scope=lowrank.scope)
        return cls(**{**fields, "skip": tuple(spec.skip), "a8_layers": tuple(spec.a8_layers),
                      "lowrank_layers": tuple(spec.lowrank_layers)},
                   timesteps=tuple(timesteps), shared_tables=shared_tables, tpq_knots=tpq_knots)

    @property
    def num_steps(self) -> int:
        return 1 if self.shared_tables else len(self.timesteps)
