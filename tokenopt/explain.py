"""Inspection: what tokenopt found in a model and what it changed, as rich tables and graph listings."""

from __future__ import annotations

from collections import Counter
from typing import Optional

import torch.fx as fx
from rich.columns import Columns
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tokenopt.flops import node_flops
from tokenopt.ir import META_BLOCK, META_PROVENANCE, MODEL_INFO, ModelInfo

__all__ = ["block_stats", "explain", "block_listing", "token_counts", "gate_usage"]


def _tokens(node: fx.Node) -> Optional[int]:
    tm = node.meta.get("tensor_meta")
    return int(tm.shape[1]) if tm is not None and len(tm.shape) >= 2 else None


def _per_image(gm: fx.GraphModule, b) -> tuple[Optional[str], Optional[str]]:
    """Tokens per image into and out of block ``b`` on the example inputs, as text.

    Read from ``gm.meta["tokenopt.example_token_counts"]`` (written by optimize) when present, so
    per-image counts show as "mean (min-max)" and packed buffers are not mistaken for one image.
    """
    counts = gm.meta.get("tokenopt.example_token_counts")
    if counts is None:
        t_in, t_out = _tokens(b.x_in), _tokens(b.x_out)
        return (None if t_in is None else str(t_in)), (None if t_out is None else str(t_out))

    def fmt(c):
        lo, hi = int(c.min()), int(c.max())
        return str(lo) if lo == hi else f"{c.float().mean():.1f} ({lo}-{hi})"

    before = counts.get(b.index - 1)
    t_in = fmt(before) if before is not None else str(gm.meta[MODEL_INFO].num_tokens)
    return t_in, fmt(counts[b.index])


def block_stats(gm: fx.GraphModule) -> list[dict]:
    """Per-block rows: tokens in and out, FLOPs and inserted nodes counted by pass.

    Token counts and FLOPs are read from the shapes of the last ShapeProp run (the example inputs for
    a model from :func:`tokenopt.optimize`); the row ``"rest"`` holds everything outside the blocks.
    """
    info: ModelInfo = gm.meta[MODEL_INFO]
    flops: Counter = Counter()
    inserted: dict[int, Counter] = {}
    for node in gm.graph.nodes:
        blk = node.meta.get(META_BLOCK, -1)
        flops[blk] += node_flops(node)
        prov = node.meta.get(META_PROVENANCE)
        if prov:
            inserted.setdefault(blk, Counter())[prov.get("pass", "?")] += 1
    gates = {d["block"]: [p for p in ("heads", "attn", "mlp") if d.get(p)]
             for d in gm.meta.get("tokenopt.decisions", []) if d["kind"] == "gate"}
    rows = []
    for b in info.blocks:
        tokens_in, tokens_out = _per_image(gm, b)
        rows.append({
            "block": b.index,
            "module": b.module_path,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "heads": b.attention.num_heads,
            "gates": gates.get(b.index, []),
            "flops": flops[b.index],
            "inserted": dict(inserted.get(b.index, {})),
        })
    rows.append({"block": "rest", "module": "", "tokens_in": None, "tokens_out": None, "heads": None, "gates": [],
                 "flops": flops[-1], "inserted": dict(inserted.get(-1, {}))})
    return rows


def _short(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_short(x) for x in a) + "]"
    return repr(a)


def format_node(node: fx.Node) -> str:
    """``name = op(args) -> shape``: one line a person can scan."""
    target = getattr(node.target, "__name__", str(node.target))
    if hasattr(node.target, "_schema"):
        target = str(node.target).replace(".default", "")
    args = ", ".join([_short(a) for a in node.args] + [f"{k}={_short(v)}" for k, v in node.kwargs.items()])
    tm = node.meta.get("tensor_meta")
    shape = f"  # {list(tm.shape)}" if tm is not None and hasattr(tm, "shape") else ""
    return f"{node.name} = {target}({args}){shape}"


def block_listing(gm: fx.GraphModule, index: int) -> str:
    """The nodes of block ``index``, one per line; nodes inserted by a pass are marked ``+``."""
    lines = []
    for node in gm.graph.nodes:
        if node.meta.get(META_BLOCK) == index and node.op == "call_function":
            mark = "+" if node.meta.get(META_PROVENANCE) else " "
            lines.append(f"{mark} {format_node(node)}")
    return "\n".join(lines)


