"""Shared decoder-layer-by-decoder-layer runner for calibration-based methods (GPTQ, AWQ).

How it works
------------
1. :func:`find_decoder_layers` locates the stack of decoder layers (``model.model.layers``,
   ``model.transformer.h``, ``model.model.decoder.layers``, ``model.gpt_neox.layers``, ...).
2. :func:`capture_layer_inputs` runs the model on the calibration tokens (in small batches) with a
   forward pre-hook on decoder layer 0 that records the layer's positional args and keyword args
   (hidden states, attention mask, ``position_embeddings``, ``position_ids``, ...) and then stops the
   forward.  Nothing after the embeddings is computed.
3. :func:`run_layerwise` walks the layers in order.  For each layer it moves only that layer to the
   compute device, builds a :class:`LayerStep` and calls ``callback(step)``.  The callback quantizes
   the layer in place; it may register hooks on sub-modules and call :meth:`LayerStep.forward` as
   many times as it likes (the inputs are the outputs of the already-quantized previous layers).
   Afterwards the runner recomputes the layer's outputs *with the quantized layer* and writes them
   over the stored inputs (batch by batch, in place), which become the next layer's inputs.

Peak memory is the model + one layer's working set + the calibration activations (kept in the model
dtype, one tensor per batch).  The working set is dominated by the intermediate activations of one
layer forward (MLP: 3-4 tensors of rows × intermediate); with ``micro_batch`` the runner splits every
calibration batch into forwards of that many samples (the layer outputs are the same bits: every op of
a decoder layer works row by row) and hooks see the chunks; :attr:`LayerStep.chunk` tells a hook where
a chunk lies in its batch and ``forward(on_batch_end=...)`` fires once a batch is complete, so a
callback can rebuild the whole batch's input of a linear (GPTQ does, to keep its Hessian bit-exact).

Typical callback (collect the inputs of every linear, then quantize)::

    def quantize_layer(step: LayerStep):
        groups = step.linear_groups(skip)          # [[(name, module), ...], ...] in call order
        for group in groups:
            stats = {n: Stats() for n, _ in group}
            hooks = [m.register_forward_hook(...) for n, m in group]
            step.forward(stop_after=[m for _, m in group])   # stops once the group has run
            for h in hooks: h.remove()
            ...quantize the group...

    run_layerwise(model, input_ids, quantize_layer, device=ctx.device, progress=ctx.progress)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lm_eval_quant.errors import QuantArgError

__all__ = [
    "LAYER_PATHS",
    "find_decoder_layers",
    "capture_layer_inputs",
    "CapturedInputs",
    "LayerStep",
    "run_layerwise",
    "is_linear",
    "layer_linears",
    "default_batch_size",
    "release_free_memory",
]

# Attribute paths where HF causal LMs keep their decoder layers (first match wins).
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # llama, mistral, qwen2, gemma, phi3, olmo, ...
    "model.decoder.layers",  # opt
    "transformer.h",  # gpt2, gpt-j, bloom, falcon, codegen
    "gpt_neox.layers",  # pythia / gpt-neox
    "transformer.layers",  # chatglm-like
    "model.language_model.layers",  # multimodal wrappers
    "language_model.model.layers",
    "transformer.blocks",  # mpt
    "backbone.layers",
    "layers",
    "h",
)


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early (caught by this module)."""


