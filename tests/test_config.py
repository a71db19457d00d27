"""Run configs: every variant loads and validates, each rule names its field, overrides, paper numbers."""

import dataclasses
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import base
from configs import eval as eval_cfg
from configs import grpo as grpo_cfg
from configs import sft as sft_cfg
from pixel_reasoner_jax import config as C
from pixel_reasoner_jax import config_rules
from pixel_reasoner_jax.train import rewards

REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = {"sft": sft_cfg, "grpo": grpo_cfg, "eval": eval_cfg}
# Device counts each variant is meant for: tiny on one CPU and on the 8 fake test devices; 3b/7b on one
# 8-GPU node; the GRPO recipe also on the original's 4 x 8 actor GPUs (§8.2).
INTENDED = [
    (mode, variant, n)
    for mode in MODES
    for variant, counts in {"tiny": (1, 8), "3b": (8,), "7b": (8,)}.items()
    for n in counts
] + [("grpo", "7b", 32), ("grpo", "3b", 32)]


def user_config(mode: str, variant: str):
    """The ConfigDict plus what a user passes on the command line (workdir, checkpoint, data paths)."""
    cd = MODES[mode].get_config(variant)
    cd.workdir = "/tmp/run"
    if variant != "tiny":
        cd.model.checkpoint = "/ckpt/model"
        cd.data.sft_path = "/data/sft.json"
        cd.data.rl_path = "/data/rl.jsonl"
        cd.data.eval_path = "/data/eval.jsonl"
        cd.data.data_root = "/data"
    return cd


