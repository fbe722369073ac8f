"""Masking is routing: the only place that knows which token group reads which (Zorro, section 3.1, eq. 1).

Zorro's masks are block-structured: every token belongs to a group (audio, fusion, video) and a mask only
ever says "group g may read group h". We keep that as a small table instead of an N x N boolean matrix.
With the token order [audio | fusion | video], every row of every table below reads one *contiguous*
slice of the sequence, so each query group's attention is one dense `scaled_dot_product_attention` call
on a slice: no mask tensor, flash/efficient kernels stay eligible, and the cross-modal blocks that the
mask would zero are never computed. `Routing.dense_mask` builds the equivalent boolean matrix; the tests
use it as the reference implementation. A custom table (`Routing(reads=...)`, masking "custom") may read
non-contiguous groups: those run through one masked call (FlexAttention block mask or SDPA with the dense
mask, see layers.RoutedAttention) instead of slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

# Token order. Chosen so that every read set of every masking is a contiguous run of groups.
GROUPS: tuple[str, ...] = ("audio", "fusion", "video")
_ALL = GROUPS

# {query group: groups it may read}. A group absent from a table has no tokens under that masking.
MASKINGS: dict[str, dict[str, tuple[str, ...]]] = {
    # Zorro (eq. 1): unimodal latents read only their own modality; fusion latents read everything.
    "zorro": {"audio": ("audio",), "fusion": _ALL, "video": ("video",)},
    # Two independent streams, no fusion latents (Table 3 "two streams").
    "two_streams": {"audio": ("audio",), "video": ("video",)},
    # Vanilla input-level fusion: full attention (Table 3 "input level").
    "input_level": {"audio": _ALL, "fusion": _ALL, "video": _ALL},
    # MBT-style bottleneck inside one transformer (Table 3 "bottleneck"): a modality reads itself and
    # the fusion latents, which read everything. Different from the separate-weights MBT baseline.
    "bottleneck": {"audio": ("audio", "fusion"), "fusion": _ALL, "video": ("fusion", "video")},
}

# The output decoder's queries use the same mechanism (section 3.1, "Output space"): audio, video and
# fusion outputs read only their group; the global output reads every token.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "audio": ("audio",),
    "video": ("video",),
    "fusion": ("fusion",),
    "global": _ALL,
}

# Outputs a masking keeps when not all of OUTPUTS. Table 3: "keeping the same number of outputs for fairness,
# except for the Two Streams which has two outputs": a `global` query reading both streams would be a learned
# late-fusion head the paper's two-streams baseline does not have.
MASKING_OUTPUTS: dict[str, tuple[str, ...]] = {"two_streams": ("audio", "video")}


@dataclass(frozen=True)
class TokenLayout:
    """Lengths of the token groups in a concatenated sequence, in GROUPS order."""

    lengths: tuple[int, ...]

    @classmethod
    def of(cls, **lengths: int) -> "TokenLayout":
        unknown = set(lengths) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown token groups {sorted(unknown)}; groups are {GROUPS}")
        return cls(tuple(int(lengths.get(g, 0)) for g in GROUPS))

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def span(self, group: str) -> tuple[int, int]:
        i = GROUPS.index(group)
        start = sum(self.lengths[:i])
        return start, start + self.lengths[i]

    def present(self) -> list[str]:
        return [g for g, n in zip(GROUPS, self.lengths) if n > 0]

    def spans(self) -> list[tuple[str, int, int]]:
        """(group, start, end) of every non-empty group, in sequence order."""
        return [(g, *self.span(g)) for g in self.present()]

    def key_span(self, groups: Sequence[str]) -> tuple[int, int]:
        """The slice covering `groups` (absent groups ignored); raises if it is not contiguous."""
        spans = [self.span(g) for g in groups if g in self.present()]
        if not spans:
            return 0, 0
        start, end = min(s for s, _ in spans), max(e for _, e in spans)
        if sum(e - s for s, e in spans) != end - start:
            raise ValueError(f"groups {tuple(groups)} are not contiguous in token order {GROUPS}")
        return start, end


@dataclass(frozen=True)
class Routing:
    """Who reads whom, for the self-attention of one masking (plus the layer where fusion joins)."""

    reads: Mapping[str, tuple[str, ...]]
    name: str = "custom"

    @classmethod
    def from_masking(cls, masking: str, reads: Mapping[str, Sequence[str]] | None = None) -> "Routing":
        """A named masking of MASKINGS, or masking "custom" with its table `reads` ({query group: [key groups]})."""
        if masking == "custom":
            if not reads:
                raise ValueError("masking 'custom' needs a routing table, e.g. "
                                 "reads={audio: [audio], fusion: [audio, fusion, video], video: [video]}")
            return cls(reads=reads, name="custom")
        if reads:
            raise ValueError(f"a routing table (reads) is only used with masking 'custom', not {masking!r}")
        if masking not in MASKINGS:
            raise ValueError(f"unknown masking {masking!r}; choose one of {sorted(MASKINGS)} or 'custom'")
        return cls(reads=MASKINGS[masking], name=masking)

    def __post_init__(self):
        if not isinstance(self.reads, Mapping) or not self.reads:
            raise ValueError(f"routing table must be a non-empty mapping {{query group: [key groups]}}, "
                             f"got {self.reads!r}")
        reads = {}
        for q, keys in self.reads.items():
            keys = (keys,) if isinstance(keys, str) else tuple(keys)
            if q not in GROUPS or any(k not in GROUPS for k in keys):
                raise ValueError(f"routing row {q!r}: {list(keys)} names a group outside {GROUPS}")
            if q not in keys:
                raise ValueError(f"routing row {q!r}: group {q!r} must read itself, got {list(keys)}")
            silent = [k for k in keys if k not in self.reads]
            if silent:
                raise ValueError(f"routing row {q!r} reads {silent}, which have no row (no tokens) in the table")
            reads[q] = tuple(g for g in GROUPS if g in keys)  # token order: equal tables compare equal
        object.__setattr__(self, "reads", {g: reads[g] for g in GROUPS if g in reads})

    @property
    def has_fusion(self) -> bool:
        return "fusion" in self.reads

    def isolated(self, group: str) -> bool:
        """Whether `group`'s tokens depend on no other group, through any number of layers (the closure of
        its reads is itself): zorro and two_streams isolate audio and video; bottleneck and input_level do not.
        An isolated modality's own output is then exactly the same with or without the other modality."""
        seen, todo = set(), [group]
        while todo:
            g = todo.pop()
            if g in seen or g not in self.reads:
                continue
            seen.add(g)
            todo += self.reads[g]
        return seen <= {group}

    @property
    def key(self) -> tuple:
        """A hashable identity of the table (for caching masks)."""
        return tuple(self.reads.items())

    def is_contiguous(self, layout: TokenLayout) -> bool:
        """Whether every present group reads one contiguous slice of `layout` (what per-slice SDPA needs)."""
        try:
            for group in layout.present():
                layout.key_span(self.reads.get(group, ()))
        except ValueError:
            return False
        return True

    def attention_calls(self, layout: TokenLayout) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """[(query slice, key slice)] covering every token once, in sequence order.

        Adjacent query groups that read the same key slice share one call (input_level: a single call).
        """
        self.check_layout(layout)
        calls: list[tuple[tuple[int, int], tuple[int, int]]] = []
        for group, start, end in layout.spans():
            try:
                keys = layout.key_span(self.reads[group])
            except ValueError:
                raise ValueError(f"masking {self.name!r}: {group!r} reads {list(self.reads[group])}, not one "
                                 f"contiguous slice of {GROUPS}; per-slice attention cannot run it, use "
                                 f"attention_backend flex or dense_mask (auto picks one)") from None
            if calls and calls[-1][1] == keys and calls[-1][0][1] == start:
                calls[-1] = ((calls[-1][0][0], end), keys)
            else:
                calls.append(((start, end), keys))
        return calls

    def check_layout(self, layout: TokenLayout) -> None:
        """Every group with tokens must have a row (two_streams has no fusion latents to route)."""
        for group, start, end in layout.spans():
            if group not in self.reads:
                raise ValueError(f"masking {self.name!r} has no {group!r} tokens, but the input has {end - start}")

    def attended_pairs(self, layout: TokenLayout) -> int:
        """(query, key) pairs the routing lets attend: the attention-core work of any exact backend."""
        lengths = dict(zip(GROUPS, layout.lengths))
        return sum(lengths[q] * sum(lengths[k] for k in keys) for q, keys in self.reads.items())

    def dense_mask(self, layout: TokenLayout, device=None):
        """The equivalent N x N boolean mask (True = may attend); the reference the tests compare with."""
        import torch

        self.check_layout(layout)
        mask = torch.zeros(layout.total, layout.total, dtype=torch.bool, device=device)
        for group, start, end in layout.spans():
            for key_group in self.reads[group]:
                ks, ke = layout.span(key_group)
                mask[start:end, ks:ke] = True
        return mask


def isolated_outputs(routing: Routing, names: Sequence[str]) -> tuple[str, ...]:
    """The unimodal outputs among `names` whose modality never reads the other one (zorro, two_streams): they
    are exactly the same with or without the other modality."""
    return tuple(m for m in ("audio", "video") if m in names and routing.isolated(m))


def output_names(routing: Routing, present: Sequence[str] = GROUPS) -> tuple[str, ...]:
    """Outputs a backbone produces: those whose read set has tokens, limited to MASKING_OUTPUTS[masking]
    (two_streams: audio and video only)."""
    groups = [g for g in present if g in routing.reads]
    kept = MASKING_OUTPUTS.get(routing.name, tuple(OUTPUTS))
    return tuple(name for name, reads in OUTPUTS.items() if name in kept and any(g in groups for g in reads))