def _get_attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, layers)``: the dotted attribute path and the ``nn.ModuleList`` of decoder layers.

    Raises :class:`QuantArgError` (one line naming the attributes looked for) when none is found.
    """
    for path in LAYER_PATHS:
        obj = _get_attr_path(model, path)
        if isinstance(obj, (nn.ModuleList, nn.Sequential)) and len(obj) > 0:
            return path, obj
    raise QuantArgError(
        f"hf-quant: cannot find the decoder layers of {type(model).__name__}: looked for "
        f"{', '.join(LAYER_PATHS)} (a non-empty nn.ModuleList); layer-wise methods (gptq, awq) "
        "need one of them, rtn does not"
    )


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2 style, weight stored [in, out])."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def layer_linears(layer: nn.Module, prefix: str = "", skip: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """Quantizable linears inside one decoder layer, as ``(full_name, module)`` in module order.

    ``full_name`` is ``prefix + "." + local_name``; names matching any fnmatch pattern in ``skip``
    (matched against the full name and the local name) are left out.
    """
    skip = tuple(skip or ())
    out = []
    for local, mod in layer.named_modules():
        if not local or not is_linear(mod):
            continue
        full = f"{prefix}.{local}" if prefix else local
        if any(fnmatch.fnmatch(full, p) or fnmatch.fnmatch(local, p) for p in skip):
            continue
        out.append((full, mod))
    return out


def default_batch_size(seqlen: int, tokens_per_batch: int = 4096) -> int:
    """Calibration samples per forward batch: about ``tokens_per_batch`` tokens, at least 1."""
    return max(1, tokens_per_batch // max(1, int(seqlen)))


_LIBC: Any = None


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    The layer-wise loop frees and reallocates tensors of a few to a few tens of MB in a changing
    pattern (activations, Hessians, Cholesky buffers); glibc keeps those below its mmap threshold
    (which grows up to 32 MB) in its heaps, where holes are not always reused, so RSS creeps above
    what is live (measured: ~50 MB on a 100 M-parameter Llama).  Called between the big steps; it
    costs a few ms.  Results are unaffected.
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        try:
            import ctypes
            import sys

            if sys.platform.startswith("linux"):
                lib = ctypes.CDLL("libc.so.6")
                if hasattr(lib, "malloc_trim"):
                    _LIBC = lib
        except Exception:
            _LIBC = False
    if _LIBC:
        try:
            _LIBC.malloc_trim(0)
        except (OSError, AttributeError):  # best effort: memory is returned to the OS later instead
            pass


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    """Structural equality with torch.equal on tensors (used to share identical kwargs across batches)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return next(iter(out.values()))
    raise TypeError(f"cannot read the hidden states from a decoder layer output of type {type(out)}")