def set_dotted(cd, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        cd = cd[p]
    cd[leaf] = value


def build(mode: str, variant: str, overrides: dict) -> C.RunConfig:
    cd = user_config(mode, variant)
    for dotted, value in overrides.items():
        set_dotted(cd, dotted.replace("__", "."), value)
    return C.from_config_dict(cd)


@pytest.mark.parametrize("mode,variant,num_devices", INTENDED)
def test_every_variant_loads_and_validates(mode, variant, num_devices):
    cfg = C.from_config_dict(user_config(mode, variant))
    C.validate(cfg, num_devices=num_devices)
    assert cfg.mode == mode and cfg.variant == variant
    data, fsdp, tensor = C.mesh_shape(cfg.mesh, num_devices)
    assert data * fsdp * tensor == num_devices


def test_tiny_is_cpu_sized():
    cfg = C.from_config_dict(user_config("grpo", "tiny"))
    assert cfg.data.synthetic and cfg.model.checkpoint is None and cfg.model.dtype == "float32"
    assert 8 <= cfg.grpo.steps <= 32 and cfg.grpo.group_size <= 8 and 0 < cfg.sft.steps <= 256
    # Originals are kept at up to 448 px (crops cut real detail); the model sees at most 16 visual tokens.
    assert cfg.rollout.max_new_tokens <= 128 and cfg.data.image_max_pixels <= 256 * 784
    assert cfg.rollout.model_max_pixels <= 16 * 784 and cfg.data.sft_image_max_pixels <= 16 * 784
    assert cfg.data.max_seq_len <= 1024 and cfg.data.num_sft <= 1024 and cfg.data.num_rl <= 256


def test_tiny_warm_start_decays_into_the_grpo_rate():
    from pixel_reasoner_jax.train import run, state  # the model stack, which only this test needs

    cfg = C.from_config_dict(user_config("grpo", "tiny"))
    n = cfg.sft.steps
    schedule = state.make_schedule(run.optim_config(cfg, n + cfg.grpo.steps))
    lr = [float(schedule(k)) for k in (0, n // 2, n, n + cfg.grpo.steps - 1)]
    warm, rl = cfg.grpo.warm_start_lr, cfg.optim.lr
    np.testing.assert_allclose(lr, [warm, (warm + rl) / 2, rl, rl], rtol=1e-5)


def test_unknown_variant_rejected():
    with pytest.raises(ValueError, match="'huge'.*tiny"):
        grpo_cfg.get_config("huge")


def test_variant_lists_agree():
    assert C.VARIANTS == base.VARIANTS


def test_tiny_size_lists_agree():
    from pixel_reasoner_jax.models import tiny  # imports the model stack, which only this test needs

    assert C.TINY_SIZES == tuple(tiny.SIZES)
    assert C.TINY_INITS == tiny.INITS
    narrow = tiny.SIZES["narrow"].validate()
    assert narrow.text.tie_word_embeddings and narrow.text.hidden_size < tiny.SIZES["tiny"].text.hidden_size


# (mode, variant, overrides as field__sub=value, field the error must name)
# SSR trains on half of the tiny rollout batch (4 prompts x G 4): 8 samples, one step per rollout.
SSR_8 = {"grpo__filter": "ssr", "grpo__train_batch_size": 8, "grpo__micro_batches": 1}
RULES = [
    ("grpo", "tiny", {"mode": "train"}, "mode"),
    ("grpo", "tiny", {"workdir": None}, "workdir"),
    ("grpo", "7b", {"model__checkpoint": None}, "model.checkpoint"),
    ("grpo", "tiny", {"model__dtype": "fp16"}, "model.dtype"),
    ("grpo", "tiny", {"model__param_dtype": "float64"}, "model.param_dtype"),
    ("grpo", "tiny", {"model__remat": "some"}, "model.remat"),
    ("grpo", "tiny", {"model__vision_remat": "some"}, "model.vision_remat"),
    ("grpo", "tiny", {"model__attention": "flash"}, "model.attention"),
    ("grpo", "tiny", {"model__layer_loop": "while"}, "model.layer_loop"),
    ("grpo", "tiny", {"model__weight_grad": "fast"}, "model.weight_grad"),
    ("grpo", "tiny", {"model__logprob_chunk": 0}, "model.logprob_chunk"),
    ("grpo", "tiny", {"model__logprob_bucket_steps": 0}, "model.logprob_bucket_steps"),
    ("grpo", "tiny", {"model__tiny_size": "huge"}, "model.tiny_size"),
    ("grpo", "tiny", {"mesh__data": 2, "mesh__fsdp": 2}, "mesh"),
    ("grpo", "tiny", {"mesh__data": 8, "mesh__fsdp": 2}, "mesh"),
    ("grpo", "tiny", {"mesh__fsdp": -1}, "mesh.fsdp"),
    ("grpo", "tiny", {"mesh__tensor": 0}, "mesh.tensor"),
    ("grpo", "tiny", {"mesh__fsdp": 3}, "mesh.data"),
    ("grpo", "tiny", {"mesh__rollout_tensor": 3}, "mesh.rollout_tensor"),
    ("grpo", "tiny", {"data__synthetic": False}, "data.rl_path"),
    ("sft", "tiny", {"data__synthetic": False}, "data.sft_path"),
    ("eval", "tiny", {"data__synthetic": False}, "data.eval_path"),
    ("grpo", "7b", {"data__sft_path": None, "sft__steps": 5}, "data.sft_path"),
    ("grpo", "7b", {"data__eval_path": None}, "data.eval_path"),
    ("grpo", "tiny", {"data__sft_loss_mask": "all"}, "data.sft_loss_mask"),
    ("grpo", "tiny", {"data__seq_buckets": (512, 1000)}, "data.seq_buckets"),
    ("grpo", "tiny", {"data__seq_buckets": (1024, 512)}, "data.seq_buckets"),
    ("grpo", "tiny", {"data__seq_buckets": (512,)}, "data.seq_buckets"),
    ("grpo", "tiny", {"data__patch_buckets": (250, 1024)}, "data.patch_buckets"),
    ("grpo", "tiny", {"data__image_min_pixels": 10**9}, "data.image_min_pixels"),
    ("grpo", "tiny", {"data__image_size": 20}, "data.image_size"),
    ("grpo", "tiny", {"optim__lr": 0.0}, "optim.lr"),
    ("grpo", "tiny", {"optim__warmup_ratio": 1.5}, "optim.warmup_ratio"),
    ("grpo", "tiny", {"optim__warmup_ratio": -0.1}, "optim.warmup_ratio"),
    ("grpo", "tiny", {"optim__schedule": "step"}, "optim.schedule"),
    ("grpo", "tiny", {"optim__b2": 1.0}, "optim.b2"),
    ("grpo", "tiny", {"sft__steps": -1}, "sft.steps"),
    ("sft", "tiny", {"sft__steps": 0}, "sft.steps"),
    ("grpo", "tiny", {"sft__micro_batches": 3}, "sft.micro_batches"),
    ("sft", "7b", {"sft__micro_batches": 4}, "sft.micro_batches"),
    ("grpo", "tiny", {"rollout__backend": "vllm"}, "rollout.backend"),
    ("grpo", "tiny", {"rollout__backend": "sglang"}, "rollout.sglang_urls"),
    (
        "grpo",
        "tiny",
        {"rollout__backend": "sglang", "rollout__sglang_urls": "localhost:30000"},
        "rollout.sglang_urls",
    ),
    ("grpo", "tiny", {"rollout__template": "cot"}, "rollout.template"),
    ("grpo", "tiny", {"rollout__crop_padding": "none"}, "rollout.crop_padding"),
    ("grpo", "tiny", {"rollout__temperature": 0.0}, "rollout.temperature"),
    ("grpo", "tiny", {"rollout__temperature_after_tool": -1.0}, "rollout.temperature_after_tool"),
    ("grpo", "tiny", {"rollout__top_p": 0.0}, "rollout.top_p"),
    ("grpo", "tiny", {"rollout__top_p": 1.1}, "rollout.top_p"),
    ("grpo", "tiny", {"rollout__top_k": 0}, "rollout.top_k"),
    ("grpo", "tiny", {"rollout__max_tool_calls": -1}, "rollout.max_tool_calls"),
    ("grpo", "tiny", {"rollout__max_images": 0}, "rollout.max_images"),
    ("grpo", "tiny", {"rollout__max_new_tokens": 500}, "rollout.max_total_tokens"),
    ("grpo", "tiny", {"rollout__max_total_tokens": 2048}, "rollout.max_total_tokens"),
    ("grpo", "tiny", {"rollout__crop_min_pixels": 10**7}, "rollout.crop_min_pixels"),
    ("grpo", "tiny", {"rollout__batch_size": 12}, "rollout.batch_size"),
    ("grpo", "tiny", {"rollout__request_timeout_s": 0.0}, "rollout.request_timeout_s"),
    ("grpo", "tiny", {"rollout__sglang_urls": "http://a:1,http://a:1/"}, "rollout.sglang_urls"),
    ("grpo", "tiny", {"rollout__sglang_urls": "@/nonexistent/urls.txt"}, "rollout.sglang_urls"),
    ("grpo", "tiny", {"rollout__server_wait_s": 0.0}, "rollout.server_wait_s"),
    ("grpo", "tiny", {"rollout__health_max_backoff_s": 0.5}, "rollout.health_max_backoff_s"),
    ("grpo", "tiny", {"grpo__group_size": 1}, "grpo.group_size"),
    ("grpo", "tiny", {"grpo__group_size": 3}, "grpo.train_batch_size"),
    ("grpo", "tiny", {"grpo__prompts_per_rollout": 3}, "grpo.prompts_per_rollout"),
    ("grpo", "tiny", {"grpo__micro_batches": 3}, "grpo.micro_batches"),
    ("grpo", "tiny", {"grpo__micro_batches": 8}, "grpo.micro_batches"),  # 32 / 8 = 4 over 8 devices
    ("grpo", "tiny", {"grpo__eps_low": 0.0}, "grpo.eps_low"),
    ("grpo", "tiny", {"grpo__eps_high": 1.0}, "grpo.eps_high"),
    ("grpo", "tiny", {"grpo__kl_coef": -0.1}, "grpo.kl_coef"),
    ("grpo", "tiny", {"grpo__warm_start_schedule": "linear"}, "grpo.warm_start_schedule"),
    ("grpo", "tiny", {"grpo__tis_cap": 0.5}, "grpo.tis_cap"),
    ("grpo", "tiny", {"grpo__loss_agg": "sum"}, "grpo.loss_agg"),
    ("grpo", "tiny", {"grpo__advantage": "ppo"}, "grpo.advantage"),
    ("grpo", "tiny", {"grpo__filter": "True"}, "grpo.filter"),
    ("grpo", "tiny", SSR_8 | {"grpo__replay_capacity": 4}, "grpo.replay_capacity"),
    ("grpo", "tiny", {"grpo__filter": "ssr"}, "grpo.prompts_per_rollout"),  # 32 // 2 < train_batch_size 32
    ("grpo", "tiny", {"grpo__steps": 0}, "grpo.steps"),
    ("grpo", "tiny", {"grpo__epochs_per_rollout": 0}, "grpo.epochs_per_rollout"),
    # 2 optimizer steps per rollout (8 prompts x G=4 / 16)
    ("grpo", "tiny", {"grpo__train_batch_size": 16, "log__checkpoint_every": 3}, "log.checkpoint_every"),
    ("grpo", "tiny", {"reward__form": "dapo"}, "reward.form"),
    ("grpo", "tiny", {"reward__H": 0.0}, "reward.H"),
    ("grpo", "tiny", {"reward__H": 1.5}, "reward.H"),
    ("grpo", "tiny", {"reward__alpha": -0.5}, "reward.alpha"),
    ("grpo", "tiny", {"reward__beta": -0.05}, "reward.beta"),
    ("grpo", "tiny", {"reward__N": -1}, "reward.N"),
    ("grpo", "tiny", {"reward__scoring": "exact"}, "reward.scoring"),
    ("eval", "tiny", {"eval__scoring": "anls"}, "eval.scoring"),
    ("grpo", "tiny", {"eval__benchmarks": "vstar,foo"}, "eval.benchmarks"),
    ("grpo", "tiny", {"eval__num_samples": 4}, "eval.num_samples"),
    ("eval", "tiny", {"eval__batch_size": 12}, "eval.batch_size"),
    ("grpo", "tiny", {"log__every": 0}, "log.every"),
    ("grpo", "tiny", {"host_malloc": "jemalloc"}, "host_malloc"),
]


@pytest.mark.parametrize(
    "mode,variant,overrides,field", RULES, ids=[f"{r[3]}-{i}" for i, r in enumerate(RULES)]
)
def test_each_rule_names_its_field(mode, variant, overrides, field):
    cfg = build(mode, variant, overrides)
    with pytest.raises(C.ConfigError) as info:
        C.validate(cfg, num_devices=8)
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")


# Boundary values that must pass (the open/closed ends of the ranges above).
VALID = [
    {"reward__H": 1.0},
    {"rollout__top_p": 1.0},
    {"rollout__top_k": -1},
    {"rollout__max_tool_calls": 0},
    {"optim__warmup_ratio": 0.0},
    {"optim__warmup_ratio": 1.0},
    {"grpo__tis_cap": 2.0},
    {"reward__alpha": 0.0, "reward__beta": 0.0, "reward__N": 0},
    {"rollout__backend": "sglang", "rollout__launch_local_server": True},
    {"rollout__backend": "sglang", "rollout__sglang_urls": "http://a:30000, https://b.example:8000"},
    {"mesh__data": 2, "mesh__fsdp": 2, "mesh__tensor": 2},
    {"mesh__data": 2, "mesh__fsdp": -1},
    {"eval__greedy": False, "eval__num_samples": 8, "eval__benchmarks": "vstar,infovqa"},
    {"grpo__train_batch_size": 16, "log__checkpoint_every": 4},
    {"reward__scoring": "strict", "reward__require_boxed": False, "eval__scoring": "strict"},
    SSR_8,
]


@pytest.mark.parametrize("overrides", VALID)
def test_boundary_values_pass(overrides):
    C.validate(build("grpo", "tiny", overrides), num_devices=8)


def test_sglang_urls_from_a_file(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("# rollout fleet\nhttp://h1:30000\n\n  http://h2:30000  # second node\n")
    cfg = build("grpo", "tiny", {"rollout__backend": "sglang", "rollout__sglang_urls": f"@{path}"})
    C.validate(cfg, num_devices=8)
    assert cfg.rollout.urls == ("http://h1:30000", "http://h2:30000")
    path.write_text("h3:30000\n")
    with pytest.raises(C.ConfigError, match="rollout.sglang_urls.*'h3:30000'"):
        C.validate(cfg, num_devices=8)


@pytest.mark.parametrize("field", ["ADVANTAGES", "LOSS_AGG", "REWARD_SHAPERS"])
def test_registry_names_are_accepted_and_match_fallbacks(field):
    import importlib

    dotted, (module, attr, fallback) = next(
        (k, v) for k, v in config_rules._FALLBACK_REGISTRIES.items() if v[1] == field
    )
    registry = getattr(importlib.import_module(f"pixel_reasoner_jax.train.{module}"), attr)
    assert tuple(registry) == fallback  # the local copy stays in sync with the real registry
    for name in registry:
        C.validate(build("grpo", "tiny", {dotted.replace(".", "__"): name}), num_devices=8)


def test_from_config_dict_rejects_unknown_missing_and_mistyped():
    values = user_config("grpo", "tiny").to_dict()
    values["model"]["size"] = 7
    with pytest.raises(C.ConfigError, match=r"^model: unknown keys \['model.size'\]"):
        C.from_config_dict(values)
    values = user_config("grpo", "tiny").to_dict()
    del values["grpo"]["eps_high"]
    with pytest.raises(C.ConfigError, match=r"^grpo: missing keys \['grpo.eps_high'\]"):
        C.from_config_dict(values)
    for dotted, bad in [
        ("grpo.group_size", "8"),
        ("grpo.group_size", True),
        ("reward.curiosity", 1),
        ("optim.lr", "1e-6"),
        ("data.seq_buckets", (512, "1024")),
        ("model.checkpoint", 3),
    ]:
        values = user_config("grpo", "tiny").to_dict()
        section, key = dotted.split(".")
        values[section][key] = bad
        with pytest.raises(C.ConfigError) as info:
            C.from_config_dict(values)
        assert info.value.field.startswith(dotted)


def test_run_config_is_frozen_and_typed():
    cfg = C.from_config_dict(user_config("grpo", "tiny"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grpo.group_size = 2
    assert isinstance(cfg.data.seq_buckets, tuple) and cfg.reward.alpha is None  # the form's constant
    assert isinstance(build("grpo", "tiny", {"reward__alpha": 1}).reward.alpha, float)
    assert cfg.grpo.samples_per_rollout == 32 and cfg.grpo.steps_per_rollout == 1


def test_mesh_shapes():
    mesh = C.MeshConfig(data=1, fsdp=-1, tensor=1, rollout_tensor=2)
    assert C.mesh_shape(mesh, 8) == (1, 8, 1)
    assert C.mesh_shape(C.MeshConfig(2, 2, 2, 1), 8) == (2, 2, 2)
    assert C.mesh_shape(C.MeshConfig(-1, 2, 2, 1), 16) == (4, 2, 2)
    assert C.rollout_mesh_shape(mesh, 8) == (4, 2)
    with pytest.raises(ValueError, match="num_devices"):
        C.mesh_shape(mesh, 0)


def _parse_flags(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv, lock_config=True)
    fv(argv)
    return fv.config


def test_command_line_overrides():
    path = REPO / "configs" / "grpo.py"
    cd = _parse_flags(
        [
            "prog",
            f"--config={path}:tiny",
            "--config.optim.lr=1e-6",
            "--config.workdir=/tmp/w",
            "--config.rollout.backend=sglang",
            "--config.rollout.sglang_urls=http://h1:30000,http://h2:30000",
            "--config.data.seq_buckets=(256,512,1024)",
            "--config.data.max_seq_len=1024",
            "--config.reward.curiosity=False",
            "--config.grpo.group_size=8",
            "--config.grpo.train_batch_size=32",
        ]
    )
    cfg = C.from_config_dict(cd)
    assert cfg.optim.lr == 1e-6 and cfg.workdir == "/tmp/w" and cfg.variant == "tiny"
    assert cfg.rollout.urls == ("http://h1:30000", "http://h2:30000")
    assert cfg.data.seq_buckets == (256, 512, 1024) and cfg.reward.curiosity is False
    assert cfg.grpo.group_size == 8
    C.validate(cfg, num_devices=8)


@pytest.mark.parametrize(
    "bad,hint",
    [("--config.optim.lrr=1e-6", 'Did you mean "lr"'), ("--config.optimm.lr=1e-6", 'Did you mean "optim"')],
)
def test_command_line_typo_rejected(bad, hint):
    # The locked ConfigDict refuses new keys and suggests the closest existing one.
    with pytest.raises((AttributeError, KeyError), match=hint):
        _parse_flags(["prog", f"--config={REPO / 'configs' / 'sft.py'}:tiny", bad])


def test_command_line_bad_value_and_variant_rejected():
    with pytest.raises(flags.IllegalFlagValueError, match="group_size=abc"):
        _parse_flags(
            ["prog", f"--config={REPO / 'configs' / 'grpo.py'}:tiny", "--config.grpo.group_size=abc"]
        )
    with pytest.raises(flags.IllegalFlagValueError, match="huge"):
        _parse_flags(["prog", f"--config={REPO / 'configs' / 'grpo.py'}:huge"])


def test_config_file_loads_by_path_outside_the_repo(tmp_path):
    # From another directory `configs` is not importable; the file must find base.py beside itself.
    code = (
        "from absl import flags; from ml_collections import config_flags\n"
        f"argv = ['p', '--config={REPO / 'configs' / 'eval.py'}:3b', '--config.eval.batch_size=32']\n"
        "fv = flags.FlagValues()\n"
        "config_flags.DEFINE_config_file('config', None, flag_values=fv, sys_argv=argv)\n"
        "fv(argv); print(fv.config.mode, fv.config.model.hf_id, fv.config.eval.batch_size)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["eval", base.HF_ID_3B, "32"]


# The 7b recipe against pixel_reasoner.md: (mode, field, value, section of the reference).
PAPER_7B = [
    ("sft", "model.hf_id", "Qwen/Qwen2.5-VL-7B-Instruct", "§1"),
    ("grpo", "model.hf_id", "TIGER-Lab/PixelReasoner-WarmStart", "§1"),
    ("eval", "model.hf_id", "TIGER-Lab/PixelReasoner-RL-v1", "§1"),
    ("grpo", "rollout.max_new_tokens", 2048, "§3.1 --max_out_tokens"),
    ("grpo", "rollout.prompt_max_len", 2048, "§3.1 --prompt_max_len"),
    ("grpo", "rollout.max_total_tokens", 12 * 1024 - 200, "§3.1 total tokens"),
    ("grpo", "rollout.max_images", 16, "§3.1 max_imgnum"),
    ("grpo", "rollout.max_tool_calls", 3, "§3.1 tool calls"),
    ("grpo", "rollout.crop_padding", "capped", "§4.1 released crop_image"),
    ("grpo", "rollout.min_crop_side", 28, "§4.1"),
    ("grpo", "rollout.max_frames", 8, "§4.2"),
    ("grpo", "data.num_video_frames", 16, "§4.2"),
    ("grpo", "data.image_min_pixels", 4 * 784, "§5 originals, training"),
    ("grpo", "data.image_max_pixels", 2000 * 784, "§5 originals, training"),
    ("grpo", "data.eval_image_min_pixels", 256 * 784, "§5 originals, eval"),
    ("grpo", "data.eval_image_max_pixels", 8000 * 784, "§5 eval_maxpixel"),
    ("grpo", "data.video_frame_max_pixels", 512 * 784, "§5 video frames"),
    ("grpo", "rollout.crop_min_pixels", 4 * 784, "§5 crops, training"),
    ("grpo", "rollout.crop_max_pixels", 1000 * 784, "§5 crops, training"),
    ("grpo", "rollout.select_min_pixels", 4 * 784, "§5 selected frames"),
    ("grpo", "rollout.select_max_pixels", 400 * 784, "§5 selected frames"),
    ("grpo", "rollout.model_min_pixels", 256 * 784, "§5 vLLM MIN_PIXELS default"),
    ("grpo", "rollout.model_max_pixels", 4014080, "§5 README MAX_PIXELS"),
    ("eval", "eval.crop_min_pixels", 256 * 784, "§5 crops, eval"),
    ("eval", "eval.crop_max_pixels", 5120 * 784, "§5 crops, eval"),
    ("eval", "eval.resize_selected", False, "§5 selected frames not resized in eval"),
    ("eval", "eval.model_min_pixels", 401408, "§5/§10 eval MIN_PIXELS"),
    ("eval", "eval.model_max_pixels", 4014080, "§5/§10 eval MAX_PIXELS"),
    ("sft", "data.sft_image_min_pixels", 3136, "§5 SFT processor"),
    ("sft", "data.sft_image_max_pixels", 4014080, "§5 SFT processor"),
    ("sft", "data.sft_video_frame_max_pixels", 151200, "§5/§7.1 420x360"),
    ("sft", "model.freeze_vision", True, "§8.1 --freeze_vision_modules"),
    ("sft", "optim.lr", 1e-6, "§8.1"),
    ("sft", "optim.schedule", "cosine", "§8.1"),
    ("sft", "optim.warmup_ratio", 0.1, "§8.1"),
    ("sft", "sft.batch_size", 16, "§8.1 1 x 2 x 8"),
    ("sft", "sft.micro_batches", 2, "§8.1 grad-accum 2"),
    ("sft", "sft.epochs", 5, "§8.1 sft.sh"),
    ("sft", "sft.checkpoint_every", 0, "§8.1 save every epoch"),
    ("sft", "data.seed", 49, "§8.1 data_seed"),
    ("sft", "data.sft_loss_mask", "final_turns", "§8.1 create_assistant_response_mask"),
    ("grpo", "model.remat", "full", "§8 gradient checkpointing"),
    ("grpo", "grpo.advantage", "mean", "§8.2 group, no std division"),
    ("grpo", "grpo.group_size", 8, "§8.2 n_samples_per_prompt"),
    ("grpo", "grpo.eps_low", 0.2, "§8.2"),
    ("grpo", "grpo.eps_high", 0.35, "§8.2"),
    ("grpo", "grpo.kl_coef", 0.0, "§8.2 init_kl_coef=0"),
    ("grpo", "grpo.entropy_coef", 0.0, "§8.2"),
    ("grpo", "optim.b1", 0.9, "§8.2"),
    ("grpo", "optim.b2", 0.95, "§8.2"),
    ("grpo", "optim.weight_decay", 0.0, "§8.2"),
    ("grpo", "optim.grad_clip", 1.0, "§8.2"),
    ("grpo", "optim.lr", 1e-6, "§8.2 ${lr}e-7, lr=10"),
    ("grpo", "optim.schedule", "cosine", "§8.2 cosine_with_min_lr"),
    ("grpo", "optim.warmup_ratio", 0.03, "§8.2 warmup 3%"),
    ("grpo", "optim.min_lr_ratio", 0.5, "§8.2 min_lr 0.5*lr"),
    ("grpo", "grpo.train_batch_size", 256, "§8.2 bsz"),
    ("grpo", "grpo.prompts_per_rollout", 512, "§8.2 rbuffer"),
    ("grpo", "grpo.epochs_per_rollout", 1, "§8.2 max_epochs 1"),
    ("grpo", "grpo.num_episodes", 3, "§8.2 nepoch=3"),
    ("grpo", "rollout.temperature", 1.0, "§8.2 first turn"),
    ("grpo", "rollout.temperature_after_tool", 0.9, "§8.2 later turns"),
    ("grpo", "rollout.top_p", 0.95, "§8.2"),
    ("grpo", "rollout.top_k", 40, "§8.2"),
    ("grpo", "rollout.template", "vcot", "§8.2 sys=vcot"),
    ("grpo", "eval.greedy", True, "§8.2 eval sampling"),
    ("grpo", "eval.temperature", 0.6, "§8.2 val_temperature (overridden by greedy)"),
    ("grpo", "eval.every", 4 * 16, "§8.2 evalsteps=4 rollouts x 16 steps"),
    ("grpo", "log.checkpoint_every", 16, "§8.2 checkpoint every rollout"),
    ("grpo", "log.keep_checkpoints", 3, "§8.2 keep 3"),
    ("grpo", "reward.form", "paper", "§9.2 paper form"),
    ("grpo", "reward.curiosity", True, "§9.2"),
    ("grpo", "reward.penalty", True, "§9.2"),
    ("grpo", "grpo.filter", "refill", "§9.3 filter=True"),
    ("grpo", "grpo.uniform_tol", 0.01, "§9.3 uniform group"),
    ("grpo", "grpo.replay_capacity", 0, "§9.3 deque maxlen = buffer size (0 = prompts * G)"),
    ("eval", "eval.benchmarks", "vstar,tallyqa,infovqa,mvbench", "§10"),
    ("eval", "eval.num_samples", 1, "§10 one sample"),
    ("eval", "eval.batch_size", 64, "§10 eval_bsz"),
    ("eval", "eval.max_new_tokens", 2048, "eval_vlm_new.sh: --max_out_tokens default, per turn"),
    ("eval", "eval.max_total_tokens", 18192, "eval_vlm_new.sh: prompt_max_len 10000 + generate_max_len 8192"),
    ("eval", "eval.call_token_limit", 12088, "§3.1 force stop 12*1024-200, same loop in eval"),
    ("eval", "rollout.video_crop_index", "original", "§4.1 target_image >= 2 after a selection"),
    ("eval", "eval.prompt_max_len", 10000, "§3.1 eval prompt_max_len"),
]


@pytest.mark.parametrize("mode,field,value,source", PAPER_7B, ids=[f"{r[0]}.{r[1]}" for r in PAPER_7B])
def test_7b_values_equal_the_reference(mode, field, value, source):
    cfg = C.from_config_dict(user_config(mode, "7b"))
    assert config_rules._get(cfg, field) == value, source


def test_7b_reward_constants_are_the_paper_forms():
    r = C.from_config_dict(user_config("grpo", "7b")).reward
    got = rewards.form_constants(r.form, alpha=r.alpha, H=r.H, beta=r.beta, N=r.N)
    assert got == {"alpha": 0.5, "H": 0.3, "beta": 0.05, "N": 1}  # §9.2 paper form
    # The released code's form alone brings its own bonus scale (§9.2: `/ rapr * 0.25`).
    assert rewards.form_constants("code", alpha=r.alpha, H=r.H, beta=r.beta, N=r.N)["alpha"] == 0.25


def test_7b_grpo_derived_numbers():
    cfg = C.from_config_dict(user_config("grpo", "7b"))
    assert cfg.grpo.samples_per_rollout == 4096  # 512 prompts x G 8 (§8.2)
    assert cfg.grpo.steps_per_rollout == 16  # 4096 / 256 (§8.2 "16 optimizer steps per rollout")
    # Per-device micro-batch of 4 samples on 8 devices (§8.2 micro batches): 256 / 8 / 8 = 4.
    assert cfg.grpo.train_batch_size // cfg.grpo.micro_batches // 8 == 4


def test_3b_differs_from_7b_only_in_the_base_model():
    for mode, module in MODES.items():
        a, b = module.get_config("3b").to_dict(), module.get_config("7b").to_dict()
        assert a["model"].pop("hf_id") == base.HF_ID_3B
        b["model"].pop("hf_id")
        a.pop("variant"), b.pop("variant")
        assert a == b, mode
