"""Eager fast path for the registered ops.

Each op is a `torch.library.custom_op` (so torch.compile sees one opaque node with a fake impl and
a registered backward). In eager mode that dispatch layer is the largest fixed cost of a call:
measured on the 2-core CI machine, an MSE forward+backward on 16 elements took 190 us through the
custom op and 65 us through a `torch.autograd.Function` running the same implementation
(F.mse_loss: 51 us); on an H100 host the fixed cost made a 16M-element MSE several times slower
than eager PyTorch. So, outside torch.compile and for plain tensors (and Parameters), `autograd_op`
runs the op's own Python implementation and its registered setup_context / backward through an
autograd.Function, and `call` runs a backward op's implementation directly. Traced tensors (FakeTensor,
FunctionalTensor: subclasses of torch.Tensor), meta tensors and compiling always go through the
custom op (its fake implementation gives the shapes). The backward is not differentiable again:
asking for it (create_graph=True, then backpropagating through the gradient) raises instead of
silently leaving the gradient's own terms out (`_no_double_backward`); so do forward-mode AD and
torch.func.grad / vjp (vmap runs per sample).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD


def _raw(op) -> Callable | None:
    return getattr(op, "_init_fn", None)  # the decorated function (torch.library CustomOpDef)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a learnable weight or scale is a Parameter


def _eager(args) -> bool:
    if torch.compiler.is_compiling():
        return False
    return all(type(a) in _PLAIN and a.device.type != "meta" for a in args if isinstance(a, torch.Tensor))


def call(op, *args):
    """A custom op without autograd (a backward op): its implementation directly when eager."""
    fn = _raw(op)
    return fn(*args) if fn is not None and _eager(args) else op(*args)


def _no_double_backward(grads, name: str):
    """Under create_graph=True: the gradients behind a node that raises when backpropagated
    through. The backward ops have no autograd of their own, so a gradient penalty or a
    second-order method through them would otherwise silently miss the gradient's own terms
    (torch's once_differentiable adds this node only when the incoming gradient requires grad;
    ours depend on the saved inputs too)."""
    outs = grads if isinstance(grads, tuple) else (grads,)
    err = torch._C._functions.DelayedError(
        f"wmkernels {name}: no double backward (its gradient is not differentiable again); compute this term with "
        "plain PyTorch where second derivatives are needed".encode(), len(outs))
    aliases = [g.detach().requires_grad_() if isinstance(g, torch.Tensor) else g for g in outs]
    out = err(*aliases)
    return out if isinstance(grads, tuple) else out[0]


def autograd_op(op, setup_context: Callable, backward: Callable) -> Callable:
    """Registers `backward` / `setup_context` as `op`'s autograd formula and returns a callable with
    `op`'s signature: the custom op under torch.compile, else an autograd.Function with the same
    implementation, context setup and backward."""
    op.register_autograd(backward, setup_context=setup_context)
    fn = _raw(op)
    name = getattr(op, "_name", "op")  # the public name, e.g. "contrastive_loss"

    def save_inputs(ctx, inputs, output):
        # an inference tensor (a teacher's output, a clip made under inference_mode) cannot be
        # saved for backward: a copy is (the plain formula saves tensors derived from it)
        setup_context(ctx, tuple(a.clone() if isinstance(a, torch.Tensor) and a.is_inference() else a
                                 for a in inputs), output)

    def no_jvp(ctx, *tangents):
        raise NotImplementedError(
            f"wmkernels {name}: no forward-mode AD (torch.func.jvp, forward_ad dual tensors); the losses "
            "are scalars: use reverse mode (backward, torch.autograd.grad)")

    def run_backward(ctx, *grads):
        if not torch.is_grad_enabled():  # the usual case: no create_graph
            return backward(ctx, *grads)
        if torch._C._functorch.peek_interpreter_stack() is not None:
            # functorch differentiates every backward again (for nesting): ours is first-order only
            raise RuntimeError(
                f"wmkernels {name}: torch.func.grad / vjp / jacrev are not supported (the backward is not "
                "differentiable again); use loss.backward() or torch.autograd.grad")
        with torch.no_grad():
            out = backward(ctx, *grads)
        return _no_double_backward(out, name)

    class _Function(torch.autograd.Function):
        """The eager path: forward and context in one method, the cheapest apply (~18 us less per
        call than the form below)."""

        @staticmethod
        def forward(ctx, *args):
            out = fn(*args)
            save_inputs(ctx, args, out)
            return out

        jvp = staticmethod(no_jvp)
        backward = staticmethod(run_backward)

    class _Transformed(torch.autograd.Function):
        """Under torch.func transforms or forward-mode AD, which need forward and setup_context apart:
        their errors then name wmkernels, and vmap runs the op per sample."""
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return fn(*args)

        setup_context = staticmethod(save_inputs)
        jvp = staticmethod(no_jvp)
        backward = staticmethod(run_backward)

    _Function.__name__ = _Transformed.__name__ = f"{name}_eager"

    def run(*args):
        if fn is None or not _eager(args):
            return op(*args)
        if fwAD._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None:
            return _Transformed.apply(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return _Function.apply(*args)
        return fn(*args)  # nothing to differentiate: no autograd node to build

    return run
