"""What autograd saves for backward, in bytes: the memory planner's ``activations`` part as a run
holds it (tests/helpers/measure_memory.py in a 2-rank engine, tests/test_memory_plan.py per family)."""

import weakref

import torch


class SavedActivations:
    """Inside ``with``, records every tensor autograd saves that is not a parameter's storage;
    ``held()`` is the bytes of those still alive, each storage counted once.

    ``params`` are read at every save: under ZeRO-3 a parameter's storage is the gathered one
    only while its layer runs."""

    def __init__(self, params):
        self.params = list(params)
        self.saved = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        if isinstance(t, torch.nn.Parameter) or not t.numel():
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr not in {p.data.untyped_storage().data_ptr() for p in self.params if p.data.numel()}:
            self.saved.append((weakref.ref(t), ptr, t.untyped_storage().nbytes()))
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    def held(self) -> int:
        return sum({ptr: nbytes for ref, ptr, nbytes in self.saved if ref() is not None}.values())
