"""AdaViT (Meng et al., CVPR 2022): per image, learned gates choose which heads, sub-layers and tokens run.

Facts from the authors' code (MengLcool/AdaViT, ``models/ada_transformer_block.py`` and
``models/losses.py``), as summarised in ``shared/METHODS.md``: before each block a light decision
network reads the block input's CLS token and gives one logit per attention head and one per residual
sub-layer (attention, MLP); a per-token linear layer gives one logit per patch token. In training every
gate is a hard Gumbel-sigmoid sample (temperature 5, threshold 0.5) with a straight-through gradient; at
inference ``sigmoid(logit) > threshold``. Usage losses pull the mean use of heads, sub-layers and tokens
to targets (``|mean - target|`` plus 0.1 times the same per head / per sub-layer, the "diverse" term;
squared for tokens); the authors also subtract a small entropy bonus, which tokenopt leaves out.
The released code multiplies skipped heads' weights and skipped blocks' outputs by zero: the work
is still done.

tokenopt's form:

* gates (heads, attention, MLP) are a :class:`~tokenopt.ir.Gate` on the block input (site
  ``pre_block``), from a LayerNorm and a linear layer on the CLS token (the mean token when the model
  has none). Training (masked): each part's output is multiplied by its gate. Inference (padded or
  packed): a sub-layer runs only on the images whose gate is on (``tokenopt::gate_rows`` gathers them,
  their output is added back by index) and attention only on the (image, head) pairs that are on
  (``tokenopt::head_attention``); one host read each (how many run).
* tokens: at ``token_blocks`` (after the block) a LayerNorm and linear layer score each patch token;
  a token whose gate is off leaves for good (tokenopt's choice: the authors' per-block token gates let a
  token come back in a later block, which keeps every token in memory; a token that leaves the packed
  buffer frees its work in every later block). Training: :class:`~tokenopt.ir.Mask` (the dropped tokens
  are masked out of later attention); inference: an adaptive :class:`~tokenopt.ir.Keep` (packed).
* the decision networks start with their gates on (bias +3, tokenopt's choice, so fine-tuning a trained
  model starts from the model itself rather than from half of it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from tokenopt.ir import Gate, Keep, Mask
from tokenopt.passes.realize import RewriteError
from tokenopt.policies._checks import check_blocks
from tokenopt.policies.base import PolicyConfig, register_policy

__all__ = ["AdaViT", "GateNet", "adavit_losses", "calibrate_usage"]

aten = torch.ops.aten
tk = torch.ops.tokenopt


class GateNet(nn.Module):
    """A decision network: LayerNorm and a linear layer, ``[..., C] -> [..., outputs]`` logits, with the
    bias starting at ``init`` (gates on)."""

    def __init__(self, dim: int, outputs: int, init: float = 3.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, outputs)
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.constant_(self.fc.bias, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def _logit(p: float) -> float:
    """``log(p / (1 - p))``: the logit at which ``sigmoid`` crosses ``p``."""
    return math.log(p / (1 - p))


def _share(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"adavit: {name} must be a share in (0, 1]; got {value!r}. Example: {name}=0.7")
    return float(value)


@register_policy
@dataclasses.dataclass(frozen=True)
class AdaViT(PolicyConfig):
    """Learned per-image use of heads, sub-layers and tokens.

    Args:
        heads, layers, tokens: which gates to learn (attention heads; the attention and MLP sub-layers;
            patch tokens).
        head_target, layer_target: the mean use of gated heads / sub-layers the usage loss pulls to.
        token_target: the share of the current patch tokens each token stage keeps (compounding: stage
            ``s`` targets ``token_target ** s`` of the model's patches).
        blocks: the gated blocks (0-based); default every block but the first (AdaViT keeps its first
            block whole).
        token_blocks: token gates after these blocks; default ``round(depth * s / 4) - 1``, s = 1, 2, 3.
        tau, threshold: Gumbel-sigmoid temperature (training) and the gate threshold (5.0 and 0.5).
        head_threshold, layer_threshold, token_threshold: inference thresholds for one kind of gate
            (None: ``threshold``); e.g. drop more tokens while keeping heads: ``token_threshold=0.75``.
        usage_weight, diverse_weight: weights of the usage losses and of their per-gate ("diverse")
            terms (AdaViT: 2.0 and 0.1).
        calibrate: after training, ``tokenopt train`` shifts each gate so that inference uses what training
            used (:func:`calibrate_usage`; tokenopt's addition, for fine-tunes too short for the logits to
            spread). False: the gates as trained.

    Example:
        >>> import tokenopt
        >>> tokenopt.AdaViT().default_blocks(4)
        [1, 2, 3]
    """

    heads: bool = True
    layers: bool = True
    tokens: bool = True
    head_target: float = 0.7
    layer_target: float = 0.8
    token_target: float = 0.7
    blocks: Optional[tuple[int, ...]] = None
    token_blocks: Optional[tuple[int, ...]] = None
    tau: float = 5.0
    threshold: float = 0.5
    head_threshold: Optional[float] = None
    layer_threshold: Optional[float] = None
    token_threshold: Optional[float] = None
    usage_weight: float = 2.0
    diverse_weight: float = 0.1
    calibrate: bool = True
    name = "adavit"
    site = "pre_block"
    adaptive = True
    decides_differently_in_training = True

    def __post_init__(self):
        for field in ("heads", "layers", "tokens", "calibrate"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"adavit: {field} must be True or False; got {getattr(self, field)!r}")
        if not (self.heads or self.layers or self.tokens):
            raise ValueError("adavit: nothing to learn: heads, layers and tokens are all False")
        for field in ("head_target", "layer_target", "token_target"):
            object.__setattr__(self, field, _share(field, getattr(self, field)))
        for field in ("threshold", "head_threshold", "layer_threshold", "token_threshold"):
            value = getattr(self, field)
            if field != "threshold" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"adavit: {field} must be in (0, 1); got {value!r}. Example: {field}=0.6")
            object.__setattr__(self, field, float(value))
        for field in ("tau", "usage_weight", "diverse_weight"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or field == "tau" and value == 0:
                raise ValueError(f"adavit: {field} must be a number {'> 0' if field == 'tau' else '>= 0'}; got {value!r}")
        object.__setattr__(self, "blocks", check_blocks(self.name, self.blocks))
        object.__setattr__(self, "token_blocks", check_blocks(self.name, self.token_blocks))

    def default_blocks(self, depth):
        return list(range(1, depth))

    def default_token_blocks(self, depth):
        return sorted({max(0, round(depth * s / 4) - 1) for s in (1, 2, 3)} - {depth - 1})

    def default_mode(self):
        return "packed"

    def token_stages(self, depth: int) -> list[int]:
        if not self.tokens:
            return []
        chosen = self.token_blocks if self.token_blocks is not None else self.default_token_blocks(depth)
        return sorted({b if b >= 0 else depth + b for b in chosen})

    def plan(self, depth, blocks):
        gates = [(b, "pre_block", self.decide) for b in sorted(set(blocks))] if self.heads or self.layers else []
        return gates + [(b, "post_block", self.decide_tokens) for b in self.token_stages(depth)]

    # -- decisions ---------------------------------------------------------------------------------
    def cut(self, kind: str) -> float:
        """The logit above which a gate of ``kind`` ("heads", "layers", "tokens") is on at inference:
        ``sigmoid(logit) > threshold``, with the kind's own threshold where one is set."""
        own = {"heads": self.head_threshold, "layers": self.layer_threshold, "tokens": self.token_threshold}[kind]
        return _logit(self.threshold if own is None else own)

    def _gumbel(self, ctx, logits):
        """Training: hard Gumbel-sigmoid gates (float, straight-through) at ``threshold``."""
        e1 = ctx.call(aten.exponential.default, ctx.call(aten.empty_like.default, logits))
        e2 = ctx.call(aten.exponential.default, ctx.call(aten.empty_like.default, logits))
        noise = ctx.call(aten.sub.Tensor, ctx.call(aten.log.default, e2), ctx.call(aten.log.default, e1))
        return ctx.call(tk.gumbel_gate.default, logits, noise, float(self.tau), float(self.threshold))

    def _sample(self, ctx, logits, kind: str):
        """Training: :meth:`_gumbel`. Inference: ``sigmoid > threshold`` (the kind's own, :meth:`cut`)."""
        return self._gumbel(ctx, logits) if ctx.training else ctx.call(aten.gt.Scalar, logits, self.cut(kind))

    def decide(self, ctx):
        """The gates of one block, from its input's CLS token (mean token without one)."""
        if ctx.num_prefix:
            summary = ctx.prefix_token(0)
        else:
            x, valid = ctx.dense_tokens()
            summary = ctx.call(tk.weighted_mean.default, x, valid, None, 0, None)
        h = ctx.block.attention.num_heads if self.heads else 0
        net = ctx.module(f"gate{ctx.block.index}", lambda: GateNet(ctx.width, h + (2 if self.layers else 0)))
        logits = ctx.call_module(net, summary, role="gate.logits")  # [B, H + 2]
        # training: one Gumbel sample for every gate of the block, then its parts; inference: each part's
        # logits against its kind's own threshold
        src = self._gumbel(ctx, logits) if ctx.training else logits

        def part(op, args, kind, role):
            if ctx.training:
                return ctx.call(op, src, *args, role=role)
            return ctx.call(aten.gt.Scalar, ctx.call(op, src, *args), self.cut(kind), role=role)

        heads = part(aten.slice.Tensor, (1, 0, h), "heads", "gate.heads") if h else None
        attn = part(aten.select.int, (1, h), "layers", "gate.attn") if self.layers else None
        mlp = part(aten.select.int, (1, h + 1), "layers", "gate.mlp") if self.layers else None
        if ctx.training:
            if heads is not None:
                ctx.aux("heads", heads)
            if self.layers:
                ctx.aux("layers", ctx.call(aten.slice.Tensor, src, 1, h, h + 2))
        return Gate(heads=heads, attn=attn, mlp=mlp)

    def decide_tokens(self, ctx):
        """Token gates after the block: a token whose gate is off leaves."""
        if ctx.block.index == ctx.depth - 1:
            raise RewriteError(f"adavit: block {ctx.block.index} is the last block; no block runs after it on fewer "
                               "tokens. Choose earlier token_blocks, e.g. token_blocks=(2, 5, 8)")
        stage = self.token_stages(ctx.depth).index(ctx.block.index)
        p = ctx.num_prefix
        net = ctx.module(f"tokens{stage}", lambda: GateNet(ctx.width, 1))
        if ctx.packed:  # the network is per token: score the packed rows (no padding), then lay the scores out
            scores, valid = ctx.dense_tokens(ctx.call_module(net, ctx.x, role="tokens.score"))  # [B, L, 1]
            scores = ctx.call(aten.slice.Tensor, scores, 1, p, None)
        else:
            x, valid = ctx.dense_tokens()
            scores = ctx.call_module(net, ctx.call(aten.slice.Tensor, x, 1, p, None), role="tokens.score")
        logits = ctx.call(aten.squeeze.dim, scores, -1, role="tokens.logits")  # [B, Np], as alive
        gate = self._sample(ctx, logits, "tokens")
        if ctx.training:
            weights = ctx.token_weights()
            if weights is not None:  # once dropped, dropped
                gate = ctx.call(aten.mul.Tensor, gate, ctx.call(aten.slice.Tensor, weights, 1, p, None))
            ctx.aux("tokens", gate)
            if p:
                ones = ctx.call(aten.new_ones.default, gate, [ctx.call(aten.sym_size.int, gate, 0), p])
                gate = ctx.call(aten.cat.default, [ones, gate], 1)
            return Mask(gate)
        if valid is not None:
            alive = ctx.call(aten.slice.Tensor, valid, 1, p, None, role="tokens.alive")
            gate = ctx.call(aten.logical_and.default, gate, alive)
        sel = ctx.call(tk.keep_select.default, gate, p, role="tokens.select")
        idx, keep = ctx.call.items(sel, 2, roles=("tokens.idx", "tokens.valid"))
        return Keep(idx, ctx.length, valid=keep)

    def after_training(self, module, images: torch.Tensor) -> Optional[list[dict]]:
        """Called by ``tokenopt train`` once training ends: :func:`calibrate_usage` on training images
        (when ``calibrate``)."""
        return calibrate_usage(module, images) if self.calibrate else None

    def training_losses(self, aux: dict) -> dict:
        return adavit_losses(self, list(aux.get("heads", ())), list(aux.get("layers", ())), list(aux.get("tokens", ())))


def adavit_losses(config: AdaViT, heads: list, layers: list, tokens: list) -> dict[str, torch.Tensor]:
    """AdaViT's usage losses (weighted by ``usage_weight``; ``diverse_weight`` on the per-gate terms):

    * heads ``[B, H]`` per gated block: ``|mean use - head_target|`` over the blocks whose attention ran,
      plus the same per (block, head);
    * sub-layers ``[B, 2]``: ``|mean use - layer_target|`` plus the same per (block, sub-layer);
    * tokens ``[B, Np]`` per stage ``s``: ``(mean kept share - token_target ** s) ** 2``.
    """
    losses: dict[str, torch.Tensor] = {}
    w, dw = config.usage_weight, config.diverse_weight
    if layers:
        use = torch.stack([g.float() for g in layers], dim=1)  # [B, blocks, 2]
        losses["layers"] = w * ((use.mean() - config.layer_target).abs()
                                + dw * (use.mean(dim=0) - config.layer_target).abs().mean())
    if heads:
        use = torch.stack([g.float() for g in heads], dim=1)  # [B, blocks, H]
        ran = (torch.stack([g[:, 0] for g in layers], dim=1).detach() > 0.5).float()[..., None].expand_as(use) \
            if layers else torch.ones_like(use)
        eps = 1e-6
        mean = (use * ran).sum() / (ran.sum() + eps)
        per = (use * ran).sum(dim=0) / (ran.sum(dim=0) + eps)
        losses["heads"] = w * ((mean - config.head_target).abs() + dw * (per - config.head_target).abs().mean())
    if tokens:
        losses["tokens"] = w * sum((t.float().mean() - config.token_target ** (s + 1)) ** 2
                                   for s, t in enumerate(tokens)) / len(tokens)
    return losses


@torch.no_grad()
def calibrate_usage(gm: torch.nn.Module, images: torch.Tensor, batch: int = 256,
                    shares: Optional[dict[str, float]] = None) -> list[dict]:
    """Make AdaViT's inference gates use what training used: shift each gate's bias so that, on ``images``,
    the share of images (heads, sub-layers) or of live tokens (token gates) whose gate is on at inference
    (``sigmoid(logit) > threshold``) equals the share on in training, ``mean(sigmoid(logit))``.

    Why: in training every gate is a Gumbel-sigmoid sample, on with probability ``sigmoid(logit)``, and the
    usage losses pull that probability to its target; at inference the gate is on when ``sigmoid(logit) >
    threshold``. The two agree only once the logits have spread far from the threshold (AdaViT trains for
    100+ epochs). After a short fine-tune they have not: measured on a dim-64 Fashion-MNIST ViT after two
    epochs, training used about 70% of heads while inference used 100% of every gate. A shift per gate
    output (one number: its decision network's bias) moves the threshold to the matching quantile of the
    logits; the ranking of images, heads and tokens, which the network learnt, stays as it is.

    ``gm``: a graph with AdaViT's decision networks (``optimize(..., policy="adavit")`` or a training
    module: they share the networks, so both change). The gates are calibrated in graph order, each on the
    decisions of the gates before it already calibrated. ``shares`` (``{"heads" | "layers" | "tokens":
    share in (0, 1]}``) sets the share on for that kind of gate instead of the training share (benchmarks:
    a chosen use). Returns, per decision network and output, ``{"module", "output", "expected", "before",
    "after", "shift"}`` (shares on: wanted, before and after).
    """
    from tokenopt.ir import META_ROLE
    from tokenopt.passes.patterns import record

    graph = gm.eval_graph if hasattr(gm, "eval_graph") else gm
    if images.shape[0] == 0:
        raise ValueError("calibrate_usage: no images; pass a batch of inputs like the model's")
    nodes = [n for n in graph.graph.nodes if n.op == "call_module" and isinstance(graph.get_submodule(n.target), GateNet)]
    if not nodes:
        raise ValueError("calibrate_usage: this graph has no AdaViT decision networks; build it with policy='adavit'")
    order = {n: i for i, n in enumerate(graph.graph.nodes)}
    alive_nodes = [n for n in graph.graph.nodes if n.meta.get(META_ROLE) == "tokens.alive"]
    token_logits = [n for n in graph.graph.nodes if n.meta.get(META_ROLE) == "tokens.logits"]
    config = graph.meta.get("tokenopt.policy")
    if not isinstance(config, AdaViT):
        raise ValueError(f"calibrate_usage: the graph's policy is {config!r}, not AdaViT")
    shares = dict(shares or {})
    for kind, share in shares.items():
        if kind not in ("heads", "layers", "tokens"):
            raise ValueError(f"calibrate_usage: shares has {kind!r}; the kinds of gate are heads, layers and tokens")
        _share(f"shares[{kind!r}]", share)
    train_cut = _logit(config.threshold)  # training: on when logit + noise > tau * train_cut
    report = []
    for k, node in enumerate(nodes):
        end = order[nodes[k + 1]] if k + 1 < len(nodes) else len(order)
        alive = next((a for a in alive_nodes if order[node] < order[a] < end), None)
        # a token gate's logits as laid out per image ([B, Np], like alive; packed rows are scored unpadded)
        src = node if node.meta.get(META_ROLE) != "tokens.score" else \
            next(a for a in token_logits if order[node] < order[a] < end)
        logits, live = [], []
        for chunk in images.split(batch):
            env = record(graph, {src, alive} - {None}, chunk)
            out = env[src]
            logits.append(out.reshape(-1, 1 if src is not node else out.shape[-1]).float())
            live.append(env[alive].reshape(-1) if alive is not None else torch.ones(logits[-1].shape[0], dtype=torch.bool))
        logits = torch.cat(logits)[torch.cat(live)]
        net = graph.get_submodule(node.target)
        layers = 2 if config.layers and node.meta.get(META_ROLE) == "gate.logits" else 0
        for j in range(logits.shape[1]):
            kind = "tokens" if node.meta.get(META_ROLE) == "tokens.score" else "heads" if j < logits.shape[1] - layers else "layers"
            col = logits[:, j] - config.cut(kind)  # on at inference: col > 0
            # training: P(sigmoid((l + noise) / tau) > threshold)
            expected = torch.tensor(shares[kind]) if kind in shares else torch.sigmoid(logits[:, j] - config.tau * train_cut).mean()
            if not col.numel():
                shift = col.new_zeros(())
            elif expected >= 1:  # all on: strictly above the lowest
                shift = col.min() - 1
            else:
                shift = torch.quantile(col, float(1 - expected))
            net.fc.bias[j] -= shift
            report.append({"module": node.target, "output": j, "expected": float(expected),
                           "before": float((col > 0).float().mean()), "after": float((col - shift > 0).float().mean()),
                           "shift": float(-shift)})
    return report

