"""The packed path: any subset of modules in one call of the bundle's packed graph.

`packed.onnx` takes the input and the ids of the modules to combine and returns their mean
logits (and the weights it gathered), so any budget or subset costs one call whose
arithmetic grows with b. Subsets asked for again (a budget on the anytime order, a
specialist) get faster in two steps:

1. cached: the weights gathered on a subset's first call are kept, newest first, within a
   memory budget, and later calls feed them to `packed_core.onnx` (no gather);
2. compiled: on its second cached call, a subset is compiled in the background into a
   session of the core graph with its weights as constants, which costs what a graph fused
   by hand for those modules costs. Compiling needs the `onnx` package; without it, cached
   subsets stay on the core.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnxruntime as ort

from quorum.runtime.executors import fast_run

__all__ = ["COMPILE_AFTER", "HIDDEN", "PackedExecutor", "expose_hidden"]

log = logging.getLogger(__name__)

COMPILE_AFTER = 2  # cached calls of a subset before it is compiled (the first cached call is its second use)

_Runner = Any  # fast_run's callable: (outputs, feeds) -> list of arrays

HIDDEN = "hidden"  # the packed and core graphs' hidden units (N, b·H): the members' logits follow from them


def expose_hidden(model: bytes) -> tuple[bytes, dict[str, np.ndarray]]:
    """The graph `model` with its hidden units as a second output (when it has them), and its
    initializers by name: the members' second layers (`W2t` (M, H, K), `B2` (M, K)) are among
    the packed graph's. Without the hidden units, answers carry no disagreement."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load_from_string(model)
    graph = proto.graph
    if any(HIDDEN in n.output for n in graph.node) and HIDDEN not in [o.name for o in graph.output]:
        # its element type as the graph computes it (float16 in an fp16 bundle)
        typed = {
            v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(proto).graph.value_info
        }
        graph.output.insert(1, helper.make_tensor_value_info(HIDDEN, typed.get(HIDDEN, TensorProto.FLOAT), None))
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.startswith(("W2t", "B2"))}
    if "W2t" not in arrays and {"W2t_q", "W2t_scale"} <= arrays.keys():  # int8 weights: as the graph dequantizes
        arrays["W2t"] = arrays["W2t_q"].astype(np.float32) * arrays["W2t_scale"].astype(np.float32)
    weights = {name: arrays[name] for name in ("W2t", "B2") if name in arrays}
    return proto.SerializeToString(), weights


class _Entry:
    """A cached subset: its gathered weights, until compiled; then its compiled session."""

    __slots__ = ("compiled", "compiling", "last", "size", "uses", "weights")

    def __init__(self, weights: dict[str, np.ndarray], last: int):
        self.weights: dict[str, np.ndarray] | None = weights
        self.compiled: _Runner | None = None
        self.compiling = False
        self.size = sum(w.nbytes for w in weights.values())
        self.uses = 0  # cached calls (approximate under concurrency: it only triggers the compile)
        self.last = last  # when it was last used, on the executor's clock (least recently used goes first)


