"""Pictures of what a policy did: which image patches each block kept, dropped or merged.

:func:`token_sources` runs an optimized model on one image and follows every original patch through
the blocks: after each block it says which current token the patch lives in (or ``-1`` once dropped).
:func:`plot_tokens` draws that over the image: dropped patches greyed out, merged groups outlined in
one colour.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from tokenopt.ir import MODEL_INFO, ModelInfo

__all__ = ["token_sources", "plot_tokens"]


def token_sources(gm: fx.GraphModule, image: torch.Tensor) -> dict[int, torch.Tensor]:
    """For one image ``[1, C, H, W]``: ``{block: LongTensor [num_patches]}``, the index of the token
    each original patch belongs to after that block (prefix tokens come first), ``-1`` if dropped."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"token_sources takes one image [1, C, H, W]; got shape {tuple(image.shape)}")
    info: ModelInfo = gm.meta[MODEL_INFO]
    p, n = info.num_prefix_tokens, info.num_patch_tokens
    state = {"where": torch.arange(p, p + n), "tokens": info.num_tokens}  # current token of each patch
    block_of_out = {b.x_out: b.index for b in info.blocks}
    out: dict[int, torch.Tensor] = {}

    def remap(new_pos: torch.Tensor) -> None:
        where = state["where"]
        alive = where >= 0
        state["where"] = torch.where(alive, new_pos[where.clamp(min=0)], -1)
        state["tokens"] = int(new_pos.max()) + 1 if len(new_pos) else 0

    def follow_keep(idx: torch.Tensor, valid) -> None:
        kept = idx[0] if valid is None else idx[0][valid[0]]
        new_pos = torch.full((max(state["tokens"], int(kept.max()) + 1),), -1, dtype=torch.long)
        new_pos[kept] = torch.arange(len(kept))
        remap(new_pos)

    def follow_merge(slot: torch.Tensor) -> None:
        remap(slot[0, :state["tokens"]])

    decisions = gm.meta.get("tokenopt.decisions", [])
    wanted = {d[k] for d in decisions for k in ("idx", "valid", "slot") if d.get(k)}
    values: dict[str, torch.Tensor] = {}
    by_block: dict[int, list[dict]] = {}
    for d in decisions:
        by_block.setdefault(d["block"], []).append(d)

    class _Follower(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in wanted:
                values[node.name] = value
            if node in block_of_out:
                for d in by_block.get(block_of_out[node], []):
                    if d["kind"] == "keep":
                        follow_keep(values[d["idx"]], values[d["valid"]] if d["valid"] else None)
                    else:
                        follow_merge(values[d["slot"]])
                out[block_of_out[node]] = state["where"].clone()
            return value

    with torch.no_grad():
        _Follower(gm).run(image)
    return out


def plot_tokens(
    gm: fx.GraphModule, image: torch.Tensor, display: torch.Tensor, path: str,
    blocks: Optional[list[int]] = None, title: str = "",
) -> str:
    """Draw which patches each block kept (ATS, top-k) or merged (ToMe) over ``display``.

    Args:
        gm: an optimized model; ``image``: its normalised input ``[1, 3, H, W]``.
        display: the same picture for showing, ``[H, W, 3]`` floats in [0, 1].
        path: PNG file to write; returned.
        blocks: which blocks to draw (default: the last block and every third).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    info: ModelInfo = gm.meta[MODEL_INFO]
    sources = token_sources(gm, image)
    grid = int(round(info.num_patch_tokens ** 0.5))
    if grid * grid != info.num_patch_tokens:
        raise ValueError(f"patch tokens ({info.num_patch_tokens}) do not form a square grid")
    blocks = blocks or sorted(set(list(range(2, len(info.blocks), 3)) + [len(info.blocks) - 1]))
    fig, axes = plt.subplots(1, len(blocks) + 1, figsize=(3 * (len(blocks) + 1), 3.3))
    h, w = display.shape[:2]
    axes[0].imshow(display)
    axes[0].set_title("input")
    rng = np.random.default_rng(0)
    palette = rng.uniform(0.2, 1.0, size=(info.num_tokens + 1, 3))
    for ax, b in zip(axes[1:], blocks):
        where = sources[b].reshape(grid, grid).numpy()
        kept = (where >= 0).astype(float)
        mask = np.kron(kept, np.ones((h // grid + 1, w // grid + 1)))[:h, :w]
        shown = display.numpy() * (0.25 + 0.75 * mask[..., None])
        # a merged group (several patches in one token) gets its own tint
        counts = np.bincount(where[where >= 0].ravel(), minlength=info.num_tokens + 1)
        merged = (where >= 0) & (counts[np.clip(where, 0, None)] > 1)
        if merged.any():
            tint = palette[np.clip(where, 0, None)]
            tint_full = np.kron(tint, np.ones((h // grid + 1, w // grid + 1, 1)))[:h, :w]
            mfull = np.kron(merged.astype(float), np.ones((h // grid + 1, w // grid + 1)))[:h, :w, None]
            shown = shown * (1 - 0.45 * mfull) + 0.45 * mfull * tint_full
        ax.imshow(np.clip(shown, 0, 1))
        n_tokens = len(set(where[where >= 0].ravel().tolist()))
        ax.set_title(f"after block {b}: {n_tokens} patch tokens")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
