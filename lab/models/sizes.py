"""Match any architecture to a parameter budget: the depth/width that lands within ±1% of a target
(`match_size`; the command is lab/sizing.py, and `size.target_params` uses it when a model is built).
Like lab.models.build, nothing here knows a family: the search moves the fields the arch node has. Depth
(`num_hidden_layers`) and the FFN width are solved in closed form, because a model's parameter count
is exactly linear in its depth and, at a fixed depth, in its FFN width; `hidden_size` and any other
varied integer field (e.g. a state size or expansion factor) are enumerated. Every count comes from
building the transformers model on the meta device (lab.models.arch.count_params_meta), so tied
embeddings, biases and norms are counted as built, never estimated.

Among the shapes inside the tolerance the one closest to the arch's own shape wins: depth:width
ratio first, then the FFN:width ratio and any other varied field, each measured in log space.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from lab import LabError
from lab.models.arch import apply_size, config_from_node, count_params_meta

DEPTH = "num_hidden_layers"
WIDTH = "hidden_size"
FFN_FIELDS = ("intermediate_size", "ffn_hidden_size")
_Q_HEADS = "num_attention_heads"
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
BASES = ("total", "non_embedding")
# How far the FFN may drift from its proportional width to close the last gap (log-space weight 1).
MAX_FFN_DRIFT = 0.15
# Widths searched around the shape-preserving estimate: [estimate / SPAN, estimate * SPAN].
WIDTH_SPAN = 1.6


@dataclass(frozen=True)
class SizeMatch:
    """The matched shape: arch field overrides and the parameter count they build."""

    overrides: dict[str, int]   # arch fields whose value changes (relative to the node given)
    params: int                 # count on `basis`
    total: int
    non_embedding: int
    target: float
    basis: str
    node: dict[str, Any] = field(repr=False, default_factory=dict)  # the full matched arch node

    @property
    def rel_error(self) -> float:
        return self.params / self.target - 1.0

    def hydra_overrides(self, prefix: str = "arch.") -> list[str]:
        return [f"{prefix}{key}={value}" for key, value in sorted(self.overrides.items())]


@dataclass(frozen=True)
class _Candidate:
    node: dict[str, Any]
    params: float            # predicted (exact once verified)
    score: float             # distance from the arch's own shape


def match_size(arch_node: Mapping[str, Any] | DictConfig, target_params: float, basis: str = "total",
               vary: Sequence[str] | None = None, tolerance: float = 0.01,
               width_multiple: int | None = None) -> SizeMatch:
    """Field overrides that bring `arch_node` within `tolerance` of `target_params` on `basis`.
    (Over 60 lines because of this docstring and the search's one loop; the loop's steps share its bounds.)

    arch_node: a resolved arch node (conf/arch/*.yaml inside the composed config, or after a size preset).
    basis: "total" (tied embeddings counted once) or "non_embedding".
    vary: the fields that may change. Default: depth, width and the FFN width, whichever the node has;
        the FFN follows the width in proportion and drifts at most ±15% to close the gap. Any other
        integer field (e.g. state_size, expand) may be added; it is searched over a grid of its value
        x {1/4, 1/2, 1, 2, 4} (or 1..8 for small factors). Head counts follow the width at a fixed head
        width, keeping the query:KV ratio; SSD heads follow expand · width / head_dim.
    width_multiple: widths are multiples of this (default: 64 at the full sizes, down to 8 for the tiny
        preset; at most an eighth of the node's width).
    """
    node = _plain(arch_node)
    if basis not in BASES:
        raise LabError(f"basis={basis!r}: expected one of {BASES}")
    try:
        target = float(target_params)
    except (TypeError, ValueError):
        raise LabError(f"target={target_params!r} is not a number (write e.g. 50e6)") from None
    if not target > 0:
        raise LabError(f"target={target_params!r} must be a positive parameter count")
    if not 0 < tolerance < 0.5:
        raise LabError(f"tolerance={tolerance} must be a fraction in (0, 0.5), e.g. 0.01 for ±1%")
    ffn = next((f for f in FFN_FIELDS if f in node), None)
    if vary is None:
        vary = tuple(f for f in (DEPTH, WIDTH, ffn) if f and f in node)
    vary = tuple(vary)
    bad = [f for f in vary if not isinstance(node.get(f), int) or isinstance(node.get(f), bool)]
    if bad:
        ints = sorted(k for k, v in node.items() if isinstance(v, int) and not isinstance(v, bool))
        raise LabError(f"cannot vary {bad}: not integer fields of this arch (it has {ints})")
    if not vary:
        raise LabError("vary is empty: name at least one field, e.g. vary=num_hidden_layers")

    counter = _Counter(basis)
    base = counter.count(node)
    if abs(base / target - 1) <= tolerance:
        return _result(node, node, counter, target, basis)

    widths = _widths(node, vary, target, counter, width_multiple) if WIDTH in vary else [node.get(WIDTH)]
    grids = {f: _grid(node[f]) for f in vary if f not in (DEPTH, WIDTH, ffn)}
    candidates: list[_Candidate] = []
    for width, values in itertools.product(widths, itertools.product(*grids.values())):
        shaped = _reshape(node, width, dict(zip(grids, values)))
        if shaped is None:
            continue
        candidates.extend(_solve(node, shaped, target, vary, ffn, counter))
    if not candidates:
        raise LabError(f"no valid shape for vary={list(vary)} (head widths or ratios cannot be kept)")

    inside = sorted((c for c in candidates if abs(c.params / target - 1) <= tolerance), key=lambda c: c.score)
    for cand in inside[:20]:  # predictions are exact for these families; verify anyway
        if abs(counter.count(cand.node) / target - 1) <= tolerance:
            return _result(node, cand.node, counter, target, basis)
    closest = min(candidates, key=lambda c: abs(c.params / target - 1))
    wider = ",".join(dict.fromkeys(f for f in (*vary, DEPTH, WIDTH, ffn) if f and f in node))
    raise LabError(
        f"no shape within ±{tolerance:.1%} of {target:,.0f} {basis} params varying {list(vary)}; closest: "
        f"{closest.params:,.0f} ({closest.params / target - 1:+.2%}) with "
        f"{ {k: v for k, v in closest.node.items() if node.get(k) != v} }. Let more fields vary "
        f"(e.g. vary={wider}) or widen the tolerance")


# -- search -------------------------------------------------------------------------------------------------


class _Counter:
    """Meta-device parameter counts, cached by the node's contents."""

    def __init__(self, basis: str):
        self.basis = basis

    def counts(self, node: Mapping[str, Any]) -> tuple[int, int]:
        return _counts(json.dumps(node, sort_keys=True))

    def count(self, node: Mapping[str, Any]) -> int:
        total, non_embedding = self.counts(node)
        return total if self.basis == "total" else non_embedding


@lru_cache(maxsize=4096)
def _counts(node_json: str) -> tuple[int, int]:
    params = count_params_meta(config_from_node(json.loads(node_json)))
    return params.total, params.non_embedding


def _solve(original: Mapping[str, Any], shaped: dict[str, Any], target: float, vary: Sequence[str],
           ffn: str | None, counter: _Counter) -> Iterable[_Candidate]:
    """Depths (and FFN widths) that land nearest the target for one width/grid point.

    params(L, F) = a + L * (b + s * (F - F0)) exactly, so three builds give a, b and s.
    """
    depth0 = shaped.get(DEPTH, 1)
    vary_depth = DEPTH in vary and DEPTH in shaped
    vary_ffn = ffn is not None and ffn in vary
    f0 = shaped.get(ffn) if ffn else None
    probe = {**shaped, DEPTH: 1} if DEPTH in shaped else dict(shaped)
    one = counter.count(probe)
    if DEPTH in shaped:
        two = counter.count({**shaped, DEPTH: 2})
        b, a = two - one, 2 * one - two
    else:  # no depth field: the count at this point is all there is
        a, b = one, 0
    s = 0.0
    if vary_ffn:
        step = _ffn_multiple(original[ffn])
        s = (counter.count({**probe, ffn: f0 + step}) - one) / step / (1 if DEPTH in shaped else depth0)

    if vary_depth and b > 0:
        ideal = (target - a) / b
        depths = range(max(1, math.floor(ideal) - 1), max(1, math.ceil(ideal) + 1) + 1)
    else:
        depths = [depth0]
    for depth in depths:
        node = {**shaped, DEPTH: depth} if DEPTH in shaped else dict(shaped)
        ffn_value = f0
        if vary_ffn and s > 0:
            step = _ffn_multiple(original[ffn])
            wanted = f0 + ((target - a) / depth - b) / s
            lo, hi = f0 * (1 - MAX_FFN_DRIFT), f0 * (1 + MAX_FFN_DRIFT)
            ffn_value = int(step * round(min(max(wanted, lo), hi) / step))
            node[ffn] = ffn_value
        params = a + depth * (b + s * ((ffn_value or 0) - (f0 or 0)))
        yield _Candidate(node, params, _score(original, node, ffn))


def _score(original: Mapping[str, Any], node: Mapping[str, Any], ffn: str | None) -> float:
    """Log-distance from the original shape: depth:width ratio, FFN:width ratio, other changed fields."""
    def ratio(n: Mapping[str, Any], key: str) -> float:
        return n[key] / n[WIDTH] if WIDTH in n else n[key]

    score = 0.0
    if DEPTH in node and WIDTH in node:
        score += abs(math.log(ratio(node, DEPTH) / ratio(original, DEPTH)))
    if ffn and WIDTH in node:
        score += abs(math.log(ratio(node, ffn) / ratio(original, ffn)))
    for key, value in node.items():
        if key not in (DEPTH, WIDTH, ffn) and isinstance(value, int) and not isinstance(value, bool) \
                and isinstance(original.get(key), int) and value > 0 and original[key] > 0:
            # head counts follow the width and are not choices; everything else is
            if key not in (_Q_HEADS, *_KV_HEADS, "num_heads"):
                score += abs(math.log(value / original[key]))
    return score


def _widths(node: Mapping[str, Any], vary: Sequence[str], target: float, counter: _Counter,
            multiple: int | None) -> list[int]:
    """Valid widths around the one where the shape at the arch's own depth:width ratio meets the target."""
    width0 = node[WIDTH]
    # hardware-friendly steps, but fine enough that small models still have several widths to try
    multiple = multiple or next((m for m in (64, 32, 16) if width0 % m == 0 and m <= width0 / 8), 8)
    valid = [w for w in range(multiple, 16 * width0 + 1, multiple) if _reshape(node, w, {}) is not None]
    if not valid:
        raise LabError(f"no width that is a multiple of {multiple} keeps this arch's head width and sharing")

    def count_at(width: int) -> int:
        shaped = _reshape(node, width, {})
        if DEPTH in node and DEPTH in vary:
            shaped[DEPTH] = max(1, round(node[DEPTH] * width / width0))
        return counter.count(shaped)

    lo, hi = 0, len(valid) - 1  # the first valid width whose proportional shape reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count_at(valid[mid]) < target else (lo, mid)
    estimate = valid[lo]
    near = set(valid[max(0, lo - 2): lo + 3])  # at least the neighbours, where valid widths are sparse
    return sorted(near | {w for w in valid if estimate / WIDTH_SPAN <= w <= estimate * WIDTH_SPAN})


def _grid(value: int) -> list[int]:
    if value <= 8:
        return list(range(1, 9))  # small factors (expansion, groups)
    return sorted({max(1, round(value * 2.0**k)) for k in range(-2, 3)})


def _reshape(node: Mapping[str, Any], width: int | None, fields: Mapping[str, int]) -> dict[str, Any] | None:
    """The node at a new width (heads at a fixed head width, FFN in proportion), or None if invalid."""
    out = {**node, **fields}
    if width is None or WIDTH not in node:
        return out if _valid(out, node) else None
    head_dim = node.get("head_dim") or (node[WIDTH] // node[_Q_HEADS] if node.get(_Q_HEADS) else None)
    if width != node[WIDTH] or fields:
        out = apply_size(out, {"name": "matched", WIDTH: width, **({"head_dim": head_dim} if head_dim else {})})
    for key in FFN_FIELDS:
        if key in node:  # proportional, on the arch's own rounding grid
            step = _ffn_multiple(node[key])
            out[key] = max(step, int(step * round(node[key] * width / node[WIDTH] / step)))
    return out if _valid(out, node) else None


def _valid(out: Mapping[str, Any], original: Mapping[str, Any]) -> bool:
    """Head widths stay whole and the query:KV ratio is kept (checked on the fields the node has)."""
    width = out.get(WIDTH)
    if width is None:
        return True
    if out.get(_Q_HEADS):
        q, q0 = out[_Q_HEADS], original[_Q_HEADS]
        if width % q or width // q != original[WIDTH] // q0:
            return False
        for kv in _KV_HEADS:
            if original.get(kv):
                if q * original[kv] != out[kv] * q0:  # same sharing ratio, exactly
                    return False
    if "num_heads" in out and "expand" in out and out.get("head_dim"):
        inner = out["expand"] * width
        if inner % out["head_dim"] or out["num_heads"] != inner // out["head_dim"]:
            return False
        if out["num_heads"] % out.get("n_groups", 1):
            return False
    return True


def _ffn_multiple(value: int) -> int:
    return 64 if value % 64 == 0 else 8


def _result(original: Mapping[str, Any], node: dict[str, Any], counter: _Counter, target: float,
            basis: str) -> SizeMatch:
    total, non_embedding = counter.counts(node)
    overrides = {k: v for k, v in node.items() if original.get(k) != v}
    return SizeMatch(overrides=overrides, params=total if basis == "total" else non_embedding, total=total,
                     non_embedding=non_embedding, target=target, basis=basis, node=node)


def _plain(arch_node: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    if isinstance(arch_node, DictConfig):
        try:
            node = OmegaConf.to_container(arch_node, resolve=True)
        except Exception as err:  # an interpolation outside this node (tokenizer, data) is not available
            raise LabError(f"cannot resolve the arch node ({err}); pass it from the composed config "
                           "(cfg.arch) so vocab_size and max_position_embeddings are set") from None
    else:
        node = dict(arch_node)
    unresolved = [k for k, v in node.items() if isinstance(v, str) and "${" in v]
    if unresolved:
        raise LabError(f"arch fields {unresolved} are unresolved interpolations; pass the composed cfg.arch")
    return node