class PackedExecutor:
    """Mean logits of any subset of modules in one call; thread-safe.

    A cached subset is found without a lock (one dictionary lookup, atomic in CPython); the lock
    guards what changes the cache: adding, evicting, compiling.
    """

    def __init__(self, session: ort.InferenceSession, input_name: str, index_name: str, output_name: str):
        self.session = session
        self._run = fast_run(session)
        self.core: ort.InferenceSession | None = None
        self._run_core = self._run
        self._input, self._index, self._output = input_name, index_name, output_name
        self._weights: list[str] = []
        self.cache_bytes = 0
        self._cache: dict[bytes, _Entry] = {}
        self._cached_bytes = 0
        self._clock = itertools.count()
        self._lock = threading.Lock()
        self.hits = self.misses = self.compiled = 0
        self._core_model: bytes | None = None  # the core graph, to compile subsets from
        self._hidden = HIDDEN in [o.name for o in session.get_outputs()]
        self._layer2: tuple[np.ndarray, np.ndarray] | None = None  # W2t (M, H, K), B2 (M, K): members' logits
        self._compile: tuple[ort.SessionOptions, list[str]] | None = None
        self._compiler: ThreadPoolExecutor | None = None

    def attach_core(
        self,
        core: ort.InferenceSession,
        weight_names: Sequence[str],
        cache_bytes: int,
        *,
        core_model: bytes | None = None,
        compile_options: tuple[ort.SessionOptions, list[str]] | None = None,
    ) -> None:
        """Cache gathered weights (up to `cache_bytes`) and run `core` on them; with `core_model`
        (the core's bytes) and `compile_options` (session options, providers), compile hot subsets."""
        self.core, self._weights, self.cache_bytes = core, list(weight_names), cache_bytes
        if HIDDEN not in [o.name for o in core.get_outputs()]:  # cached subsets could not give members' logits
            self._hidden, self._layer2 = False, None
        self._run_core = fast_run(core)
        if core_model is not None and compile_options is not None:
            try:
                import onnx  # noqa: F401  (builds the compiled graphs)
            except ImportError:
                log.info("the onnx package is not installed: hot subsets stay on the packed core, uncompiled")
                return
            self._core_model, self._compile = core_model, compile_options
            self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quorum-compile")

    def run(
        self, ids: Sequence[int] | np.ndarray, x: np.ndarray, *, cacheable: bool = False, key: bytes | None = None
    ) -> np.ndarray:
        """Mean of modules `ids`' logits on x: (N, K). Raises whatever ONNX Runtime raises.

        `cacheable`: this subset is likely to be asked for again; keep its gathered weights.
        `key`: the ids' int64 bytes, if the caller keeps them.
        """
        index = ids if isinstance(ids, np.ndarray) else np.array(ids, dtype=np.int64)
        out: np.ndarray = self._call(index, x, cacheable, key, [self._output])[0]
        return out

    def run_members(
        self, ids: Sequence[int] | np.ndarray, x: np.ndarray, *, cacheable: bool = False, key: bytes | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """`run`, and each module's logits (b, K, N) from the graph's hidden units (None when the
        graph does not expose them): the same call, plus one small batched product."""
        index = ids if isinstance(ids, np.ndarray) else np.array(ids, dtype=np.int64)
        if self._layer2 is None:
            return self._call(index, x, cacheable, key, [self._output])[0], None
        mean, hidden = self._call(index, x, cacheable, key, [self._output, HIDDEN])
        w2t, b2 = self._layer2
        b = len(index)
        h = hidden.reshape(hidden.shape[0], b, -1).transpose(1, 2, 0)  # (b, H, N)
        members = np.matmul(w2t[index].transpose(0, 2, 1), h) + b2[index][:, :, None]  # (b, K, N)
        return mean, members

    def expose_members(self, w2t: np.ndarray, b2: np.ndarray) -> None:
        """Give `run_members` the members' second layers; only for graphs that output their hidden units."""
        if self._hidden:
            self._layer2 = (w2t.astype(np.float32), b2.astype(np.float32))

    def _call(
        self, index: np.ndarray, x: np.ndarray, cacheable: bool, key: bytes | None, outputs: list[str]
    ) -> list[np.ndarray]:
        if not (cacheable and self.cache_bytes):
            result: list[np.ndarray] = self._run(outputs, {self._input: x, self._index: index})
            return result
        entry = self._cache.get(key if key is not None else index.tobytes())
        if entry is not None:
            entry.last = next(self._clock)
            self.hits += 1
            if (compiled := entry.compiled) is not None:
                result = compiled(outputs, {self._input: x})
                return result
            weights = entry.weights
            if weights is None:  # compiled since the line above: the swap sets `compiled` first
                assert entry.compiled is not None
                result = entry.compiled(outputs, {self._input: x})
                return result
            entry.uses += 1
            if entry.uses >= COMPILE_AFTER and self._compiler is not None and not entry.compiling:
                self._submit_compile(index.tobytes(), entry)
            result = self._run_core(outputs, {self._input: x, **weights})
            return result
        first, *gathered = self._run([*outputs, *self._weights], {self._input: x, self._index: index})
        n = len(outputs)
        self._keep(index.tobytes(), _Entry(dict(zip(self._weights, gathered[n - 1 :], strict=True)), next(self._clock)))
        return [first, *gathered[: n - 1]]

    def _keep(self, key: bytes, entry: _Entry) -> None:
        with self._lock:
            self.misses += 1
            if entry.size > self.cache_bytes or key in self._cache:
                return
            while self._cached_bytes + entry.size > self.cache_bytes:
                oldest = min(self._cache, key=lambda k: self._cache[k].last)
                self._cached_bytes -= self._cache.pop(oldest).size
            self._cache[key] = entry
            self._cached_bytes += entry.size

    def _submit_compile(self, key: bytes, entry: _Entry) -> None:
        with self._lock:
            if entry.compiling:
                return
            entry.compiling = True
        assert self._compiler is not None
        self._compiler.submit(self._compile_entry, key, entry)

    def _compile_entry(self, key: bytes, entry: _Entry) -> None:
        """Build the core graph with `entry`'s weights as constants; swap it in if still cached."""
        import onnx
        from onnx import numpy_helper

        weights = entry.weights
        assert self._core_model is not None and self._compile is not None and weights is not None
        try:
            model = onnx.load_from_string(self._core_model)
            graph = model.graph
            kept = [i for i in graph.input if i.name not in weights]
            del graph.input[:]
            graph.input.extend(kept)
            graph.initializer.extend(numpy_helper.from_array(w, name) for name, w in weights.items())
            opts, providers = self._compile
            session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        except Exception as e:  # the core path goes on serving the subset
            log.warning("could not compile a subset of %d weights (%s: %s)", len(weights), type(e).__name__, e)
            return
        with self._lock:
            if self._cache.get(key) is entry:
                entry.compiled, entry.weights = fast_run(session), None  # `compiled` first: readers rely on it
                self.compiled += 1

    def close(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown(wait=False, cancel_futures=True)
