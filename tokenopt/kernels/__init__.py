"""Token ops: ``reference`` (plain PyTorch, the specification), ``ops`` (the token ops every rewritten
graph calls, as ``torch.ops.tokenopt.*`` custom ops: reference implementation, fake, autograd),
``triton/`` (the kernels, imported lazily) and ``fused`` (the kernels as ``torch.ops.tokenopt.triton_*``
custom ops; importing it does not import Triton)."""
