"""Token ops: ``reference`` (plain PyTorch, the specification), ``triton/`` (the kernels, imported
lazily) and ``ops`` (the kernels as ``torch.ops.tokenopt.*`` custom ops; importing it does not import
Triton)."""
