"""Hugging Face checkpoint I/O for Qwen2.5-VL: one invertible name/layout table used by load and export.

Load reads safetensors (single file or sharded with an index) straight into each parameter's sharding;
export writes the legacy tensor names in torch layouts, config.json and the tokenizer/processor files,
into a temporary folder renamed into place. Load -> export reproduces every tensor's bytes.
"""

import dataclasses
import functools
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixel_reasoner_jax import distributed
from pixel_reasoner_jax.models.config import ModelConfig

__all__ = [
    "CheckpointError",
    "RULES",
    "Rule",
    "export_hf",
    "from_hf_tensor",
    "hf_names",
    "load_hf_params",
    "load_model",
    "to_hf_tensors",
]

Path = tuple[str, ...]


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match the architecture (missing, unexpected, misshapen)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor family <-> one parameter.

    Attributes:
      hf: HF name; "{i}" stands for the layer index of stacked parameters.
      path: parameter path in the model's state.
      kind: "kernel" (torch Linear / Conv weight: flattened (out, in) <-> ours (in..., out...)),
        "flat" (stored 1-D in HF, any shape here), or "same" (identical layout).
      n_in: number of leading input axes of our kernel (kind "kernel").
      stack: "text" / "vision" for per-layer tensors stacked on our leading axis, None otherwise.
    """

    hf: str
    path: Path
    kind: str
    n_in: int = 1
    stack: str | None = None


def _p(s: str) -> Path:
    return tuple(s.split("."))


_VB, _TL = "visual.blocks.{i}.", "model.layers.{i}."
RULES: tuple[Rule, ...] = (
    Rule("visual.patch_embed.proj.weight", _p("visual.patch_embed.proj.kernel"), "kernel"),
    Rule(_VB + "norm1.weight", _p("visual.blocks.norm1.scale"), "flat", stack="vision"),
    Rule(_VB + "norm2.weight", _p("visual.blocks.norm2.scale"), "flat", stack="vision"),
    Rule(_VB + "attn.qkv.weight", _p("visual.blocks.attn.qkv.kernel"), "kernel", stack="vision"),
    Rule(_VB + "attn.qkv.bias", _p("visual.blocks.attn.qkv.bias"), "flat", stack="vision"),
    Rule(_VB + "attn.proj.weight", _p("visual.blocks.attn.proj.kernel"), "kernel", stack="vision"),
    Rule(_VB + "attn.proj.bias", _p("visual.blocks.attn.proj.bias"), "flat", stack="vision"),
    *(
        Rule(_VB + f"mlp.{m}.{w}", _p(f"visual.blocks.mlp.{m}.{k}"), kind, stack="vision")
        for m in ("gate_proj", "up_proj", "down_proj")
        for w, k, kind in (("weight", "kernel", "kernel"), ("bias", "bias", "flat"))
    ),
    Rule("visual.merger.ln_q.weight", _p("visual.merger.ln_q.scale"), "flat"),
    Rule("visual.merger.mlp.0.weight", _p("visual.merger.mlp_0.kernel"), "kernel"),
    Rule("visual.merger.mlp.0.bias", _p("visual.merger.mlp_0.bias"), "flat"),
    Rule("visual.merger.mlp.2.weight", _p("visual.merger.mlp_2.kernel"), "kernel"),
    Rule("visual.merger.mlp.2.bias", _p("visual.merger.mlp_2.bias"), "flat"),
    Rule("model.embed_tokens.weight", _p("model.embed_tokens.embedding"), "same"),
    Rule(_TL + "input_layernorm.weight", _p("model.layers.input_layernorm.scale"), "flat", stack="text"),
    Rule(
        _TL + "post_attention_layernorm.weight",
        _p("model.layers.post_attention_layernorm.scale"),
        "flat",
        stack="text",
    ),
    *(
        Rule(_TL + f"self_attn.{m}.{w}", _p(f"model.layers.self_attn.{m}.{k}"), kind, stack="text")
        for m in ("q_proj", "k_proj", "v_proj")
        for w, k, kind in (("weight", "kernel", "kernel"), ("bias", "bias", "flat"))
    ),
    Rule(
        _TL + "self_attn.o_proj.weight",
        _p("model.layers.self_attn.o_proj.kernel"),
        "kernel",
        n_in=2,
        stack="text",
    ),
    *(
        Rule(_TL + f"mlp.{m}.weight", _p(f"model.layers.mlp.{m}.kernel"), "kernel", stack="text")
        for m in ("gate_proj", "up_proj", "down_proj")
    ),
    Rule("model.norm.weight", _p("model.norm.scale"), "flat"),
    Rule("lm_head.weight", _p("lm_head.kernel"), "kernel"),
)

_EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def _num_layers(rule: Rule, cfg: ModelConfig) -> int | None:
    return {"text": cfg.text.num_hidden_layers, "vision": cfg.vision.depth, None: None}[rule.stack]


def _rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    tied = cfg.text.tie_word_embeddings
    return tuple(r for r in RULES if not (tied and r.hf == "lm_head.weight"))


def hf_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name of the architecture (legacy naming), in table order."""
    out = []
    for r in _rules(cfg):
        n = _num_layers(r, cfg)
        out.extend([r.hf] if n is None else [r.hf.format(i=i) for i in range(n)])
    return out


