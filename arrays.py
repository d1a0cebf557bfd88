"""The types of the public API's arrays, for annotations (the names a type checker sees).

CuPy is never imported to annotate, so a backend's array is ``Any`` to a type checker; the names say
what is meant.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeAlias

import numpy.typing as npt

# an array of a backend: numpy.ndarray on the CPU backends, cupy.ndarray on the GPU one
Array: TypeAlias = Any
# data the model and the backends accept: a NumPy array (or anything numpy.asarray takes), a DLPack
# producer such as a torch CPU tensor, or a CuPy array on the GPU backend
ArrayInput: TypeAlias = Any
# a dtype: a name ("float32") or anything numpy.dtype takes
DTypeLike: TypeAlias = npt.DTypeLike
# a backend's compiled training steps by batch size (see Backend.fused_sgd_step), or None where it has none
FusedSteps: TypeAlias = "Mapping[int, Callable[..., Any]] | None"
# Backend.warmup's progress(done, total, what)
WarmupProgress: TypeAlias = "Callable[[int, int, str], None]"