def explain(gm: fx.GraphModule, block: Optional[int] = None, *, console: Optional[Console] = None) -> str:
    """Print a per-block report of ``gm`` and return it as plain text.

    Args:
        gm: a GraphModule from :func:`tokenopt.optimize` (or one :func:`find_blocks` has analysed).
        block: also show this block's graph before (as captured) and after the passes, side by side.
        console: where to print; a new rich console on stdout when omitted.

    Example:
        >>> import io, timm, tokenopt
        >>> from rich.console import Console
        >>> gm = tokenopt.optimize(timm.create_model("deit_tiny_patch16_224", depth=2), policy="none")
        >>> text = tokenopt.explain(gm, block=0, console=Console(file=io.StringIO(), width=200))
        >>> "block 0 as captured" in text
        True
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"tokenopt.explain takes what tokenopt.optimize returned (or a captured graph); got "
                        f"{type(gm).__name__}. Example: tokenopt.explain(tokenopt.optimize(model, policy='tome'))")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int)):
        raise TypeError(f"block must be a block index (an int); got {block!r}")
    if MODEL_INFO not in gm.meta:
        from tokenopt.passes import find_blocks

        find_blocks(gm)
    info: ModelInfo = gm.meta[MODEL_INFO]
    examples = gm.meta.get("tokenopt.example_inputs")
    if examples and not any("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
        # (a loaded graph carries no shapes of its own run: propagate the example inputs saved with it)
        import torch
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(*examples)
    rows = block_stats(gm)
    base = gm.meta.get("tokenopt.baseline_flops")
    total = sum(r["flops"] for r in rows)
    policy = gm.meta.get("tokenopt.policy")

    realized = gm.meta.get("tokenopt.counters", {}).get("realize_tokens")
    mode = f"  mode={realized['mode']}" if realized else ""
    table = Table(title=f"tokenopt: {gm.meta.get('tokenopt.source', 'model')}  policy={policy!r}{mode}")
    for col, just in [("block", "right"), ("module", "left"), ("tokens in", "right"), ("tokens out", "right"),
                      ("heads", "right"), ("gated (per image)", "left"), ("GFLOPs", "right"),
                      ("inserted nodes (by pass)", "left")]:
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(
            str(r["block"]), r["module"],
            "" if r["tokens_in"] is None else str(r["tokens_in"]),
            "" if r["tokens_out"] is None else str(r["tokens_out"]),
            "" if r["heads"] is None else str(r["heads"]),
            ", ".join(r["gates"]),
            f"{r['flops'] / 1e9:.3f}",
            ", ".join(f"{k}: {v}" for k, v in sorted(r["inserted"].items())),
        )
    batch = next((n.meta["tensor_meta"].shape[0] for n in gm.graph.nodes
                  if n.op == "placeholder" and "tensor_meta" in n.meta), None)
    summary = Text(
        f"{len(info.blocks)} blocks, {info.num_prefix_tokens} prefix + {info.num_patch_tokens} patch tokens, "
        f"head reads {', '.join(r.kind + ('' if r.index is None else f'[{r.index}]') for r in info.head_readers)}; "
        f"total {total / 1e9:.3f} GFLOPs at batch {batch}"
        + (f" ({total / base:.2f}x of the unmodified model)" if base else "")
    )
    parts = [table, summary]
    for note in ([f"not recognised (runs as captured): {gm.meta['tokenopt.not_recognised']}"]
                 if gm.meta.get("tokenopt.not_recognised") else []) + list(gm.meta.get("tokenopt.coverage") or []):
        parts.append(Text(f"note: {note}", style="yellow"))
    if block is not None:
        if -len(info.blocks) <= block < 0:  # as optimize(blocks=...) reads it: -1 is the last block
            block += len(info.blocks)
        if not 0 <= block < len(info.blocks):
            raise IndexError(f"block {block} does not exist; the model has blocks 0..{len(info.blocks) - 1}")
        before = gm.meta.get("tokenopt.captured_blocks", {}).get(block, "(not recorded)")
        parts.append(Columns([
            Panel(Text(before), title=f"block {block} as captured"),
            Panel(Text(block_listing(gm, block)), title=f"block {block} after passes (+ inserted)"),
        ]))
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
            console = Console(width=150)
    with console.capture() as cap:
        console.print(Group(*parts))
    text = cap.get()
    console.print(Group(*parts))
    return text


def _graph_for(gm, inputs: tuple, what: str) -> fx.GraphModule:
    """The graph that runs ``inputs``: ``gm``, or its graph for another image size (a size-generic model), after
    the checks ``gm(*inputs)`` makes, so misuse gets the same clear error as a call."""
    from tokenopt.module import OptimizedModule

    if not isinstance(gm, fx.GraphModule) or MODEL_INFO not in gm.meta:
        raise TypeError(f"tokenopt.{what} takes what tokenopt.optimize returned; got {type(gm).__name__}")
    if not inputs:
        raise TypeError(f"tokenopt.{what}(gm, *inputs): give the inputs to run, e.g. tokenopt.{what}(gm, x)")
    if isinstance(gm, OptimizedModule):
        variant = gm.for_size(inputs)
        if variant is not None:
            return variant
        gm.check_inputs(inputs)
    return gm


def token_counts(gm: fx.GraphModule, *inputs) -> dict[int, "torch.Tensor"]:
    """Run ``gm`` on ``inputs`` and return, per block, how many real tokens each image has after it.

    Returns:
        ``{block index: LongTensor [B]}``; padding and masked-out tokens are not counted. Read from the
        nodes the realisation pass names in ``gm.meta["tokenopt.count_nodes"]`` (validity or packed
        offsets), or the token axis where every image has the same count.

    Example:
        >>> import torch, timm, tokenopt
        >>> gm = tokenopt.optimize(timm.create_model("deit_tiny_patch16_224", depth=4), policy="topk", blocks=(1,))
        >>> {b: c.tolist() for b, c in tokenopt.token_counts(gm, torch.randn(2, 3, 224, 224)).items()}
        {0: [197, 197], 1: [139, 139], 2: [139, 139], 3: [139, 139]}
    """
    import torch

    gm = _graph_for(gm, inputs, "token_counts")
    info: ModelInfo = gm.meta[MODEL_INFO]
    block_of_out = {b.x_out: b.index for b in info.blocks}
    sources = gm.meta.get("tokenopt.count_nodes", {})  # block -> ("valid" | "cu", node name)
    wanted = {name: kind for kind, name in sources.values()}
    seen: dict[str, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted:
                seen[n.name] = out.sum(1) if wanted[n.name] == "valid" else out[1:] - out[:-1]
            if n in block_of_out and block_of_out[n] not in sources:
                counts[block_of_out[n]] = torch.full((out.shape[0],), out.shape[1], dtype=torch.long)
            return out

    with torch.no_grad():
        _Recorder(gm).run(*inputs)
    # (a count decided at a block's output, as halting is, is computed after that node)
    counts.update({b: seen[name] for b, (_kind, name) in sources.items()})
    return dict(sorted(counts.items()))


def gate_usage(gm: fx.GraphModule, *inputs) -> dict[int, dict[str, "torch.Tensor"]]:
    """Run ``gm`` on ``inputs`` and return, per gated block (AdaViT), what each image ran.

    Returns:
        ``{block: {"heads": LongTensor [B], "attn": BoolTensor [B], "mlp": BoolTensor [B]}}``: the heads
        that ran (0 where the attention sub-layer was skipped) and whether each sub-layer ran. Read from
        the gate nodes the realisation pass names in ``gm.meta["tokenopt.decisions"]``.
    """
    import torch

    from tokenopt.passes.patterns import record

    gm = _graph_for(gm, inputs, "gate_usage")
    gates = [d for d in gm.meta.get("tokenopt.decisions", []) if d["kind"] == "gate"]
    wanted = {d[p]: (d["block"], p) for d in gates for p in ("heads", "attn", "mlp") if d.get(p)}
    seen: dict[int, dict[str, torch.Tensor]] = {}
    for n, out in record(gm, [n for n in gm.graph.nodes if n.name in wanted], *inputs).items():
        block, part = wanted[n.name]
        seen.setdefault(block, {})[part] = out.detach() > 0.5 if out.is_floating_point() else out.bool()
    usage = {}
    for block, parts in sorted(seen.items()):
        b = next(iter(parts.values())).shape[0]
        attn = parts.get("attn", torch.ones(b, dtype=torch.bool))
        heads = parts["heads"].sum(1) if "heads" in parts else torch.full((b,), gm.meta[MODEL_INFO].blocks[block].attention.num_heads)
        usage[block] = {"heads": torch.where(attn, heads, 0), "attn": attn,
                        "mlp": parts.get("mlp", torch.ones(b, dtype=torch.bool))}
    return usage
