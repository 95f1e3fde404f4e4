"""What a training forward keeps for its backward, per image, by the module that saved it.

    python benchmarks/saved_tensors.py                    # XT, 224x224, batch 2: by module class
    python benchmarks/saved_tensors.py --preset t --by parent --top 25

Every tensor an op saves for the backward passes through a saved-tensor hook; this one records the
innermost module running at that moment and the size of the tensor's storage, counting each storage
once (views of one map are one map) and leaving out the parameters (kept anyway). What
`layers.recompute_saved` replaces by a recipe is not saved and does not appear; what its hooks let
through is counted (PyTorch calls only the innermost hooks: the script chains them). The module stack
is tracked by wrapping each module's `forward` on the instance, not with forward hooks: hooks would
switch off the fused paths that skip hooked modules (`layers.hooked`), and with them what they save.

This is the part of a training step's peak that the model decides; the peak itself (`overlock bench
--train`) adds the parameter gradients, the optimizer's state and the backward's temporaries.
"""

from __future__ import annotations

import argparse
import collections
import functools

import torch

from overlock.builder import build


def track(model: torch.nn.Module, by: str) -> list[str]:
    """Wrap every module's forward so that the returned stack names the innermost running module."""
    stack: list[str] = []

    def wrapped(module: torch.nn.Module, forward, *args, **kwargs):
        name = type(module).__name__
        if by == "parent" and stack:
            name = f"{name} in {stack[-1].split(' in ')[0]}"
        stack.append(name)
        try:
            return forward(*args, **kwargs)
        finally:
            stack.pop()

    for module in model.modules():
        module.forward = functools.partial(wrapped, module, module.forward)
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="xt")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument(
        "--by", choices=("class", "parent"), default="class", help="module class, or class in parent class"
    )
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--amp", action="store_true", help="under bfloat16 autocast (the CPU's; a GPU's casts alike)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(args.preset).train()
    stack = track(model, args.by)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, tuple[int, str]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in kept:
            kept[storage.data_ptr()] = (storage.nbytes(), stack[-1] if stack else "(outside any module)")
        return tensor

    image = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    hooks = torch.autograd.graph.saved_tensors_hooks

    class Chained(hooks):
        """The model's own saved-tensor hooks (`layers.recompute_saved`) are the innermost while they
        are active, and PyTorch calls the innermost only: what they let through is counted here."""

        def __init__(self, inner_pack, inner_unpack) -> None:
            def chained_pack(tensor: torch.Tensor) -> object:
                packed = inner_pack(tensor)
                return pack(packed) if isinstance(packed, torch.Tensor) else packed

            super().__init__(chained_pack, inner_unpack)

    torch.autograd.graph.saved_tensors_hooks = Chained
    try:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp)
        with hooks(pack, lambda tensor: tensor), autocast:
            model(image)
    finally:
        torch.autograd.graph.saved_tensors_hooks = hooks
    totals: collections.Counter[str] = collections.Counter()
    for nbytes, owner in kept.values():
        totals[owner] += nbytes
    per_image = 2**20 * args.batch_size
    print(
        f"{args.preset}, {args.img_size}x{args.img_size}, batch {args.batch_size}{', bf16 autocast' if args.amp else ''}: "
        "MiB per image kept for the backward"
    )
    for owner, nbytes in totals.most_common(args.top):
        print(f"  {owner:44} {nbytes / per_image:8.2f}")
    rest = sum(nbytes for _, nbytes in totals.most_common()[args.top :])
    if rest:
        print(f"  {'(the rest)':44} {rest / per_image:8.2f}")
    print(f"  {'total':44} {sum(totals.values()) / per_image:8.2f}")


if __name__ == "__main__":
    main()