def _hf_shape(rule: Rule, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """HF tensor shape of one (per-layer) parameter of shape `shape`."""
    if rule.kind == "same":
        return shape
    if rule.kind == "flat":
        return (math.prod(shape),)
    if rule.path == _p("visual.patch_embed.proj.kernel"):
        v = cfg.vision
        return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return (math.prod(shape[rule.n_in :]), math.prod(shape[: rule.n_in]))


def _to_ours(x: np.ndarray, rule: Rule, shape: tuple[int, ...]) -> np.ndarray:
    if rule.kind == "kernel":
        n_in = math.prod(shape[: rule.n_in])
        return x.reshape(-1, n_in).T.reshape(shape)
    return x.reshape(shape)


def _to_hf(x: np.ndarray, rule: Rule, hf_shape: tuple[int, ...]) -> np.ndarray:
    if rule.kind == "kernel":
        n_in = math.prod(x.shape[: rule.n_in])
        return np.ascontiguousarray(x.reshape(n_in, -1).T).reshape(hf_shape)
    return np.ascontiguousarray(x).reshape(hf_shape)


# ------------------------------------------------------------------------------------ abstract model


def _abstract_state(cfg: ModelConfig, param_dtype) -> tuple[nnx.GraphDef, nnx.State]:
    from pixel_reasoner_jax.models.qwen25vl import Qwen25VL

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


@functools.lru_cache(maxsize=8)
def _param_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    _, abstract = _abstract_state(cfg, jnp.float32)
    return {p: tuple(v.shape) for p, v in _flat(abstract).items()}


def _flat(tree) -> dict[Path, object]:
    """{path: leaf} of an nnx.State, an nnx.Module's params, or a nested mapping."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    if isinstance(tree, nnx.State):
        out = {}
        for path, leaf in nnx.to_flat_state(tree):
            out[tuple(str(p) for p in path)] = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        return out
    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, (*prefix, str(k)))
        else:
            out[prefix] = node.get_value() if isinstance(node, nnx.Variable) else node

    walk(tree, ())
    return out


def from_hf_tensor(name: str, x: np.ndarray, cfg: ModelConfig) -> tuple[Path, int | None, np.ndarray]:
    """(parameter path, layer index or None, array in our per-layer layout) of one HF tensor.

    Accepts legacy and transformers >= 4.52 names.

    Raises:
      CheckpointError: a name the table does not know.
    """
    legacy = _normalise_name(name)
    for rule in _rules(cfg):
        if rule.stack is None:
            if legacy != rule.hf:
                continue
            layer = None
        else:
            head, tail = rule.hf.split("{i}")
            if not (legacy.startswith(head) and legacy.endswith(tail)):
                continue
            mid = legacy[len(head) : len(legacy) - len(tail)]
            if not mid.isdigit() or int(mid) >= _num_layers(rule, cfg):
                continue
            layer = int(mid)
        shape = _param_shapes(cfg)[rule.path]
        shape = shape if layer is None else shape[1:]
        if tuple(x.shape) != _hf_shape(rule, shape, cfg):
            raise CheckpointError(
                f"tensor {name}: expected shape {_hf_shape(rule, shape, cfg)}, got {x.shape}"
            )
        return rule.path, layer, _to_ours(np.asarray(x), rule, shape)
    raise CheckpointError(f"unexpected tensor {name!r}: no rule maps it to a parameter")


# --------------------------------------------------------------------------------------------- load


def _normalise_name(name: str) -> str:
    """transformers >= 4.52 in-memory names -> the legacy on-disk names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def _checkpoint_index(ckpt_dir: str) -> dict[str, str]:
    """{tensor name as stored: file path}."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(ckpt_dir, v) for k, v in weight_map.items()}
    files = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in checkpoint folder {ckpt_dir!r}")
    from safetensors import safe_open

    out = {}
    for fname in files:
        with safe_open(os.path.join(ckpt_dir, fname), framework="numpy") as f:
            out.update({k: os.path.join(ckpt_dir, fname) for k in f.keys()})
    return out


class _Reader:
    """Opens each safetensors file once; reads (and shape-checks) tensors by legacy name."""

    def __init__(self, ckpt_dir: str):
        from safetensors import safe_open

        self._open = safe_open
        self.files: dict[str, tuple[str, str]] = {}  # legacy name -> (stored name, file)
        for stored, path in _checkpoint_index(ckpt_dir).items():
            self.files[_normalise_name(stored)] = (stored, path)
        self._handles: dict[str, object] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        stored, path = self.files[name]
        return tuple(self._handle(path).get_slice(stored).get_shape())

    def read(self, name: str) -> np.ndarray:
        stored, path = self.files[name]
        return self._handle(path).get_tensor(stored)

    def _handle(self, path: str):
        if path not in self._handles:
            self._handles[path] = self._open(path, framework="numpy").__enter__()
        return self._handles[path]

    def close(self):
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def load_hf_params(ckpt_dir, cfg: ModelConfig, *, dtype=None, shardings=None) -> nnx.State:
    """Parameters of `Qwen25VL(cfg)` read from an HF checkpoint folder.

    Args:
      ckpt_dir: folder with model.safetensors or model-*.safetensors + model.safetensors.index.json;
        legacy (`model.layers.*`, `visual.*`) and transformers >= 4.52 (`model.language_model.*`,
        `model.visual.*`) names are both accepted.
      cfg: the architecture (usually `ModelConfig.from_pretrained(ckpt_dir)`).
      dtype: cast every parameter to it; None keeps the checkpoint's dtype.
      shardings: optional tree (nnx.State or nested dict) of `jax.sharding.Sharding` mirroring the params;
        each parameter is then built with `jax.make_array_from_callback`, every device reading only its
        slice (at most one parameter is held on the host at a time).

    Returns:
      an nnx.State of Params, ready for `nnx.merge(graphdef, state)`.

    Raises:
      CheckpointError: a missing, unexpected or misshapen tensor (named in the message).
    """
    ckpt_dir = os.fspath(ckpt_dir)
    _, abstract = _abstract_state(cfg, jnp.float32)
    shapes = _param_shapes(cfg)
    sh_flat = None if shardings is None else _flat(shardings)
    reader = _Reader(ckpt_dir)
    try:
        expected = set(hf_names(cfg))
        unexpected = sorted(set(reader.files) - expected)
        if unexpected:
            raise CheckpointError(f"unexpected tensor(s) in {ckpt_dir}: {unexpected[:8]}")
        missing = [n for n in hf_names(cfg) if n not in reader.files]
        if missing:
            raise CheckpointError(f"missing tensor(s) in {ckpt_dir}: {missing[:8]}")
        values: dict[Path, jax.Array] = {}
        for rule in _rules(cfg):
            full_shape = shapes[rule.path]
            n_layers = _num_layers(rule, cfg)
            layer_shape = full_shape if n_layers is None else full_shape[1:]
            hf_shape = _hf_shape(rule, layer_shape, cfg)
            names = [rule.hf] if n_layers is None else [rule.hf.format(i=i) for i in range(n_layers)]
            for name in names:
                got = reader.shape(name)
                if got != hf_shape:
                    raise CheckpointError(f"tensor {name}: expected shape {hf_shape}, got {got}")
            values[rule.path] = _build(reader, rule, names, n_layers, layer_shape, full_shape, dtype, sh_flat)
    finally:
        reader.close()
    state = nnx.filter_state(abstract, nnx.Param)
    nested: dict = {}
    for path, value in values.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    nnx.replace_by_pure_dict(state, nested)
    return state


def _build(reader, rule, names, n_layers, layer_shape, full_shape, dtype, sh_flat) -> jax.Array:
    cache: dict[int, np.ndarray] = {}

    def layer(i: int) -> np.ndarray:
        if i not in cache:
            x = _to_ours(reader.read(names[i]), rule, layer_shape)
            cache[i] = x if dtype is None else x.astype(dtype)
        return cache[i]

    sharding = None if sh_flat is None else sh_flat.get(rule.path)
    if sharding is None:
        host = layer(0) if n_layers is None else np.stack([layer(i) for i in range(n_layers)])
        return jnp.asarray(host)

    def callback(index):
        if n_layers is None:
            return layer(0)[index]
        rows = range(n_layers)[index[0]]
        return np.stack([layer(i)[index[1:]] for i in rows])

    out_dtype = layer(0).dtype
    return jax.make_array_from_callback(full_shape, sharding, callback, dtype=out_dtype)


def load_model(
    ckpt_dir,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules="train",
    remat: str = "none",
    vision_remat: str = "same",
    attention: str = "dense",
    layer_loop: str = "scan",
    weight_grad: str = "xla",
):
    """A `Qwen25VL` with the checkpoint's config and weights, sharded over `mesh` by `rules` when given.

    Args:
      ckpt_dir: HF checkpoint folder (config.json + safetensors).
      dtype, param_dtype, remat, vision_remat, attention, layer_loop, weight_grad: see `Qwen25VL`.
      mesh: place each parameter on its logical sharding over this mesh; None = default device.
      rules: logical-axis rules table or its name in `sharding.RULES`.
    """
    from pixel_reasoner_jax import sharding as sh
    from pixel_reasoner_jax.models.qwen25vl import Qwen25VL

    cfg = ModelConfig.from_pretrained(ckpt_dir)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(
            lambda: Qwen25VL(
                cfg,
                dtype=dtype,
                param_dtype=param_dtype,
                remat=remat,
                vision_remat=vision_remat,
                attention=attention,
                layer_loop=layer_loop,
                weight_grad=weight_grad,
                rngs=nnx.Rngs(0),
            )
        )
    graphdef, abs_state = nnx.split(abstract)
    shardings = (
        None if mesh is None else sh.state_shardings(nnx.filter_state(abs_state, nnx.Param), mesh, rules)
    )
    params = load_hf_params(ckpt_dir, cfg, dtype=param_dtype, shardings=shardings)
    return nnx.merge(graphdef, params)


# ------------------------------------------------------------------------------------------- export


def to_hf_tensors(
    params_or_model, cfg: ModelConfig, *, dtype=None
) -> list[tuple[str, Callable[[], np.ndarray], tuple, np.dtype]]:
    """(HF name, thunk producing the torch-layout array, HF shape, dtype) for every tensor, table order.

    Thunks let writers materialise one tensor (one layer slice) at a time.
    """
    flat = _flat(params_or_model)
    out = []
    for rule in _rules(cfg):
        if rule.path not in flat:
            raise CheckpointError(
                f"parameter {'.'.join(rule.path)} (for {rule.hf}) is missing from the params"
            )
        value = flat[rule.path]
        n_layers = _num_layers(rule, cfg)
        layer_shape = tuple(value.shape) if n_layers is None else tuple(value.shape[1:])
        hf_shape = _hf_shape(rule, layer_shape, cfg)
        out_dtype = np.dtype(dtype if dtype is not None else value.dtype)

        def thunk(value=value, i=None, rule=rule, hf_shape=hf_shape, out_dtype=out_dtype):
            x = distributed.to_host(value if i is None else value[i])
            return _to_hf(x, rule, hf_shape).astype(out_dtype, copy=False)

        if n_layers is None:
            out.append((rule.hf, thunk, hf_shape, out_dtype))
        else:
            for i in range(n_layers):
                out.append((rule.hf.format(i=i), lambda i=i, t=thunk: t(i=i), hf_shape, out_dtype))
    return out


_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def export_hf(
    params_or_model,
    cfg: ModelConfig,
    out_dir,
    *,
    dtype=None,
    max_shard_bytes: float = 5e9,
    extra_files_from=None,
) -> str:
    """Writes an HF checkpoint folder (legacy names, torch layouts) and returns its path.

    Written to `<out_dir>.tmp-<id>` and renamed into place (an existing `out_dir` is replaced), so a
    reader never sees a half-written folder. Multi-host: every process must call it (gathers are
    collective); only process 0 writes, and every process returns once the folder is in place.

    Args:
      params_or_model: a `Qwen25VL`, its Param state, or a nested dict of arrays.
      cfg: the architecture (written as config.json, Hub flat layout).
      out_dir: destination folder.
      dtype: cast tensors to it (e.g. jnp.bfloat16); None keeps each parameter's dtype.
      max_shard_bytes: split into model-0000k-of-0000n.safetensors + index above this size.
      extra_files_from: folder whose tokenizer / processor / chat-template / generation files are copied.
    """
    import safetensors.numpy as stnp

    out_dir = os.fspath(out_dir).rstrip("/")
    tensors = to_hf_tensors(params_or_model, cfg, dtype=dtype)
    shards: list[list] = [[]]
    size = 0
    for item in tensors:
        nbytes = math.prod(item[2]) * item[3].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    writer = jax.process_index() == 0
    tmp = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}"
    if writer:
        os.makedirs(tmp)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = (
            "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        arrays = {name: thunk() for name, thunk, _, _ in shard}
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update({name: fname for name in arrays})
        if writer:
            stnp.save_file(arrays, os.path.join(tmp, fname), metadata={"format": "pt"})
        del arrays
    if not writer:
        distributed.barrier("pixel_reasoner_export_hf")
        return out_dir
    if len(shards) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_cfg = cfg.to_hf_dict()
    dt = {t[3].name for t in tensors}
    hf_cfg["torch_dtype"] = _DTYPE_NAMES.get(dt.pop(), "bfloat16") if len(dt) == 1 else "bfloat16"
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    if extra_files_from is not None:
        for fname in _EXTRA_FILES:
            src = os.path.join(os.fspath(extra_files_from), fname)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, fname))
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier("pixel_reasoner_export_hf")  # the others read the folder once they pass it
    return out_dir
