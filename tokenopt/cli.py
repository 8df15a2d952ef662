"""The ``tokenopt`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _build_model(name: str):
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - the models extra is missing
        raise SystemExit("this command builds timm models: pip install 'tokenopt[models]'") from exc
    return timm.create_model(name, pretrained=False).eval()


def _cmd_explain(args) -> int:
    import tokenopt

    model = _build_model(args.model)
    gm = tokenopt.optimize(model, policy=args.policy)
    tokenopt.explain(gm, block=args.block)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenopt", description="Token reduction for Vision Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="optimize the embedded default (timm DeiT-Tiny) and print the report")
    demo.add_argument("--policy", default="none")
    demo.add_argument("--block", type=int, default=0)
    demo.set_defaults(model="deit_tiny_patch16_224", fn=_cmd_explain)
    exp = sub.add_parser("explain", help="optimize a timm model by name and print the per-block report")
    exp.add_argument("model")
    exp.add_argument("--policy", default="none")
    exp.add_argument("--block", type=int, default=None)
    exp.set_defaults(fn=_cmd_explain)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
