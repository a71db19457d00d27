"""HF checkpoint I/O: byte-exact round trip, transformers reads our export, names, sharding, sizes, errors."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as stnp
import torch
from flax import nnx
from test_model_parity import CFG, IM_END, IM_START, batch_inputs, build_hf_reference, forward

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.models import hf_io
from pixel_reasoner_jax.models.config import PRESETS, ConfigFormatError
from pixel_reasoner_jax.models.qwen25vl import Qwen25VL


def raw_tensors(folder) -> dict[str, tuple[str, tuple, bytes]]:
    """{name: (dtype, shape, raw bytes)} over every safetensors file of a folder, parsed by hand."""
    out = {}
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".safetensors"):
            continue
        with open(os.path.join(folder, fname), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
        for name, info in header.items():
            if name != "__metadata__":
                a, b = info["data_offsets"]
                out[name] = (info["dtype"], tuple(info["shape"]), data[a:b])
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_io_src")
    hf = build_hf_reference(folder, seed=2)
    (folder / "tokenizer.json").write_text('{"stub": true}')
    (folder / "chat_template.json").write_text('{"chat_template": "x"}')
    with nnx.use_eager_sharding(False):
        model = hf_io.load_model(folder)
    return hf, model, folder


def _text_logits(model_or_hf, ids):
    if isinstance(model_or_hf, torch.nn.Module):
        with torch.no_grad():
            return model_or_hf(input_ids=torch.tensor(ids)).logits.numpy()
    pos = np.broadcast_to(np.arange(ids.shape[1])[None, None], (3, *ids.shape))
    return np.asarray(model_or_hf(jnp.asarray(ids), jnp.asarray(pos), jnp.ones(ids.shape, jnp.int32)))


IDS = np.array([[IM_START, 5, 6, 7, 8, 9, IM_END]])


def test_round_trip_is_byte_exact_and_transformers_loads_it(ckpt, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf, model, src = ckpt
    out = hf_io.export_hf(model, CFG, tmp_path / "export", extra_files_from=src)
    want, got = raw_tensors(src), raw_tensors(out)
    assert sorted(got) == sorted(want) == sorted(hf_io.hf_names(CFG))
    for name in want:
        assert got[name] == want[name], f"tensor {name} differs after load -> export"
    assert sorted(os.listdir(out)) == [
        "chat_template.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    assert header["__metadata__"] == {"format": "pt"}
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_array_equal(_text_logits(reloaded, IDS), _text_logits(hf, IDS))
    np.testing.assert_allclose(_text_logits(model, IDS), _text_logits(hf, IDS), atol=1e-4, rtol=0)


def test_sharded_bf16_export_reloads(ckpt, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, model, _ = ckpt
    out = hf_io.export_hf(model, CFG, tmp_path / "bf16", dtype=jnp.bfloat16, max_shard_bytes=10e6)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(hf_io.hf_names(CFG))
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    params = hf_io.load_hf_params(out, CFG)
    for path, value in hf_io._flat(params).items():
        src = hf_io._flat(nnx.state(model, nnx.Param))[path]
        assert value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(value), np.asarray(src).astype(jnp.bfloat16))
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16)
    sd = reloaded.state_dict()
    flat = hf_io._flat(params)
    for name, t in sd.items():
        path, layer, ours = hf_io.from_hf_tensor(name, t.float().numpy(), CFG)
        mine = np.asarray(flat[path] if layer is None else flat[path][layer]).astype(np.float32)
        np.testing.assert_array_equal(ours, mine)


def test_new_transformers_names_load_identically(ckpt, tmp_path):
    _, model, src = ckpt
    arrays = stnp.load_file(os.path.join(src, "model.safetensors"))
    renamed = {}
    for name, arr in arrays.items():
        new = name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
        renamed["model." + new if new.startswith("visual.") else new] = arr
    assert any(k.startswith("model.visual.") for k in renamed)
    folder = tmp_path / "new_names"
    folder.mkdir()
    stnp.save_file(renamed, str(folder / "model.safetensors"))
    params = hf_io.load_hf_params(folder, CFG)
    mine = hf_io._flat(nnx.state(model, nnx.Param))
    for path, value in hf_io._flat(params).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(mine[path]))


def test_load_onto_mesh(ckpt):
    """Each parameter lands on its logical sharding (8 fake devices) with the same values, and a jitted
    image + text forward under the mesh (all constraints active) gives the unsharded logits."""
    _, model, src = ckpt
    ours, _, _, _ = batch_inputs([[("image", (1, 10, 14))], [("image", (1, 4, 6))]], np.random.default_rng(0))
    args = (ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"])
    want = forward(nnx.split(model), *args)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with sharding.use_mesh(mesh, "train"):
        sharded = hf_io.load_model(src, mesh=mesh, rules="train")
        q = sharded.model.layers.self_attn.q_proj.kernel[...]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 2, 16)
        graphdef, params = nnx.split(sharded)
        got = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(params, *args)
    mine = hf_io._flat(nnx.state(model, nnx.Param))
    for path, value in hf_io._flat(params).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(mine[path]))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_7b_abstract_parameter_count():
    cfg = PRESETS["7b"]
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert sum(int(np.prod(x.shape)) for x in leaves) == 8_292_166_656
    vision = jax.tree.leaves(nnx.state(abstract.visual, nnx.Param))
    assert sum(int(np.prod(x.shape)) for x in vision) == 676_550_144
    assert len(hf_io.hf_names(cfg)) == 729  # 32 * 12 + 6 vision + 28 * 12 + 3 text tensors
    state = nnx.state(abstract, nnx.Param)
    assert sharding.check_divisible(state, {"data": 1, "fsdp": 8, "tensor": 1}, "train") == []
    # The rule table really shards: a 5-way FSDP axis must be reported on the 3584-wide embed dims.
    assert any("embed_tokens" in bad for bad in sharding.check_divisible(state, {"fsdp": 5}, "train"))


def _write(folder, arrays, src):
    folder.mkdir()
    stnp.save_file(arrays, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((src / "config.json").read_text())
    return folder


def test_errors_name_the_tensor(ckpt, tmp_path):
    _, _, src = ckpt
    arrays = stnp.load_file(os.path.join(src, "model.safetensors"))
    missing = {k: v for k, v in arrays.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(hf_io.CheckpointError, match=r"missing .*model\.layers\.1\.self_attn\.k_proj\.bias"):
        hf_io.load_model(_write(tmp_path / "missing", missing, src))
    bad = dict(arrays)
    bad["visual.merger.mlp.2.weight"] = bad["visual.merger.mlp.2.weight"][:, :-1]
    with pytest.raises(
        hf_io.CheckpointError,
        match=r"visual\.merger\.mlp\.2\.weight: expected shape \(64, 128\), got \(64, 127\)",
    ):
        hf_io.load_model(_write(tmp_path / "shape", bad, src))
    extra = dict(arrays, **{"model.layers.2.mlp.up_proj.weight": arrays["model.layers.1.mlp.up_proj.weight"]})
    with pytest.raises(hf_io.CheckpointError, match=r"unexpected .*model\.layers\.2\.mlp\.up_proj\.weight"):
        hf_io.load_model(_write(tmp_path / "extra", extra, src))
    folder = _write(tmp_path / "type", arrays, src)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="llava")))
    with pytest.raises(ConfigFormatError, match="unknown model_type 'llava'"):
        hf_io.load_model(folder)
    with pytest.raises(hf_io.CheckpointError, match="no rule maps it"):
        hf_io.from_hf_tensor("model.layers.0.self_attn.rotary.weight", np.zeros(3), CFG)


def test_export_replaces_existing_folder(ckpt, tmp_path):
    _, model, _ = ckpt
    out = tmp_path / "dst"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    hf_io.export_hf(model, CFG, out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["dst"]