@dataclass
class CapturedInputs:
    """Inputs of decoder layer 0, one entry per calibration batch.

    hidden[b]: hidden-states tensor of batch b ([bs, seqlen, hidden], model dtype).
    args[b]:   the other positional args of the layer call (tuple, may be empty).
    kwargs[b]: the keyword args of the layer call; identical dicts are shared between batches.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    @property
    def nsamples(self) -> int:
        return sum(int(h.shape[0]) for h in self.hidden)


def _input_device(model: nn.Module) -> torch.device:
    try:
        emb = model.get_input_embeddings()
        return next(emb.parameters()).device
    except Exception:
        return next(model.parameters()).device


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int | None = None,
    layers: nn.ModuleList | None = None,
) -> CapturedInputs:
    """Run ``model`` on ``input_ids`` [n, seqlen] in batches and record what decoder layer 0 receives.

    The forward stops at layer 0 (a pre-hook raises), so only the embeddings etc. run.  Tensors stay on
    the device where the model produced them.  Keyword args equal to the previous batch's are shared
    (one causal mask / rotary table for all batches of the same shape).
    """
    if layers is None:
        _, layers = find_decoder_layers(model)
    if input_ids.dim() != 2:
        raise ValueError("input_ids must be [nsamples, seqlen]")
    n, seqlen = input_ids.shape
    bs = batch_size or default_batch_size(seqlen)
    cap = CapturedInputs()
    state: dict = {}

    def pre_hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        state["hidden"], state["args"], state["kwargs"] = hidden, rest, dict(kwargs)
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    dev = _input_device(model)
    cfg = getattr(model, "config", None)
    old_use_cache = getattr(cfg, "use_cache", None)
    if cfg is not None and old_use_cache is not None:
        cfg.use_cache = False
    try:
        for start in range(0, n, bs):
            ids = input_ids[start : start + bs].to(dev)
            state.clear()
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            if "hidden" not in state:
                raise RuntimeError("decoder layer 0 was never called during the calibration forward")
            kw = state["kwargs"]
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            kw.pop("layer_past", None)
            if "use_cache" in kw:
                kw["use_cache"] = False
            args = tuple(None if type(a).__name__.endswith("Cache") else a for a in state["args"])
            if cap.kwargs and _same(cap.kwargs[-1], kw):
                kw = cap.kwargs[-1]
            if cap.args and _same(cap.args[-1], args):
                args = cap.args[-1]
            cap.hidden.append(state["hidden"])
            cap.args.append(args)
            cap.kwargs.append(kw)
    finally:
        handle.remove()
        if cfg is not None and old_use_cache is not None:
            cfg.use_cache = old_use_cache
    return cap


class LayerStep:
    """What a layer callback gets: one decoder layer (already on the compute device) and its inputs.

    Attributes: ``index`` (layer number), ``name`` (e.g. ``"model.layers.3"``), ``layer`` (module),
    ``device``, ``inputs`` (list of hidden-state batches on ``device``; outputs of the quantized
    previous layers), ``args``/``kwargs`` (per batch, on ``device``), ``nsamples``.
    Do not modify ``inputs``; the runner overwrites them with this layer's outputs after the callback.
    """

    def __init__(self, index: int, name: str, layer: nn.Module, device: torch.device,
                 inputs: list[torch.Tensor], args: list[tuple], kwargs: list[dict],
                 micro_batch: int | None = None):
        self.index = index
        self.name = name
        self.layer = layer
        self.device = device
        self.inputs = inputs
        self.args = args
        self.kwargs = kwargs
        self._memo: dict[int, tuple[nn.Module, dict[int, Any]]] = {}
        self._batch: Any = -1
        self._calls: dict[int, int] = {}
        #: samples per layer forward (None: a whole calibration batch at once)
        self.micro_batch = micro_batch if micro_batch and micro_batch > 0 else None
        #: during a forward: (batch index, first row, end row, rows of the batch) of the running chunk
        self.chunk: tuple[int, int, int, int] = (-1, 0, 0, 0)

    def _chunks(self, b: int):
        """(start, end, x, args, kwargs) per forward chunk of batch ``b`` (one chunk without micro_batch)."""
        x = self.inputs[b]
        n = int(x.shape[0]) if x.dim() > 0 else 1
        mb = self.micro_batch
        if mb is None or mb >= n:
            yield 0, n, x, self.args[b], self.kwargs[b]
            return

        for s in range(0, n, mb):
            e = min(n, s + mb)

            def cut(t, s=s, e=e):
                # tensors with the batch as first dim are sliced (views, no copy); broadcast ones kept
                return t[s:e] if t.dim() > 0 and t.shape[0] == n else t

            yield s, e, x[s:e], _map_tensors(self.args[b], cut), _map_tensors(self.kwargs[b], cut)

    def _enter_chunk(self, b: int, s: int, e: int) -> None:
        """Book-keeping before a layer forward on rows [s, e) of batch ``b``: memo key, per-chunk call
        counts, and :attr:`chunk` for the hooks."""
        self._batch = (b, s)
        self._calls.clear()
        self.chunk = (b, s, e, int(self.inputs[b].shape[0]))

    def memoize(self, module: nn.Module) -> None:
        """Reuse ``module``'s output per batch in later :meth:`forward` calls (and the runner's final pass).

        The first call computes and stores the output for each batch; later ones return it without
        running the module.  Only valid while the module's weights and its inputs stay as they are:
        call it for a sub-module once all the linears inside it and before it are final (quantized).
        Costs one stored output per batch; dropped when the layer is done.
        """
        if id(module) not in self._memo:
            self._memo[id(module)] = (module, {})

    def _patch_memo(self):
        patched = []
        for mod, store in self._memo.values():
            orig = mod.forward

            def fwd(*a, _orig=orig, _store=store, _mid=id(mod), **k):
                # key: (batch, n-th call of this module in this batch) -- safe for modules called twice
                n = self._calls.get(_mid, 0)
                self._calls[_mid] = n + 1
                key = (self._batch, n)
                if key in _store:
                    return _store[key]
                out = _orig(*a, **k)
                _store[key] = out
                return out

            patched.append((mod, mod.__dict__.get("forward")))  # an instance forward (accelerate hooks) is kept
            mod.forward = fwd
        return patched

    @staticmethod
    def _unpatch(patched):
        for m, own in patched:
            if own is not None:
                m.forward = own
            else:
                m.__dict__.pop("forward", None)

    def _outputs_inplace(self) -> None:
        """Replace every input batch by this layer's output for it (the runner's final pass)."""
        patched = self._patch_memo()
        try:
            for b in range(len(self.inputs)):
                new = None
                for s, e, x, args, kwargs in self._chunks(b):
                    self._enter_chunk(b, s, e)
                    out = _first_output(self.layer(x, *args, **kwargs)).to(self.inputs[b].dtype)
                    if s == 0 and e == self.inputs[b].shape[0]:
                        new = out
                    else:
                        if new is None:
                            new = torch.empty((int(self.inputs[b].shape[0]),) + tuple(out.shape[1:]),
                                              dtype=out.dtype, device=out.device)
                        new[s:e] = out
                    del out
                    # this chunk's memoized outputs are not needed any more
                    for _, store in self._memo.values():
                        for key in [k for k in store if k[0] == (b, s)]:
                            del store[key]
                self.inputs[b] = new
                del new
        finally:
            self._unpatch(patched)
            self._memo.clear()
        release_free_memory()

    @property
    def nsamples(self) -> int:
        return sum(int(h.shape[0]) for h in self.inputs)

    def linears(self, skip: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
        """Quantizable linears of this layer (full names), minus ``skip`` patterns."""
        return layer_linears(self.layer, self.name, skip)

    @torch.no_grad()
    def forward(self, collect: bool = False, stop_after: Sequence[nn.Module] | None = None,
                batches: Iterable[int] | None = None,
                on_batch_end: Callable[[int], Any] | None = None) -> list[torch.Tensor] | None:
        """Run the layer on every calibration batch (or the given batch indices).

        collect:      return the list of output hidden states (one tensor per batch).
        stop_after:   modules; the forward of a batch ends as soon as all of them have run (saves the
                      rest of the layer when only their inputs are needed; incompatible with collect).
        on_batch_end: called with the batch index once all chunks of a batch have run (with
                      ``micro_batch`` hooks see chunks; :attr:`chunk` says which rows).
        """
        if collect and stop_after:
            raise ValueError("collect and stop_after cannot be combined")
        handles, pending = [], set()
        if stop_after:
            targets = {id(m) for m in stop_after}

            def post_hook(module, args, out):
                pending.discard(id(module))
                if not pending:
                    raise _StopForward

            for m in stop_after:
                handles.append(m.register_forward_hook(post_hook))
        outs: list[torch.Tensor] = []
        patched = self._patch_memo()
        try:
            for b in (range(len(self.inputs)) if batches is None else batches):
                parts = []
                for s, e, x, args, kwargs in self._chunks(b):
                    self._enter_chunk(b, s, e)
                    if stop_after:
                        pending.clear()
                        pending.update(targets)
                    try:
                        out = self.layer(x, *args, **kwargs)
                    except _StopForward:
                        continue
                    if collect:
                        parts.append(_first_output(out))
                    del out
                if collect:
                    outs.append(parts[0] if len(parts) == 1 else torch.cat(parts))
                del parts
                if on_batch_end is not None:
                    on_batch_end(b)
        finally:
            self.chunk = (-1, 0, 0, 0)
            self._unpatch(patched)
            for h in handles:
                h.remove()
        release_free_memory()
        return outs if collect else None

    @torch.no_grad()
    def linear_groups(self, skip: Iterable[str] = (), linears: list[tuple[str, nn.Module]] | None = None
                      ) -> list[list[tuple[str, nn.Module]]]:
        """The layer's linears grouped by shared input, in the order the forward calls them.

        Runs the layer once on (a slice of) the first batch, records the order in which the linears are
        called and which input tensor each receives; linears fed the very same tensor (q/k/v;
        gate/up) form one group.  Linears never called during the forward are appended, each alone.
        E.g. Llama: [[q,k,v],[o],[gate,up],[down]]; GPT-2: [[c_attn],[attn.c_proj],[c_fc],[mlp.c_proj]].
        """
        if linears is None:
            linears = self.linears(skip)
        by_id = {id(m): (n, m) for n, m in linears}
        calls: list[tuple[int, torch.Tensor]] = []  # (module id, input); keeps inputs alive so ids stay unique

        def pre(module, args):
            if id(module) in by_id and not any(c[0] == id(module) for c in calls):
                calls.append((id(module), args[0]))

        handles = [m.register_forward_pre_hook(pre) for _, m in linears]
        try:
            x = self.inputs[0][:1]
            args, kwargs = self.args[0], self.kwargs[0]
            args = _map_tensors(args, lambda t: t[:1] if t.dim() > 0 and t.shape[0] == self.inputs[0].shape[0] and t.shape[0] > 1 else t)
            kwargs = _map_tensors(kwargs, lambda t: t[:1] if t.dim() > 0 and t.shape[0] == self.inputs[0].shape[0] and t.shape[0] > 1 else t)
            self.layer(x, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        groups: list[list[tuple[str, nn.Module]]] = []
        seen_inputs: list[torch.Tensor] = []
        for mid, inp in calls:
            for gi, t in enumerate(seen_inputs):
                if t is inp:
                    groups[gi].append(by_id[mid])
                    break
            else:
                seen_inputs.append(inp)
                groups.append([by_id[mid]])
        called = {mid for mid, _ in calls}
        for n, m in linears:
            if id(m) not in called:
                groups.append([(n, m)])
        return groups


def _inputs_on(cap, device: torch.device) -> tuple[list, list, list]:
    """The captured layer-0 inputs (hidden states, args, kwargs) moved to ``device``, keeping the
    sharing of identical objects among the args and kwargs."""

    def to_dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device)

    hidden = [h.to(device) for h in cap.hidden]
    memo: dict[int, Any] = {}

    def moved(obj):
        if id(obj) not in memo:
            memo[id(obj)] = _map_tensors(obj, to_dev)
        return memo[id(obj)]

    return hidden, [moved(a) for a in cap.args], [moved(k) for k in cap.kwargs]


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    input_ids: torch.Tensor,
    callback: Callable[[LayerStep], Any],
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "quantizing layers",
    micro_batch: int | None = None,
) -> list[Any]:
    """Quantize ``model`` decoder layer by decoder layer; returns the callback's return values.

    model:      HF causal LM (any device; layers are moved to ``device`` one at a time and back).
    input_ids:  LongTensor [nsamples, seqlen] of calibration tokens (see calibration.get_calibration).
    callback:   ``callback(step: LayerStep)``; quantizes ``step.layer`` in place.
    device:     compute device (default: where layer 0 lives).
    batch_size: calibration samples per batch (default ~4096 tokens per batch).
    micro_batch: samples per layer forward inside a batch (default: the whole batch); lowers the
                peak of the layer's intermediate activations, see :attr:`LayerStep.chunk`.
    """
    path, layers = find_decoder_layers(model)
    bs = batch_size or default_batch_size(input_ids.shape[1])
    was_training = model.training
    model.eval()
    cap = capture_layer_inputs(model, input_ids, bs, layers)
    if device is None:
        try:
            device = next(layers[0].parameters()).device
        except StopIteration:
            device = cap.hidden[0].device
    device = torch.device(device)
    hidden, args, kwargs = _inputs_on(cap, device)
    del cap

    results = []
    it = range(len(layers))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(it, desc=desc, unit="layer")
        it = bar
    try:
        for i in it:
            layer = layers[i]
            try:
                orig_dev = next(layer.parameters()).device
            except StopIteration:
                orig_dev = device
            if orig_dev != device:
                layer.to(device)
            step = LayerStep(i, f"{path}.{i}", layer, device, hidden, args, kwargs, micro_batch)
            results.append(callback(step))
            # outputs of the quantized layer become the next layer's inputs (in place, batch by batch)
            step._outputs_inplace()
            if orig_dev != device:
                layer.to(orig_dev)
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    return results
