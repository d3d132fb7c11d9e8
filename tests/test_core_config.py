"""telefuser.core.config: the reference design's Python names are the schema's models; a Recipe built in
Python compiles like its TOML file, and to_toml writes a file that loads back to an equal Recipe."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pydantic
import pytest

import telefuser
import telefuser.schema.enums as enums
import telefuser.schema.model_config as model_config
import telefuser.schema.parallel as parallel
import telefuser.schema.recipe as schema
from telefuser.compiler import load_recipe
from telefuser.core.config import (
    AspectRatioParam,
    AttentionConfig,
    AttnImplType,
    CompileConfig,
    FeatureCacheConfig,
    Layer1,
    Layer3,
    LoraConfig,
    ModelClass,
    ModelRole,
    ModelRuntimeConfig,
    ModelSpec,
    OffloadConfig,
    ParallelConfig,
    PipelineType,
    QuantConfig,
    Recipe,
    Resolution,
    ResolutionParam,
    SampleSolver,
    SparseAttentionConfig,
    Target,
    TargetDevice,
    TorchDtype,
    Wan21VideoPipelineConfig,
    Wan22VideoPipelineConfig,
    WeightOffloadType,
)
from telefuser.errors import RecipeError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(RECIPES.glob("*.toml"))


def test_design_names_are_the_schema_models_not_copies():
    from telefuser.core import config

    for name in ("ModelRuntimeConfig", "OffloadConfig", "LoraConfig", "AttentionConfig", "SparseAttentionConfig",
                 "CompileConfig", "QuantConfig", "FeatureCacheConfig"):
        assert getattr(config, name) is getattr(model_config, name), name
    assert config.ParallelConfig is parallel.ParallelConfig
    assert config.Recipe is schema.Recipe
    for name in ("AttnImplType", "WeightOffloadType", "QuantType"):
        assert getattr(config, name) is getattr(enums, name), name
    assert Wan21VideoPipelineConfig is Wan22VideoPipelineConfig is schema.Layer2
    assert set(config.__all__) <= set(dir(config))


def test_design_example_calls():
    fa3 = AttentionConfig.dense_attention(AttnImplType.FLASH_ATTN_3)
    assert (fa3.attn_impl, fa3.sparse_config, fa3.is_sparse()) == ("FLASH_ATTN_3", None, False)
    assert AttentionConfig.dense_attention().attn_impl == AttnImplType.FLASH_ATTN_2  # the design's default
    radial = AttentionConfig.radial_attention(dense_layers=1)
    assert radial.attn_impl == AttnImplType.RADIAL_ATTN and radial.is_sparse()
    assert radial.sparse_config == SparseAttentionConfig(sparse_impl="radial", dense_timesteps=40, dense_layers=1)
    local = AttentionConfig.local_sparse_attention(local_window_size=3)
    assert (local.attn_impl, local.sparse_config.sparse_impl, local.sparse_config.local_window_size) == (
        "LOCAL_SPARSE_ATTN", "local", 3)
    parallel = ParallelConfig(device_ids=[0, 1, 2, 3], sp_ulysses_degree=4)
    assert parallel.validate() is parallel and parallel.world_size == 4
    runtime = ModelRuntimeConfig(
        attention_config=fa3,
        offload_config=OffloadConfig(offload_type=WeightOffloadType.MODEL_CPU_OFFLOAD),
        compile_config=CompileConfig(enabled=True), quant_config=QuantConfig(quant_type="fp8_e4m3fn"),
        lora_configs=[LoraConfig(path="style.safetensors", strength=0.8)], feature_cache_config=FeatureCacheConfig(),
    )
    assert runtime.offload_config.offload_type == "MODEL_CPU_OFFLOAD"


def test_sparse_impl_must_agree_with_attn_impl():
    with pytest.raises(pydantic.ValidationError, match="runs sparse_impl 'radial'"):
        AttentionConfig(attn_impl=AttnImplType.RADIAL_ATTN, sparse_config=SparseAttentionConfig(sparse_impl="local"))
    AttentionConfig(attn_impl=AttnImplType.RADIAL_ATTN, sparse_config=SparseAttentionConfig())  # unnamed: fine


def test_pipeline_configs_file_model_keywords_under_models():
    dit, vae = ModelRuntimeConfig(attention_config=AttentionConfig.dense_attention()), ModelRuntimeConfig()
    wan21 = Wan21VideoPipelineConfig(dit_config=dit, vae_config=vae, text_encoding_config=ModelRuntimeConfig(),
                                     clip_config=ModelRuntimeConfig(), sample_solver="unipc", enable_clip_stage=True)
    assert set(wan21.models) == {"dit", "vae", "text_encoder", "image_encoder"} and wan21.models["dit"] == dit
    assert "dit_config" not in wan21.model_dump()  # a constructor keyword, not a field
    assert wan21 == schema.Layer2(models={"dit": dit, "vae": vae, "text_encoder": {}, "image_encoder": {}},
                                  sample_solver="unipc", enable_clip_stage=True)
    wan22 = Wan22VideoPipelineConfig(dit_high_config=dit, dit_low_config=ModelRuntimeConfig(), boundary=0.875,
                                     cfg_scale_high=4.0, cfg_scale_low=3.0, sample_solver="euler")
    assert set(wan22.models) == {"dit_high_noise", "dit_low_noise"}
    moe = Recipe(name="moe", target=Target(device="cpu"), layer2=wan22, layer1=Layer1(models=[
        ModelSpec(name=role, role=role, path=f"{role}.safetensors")
        for role in ("dit_high_noise", "dit_low_noise", "vae", "text_encoder", "tokenizer")]))
    assert moe.layer1.is_moe and moe.layer2.models["dit_high_noise"] == dit
    with pytest.raises(pydantic.ValidationError, match="dit_config configures model 'dit'"):
        Wan21VideoPipelineConfig(dit_config=dit, models={"dit": dit})
    with pytest.raises(pydantic.ValidationError, match="unknown model"):  # no VFI model in layer 1 yet
        Recipe.model_validate({**tiny_recipe().to_data(), "layer2": {"vfi_config": {}}})


def test_parallel_config_validate():
    with pytest.raises(ValueError, match=r"multiply to 4 \(.*sp_ulysses_degree=4.*\), but device_ids \[0, 1\] lists 2"):
        ParallelConfig(device_ids=[0, 1], sp_ulysses_degree=4).validate()
    with pytest.raises(ValueError, match="device_ids is None, which means 1 device"):
        ParallelConfig(cfg_degree=2, sp_ulysses_degree=2).validate()
    assert ParallelConfig().validate() == ParallelConfig()
    assert ParallelConfig(device_ids=[4, 5], cfg_degree=2).validate().cfg_degree == 2
    # pydantic's own machinery is untouched: validation, nesting, copies, schema.
    assert ParallelConfig.model_validate({"dp_degree": 2}).dp_degree == 2
    assert schema.Layer2(parallel_config={"tp_degree": 2}).parallel_config.tp_degree == 2
    assert ParallelConfig(dp_degree=2).model_copy(update={"dp_degree": 1}).validate().dp_degree == 1
    assert "dp_degree" in ParallelConfig.model_json_schema()["properties"]
    # On the class, `validate(value)` keeps pydantic's (deprecated) meaning: model_validate.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parsed = ParallelConfig.validate({"sp_ring_degree": 2})
    assert isinstance(parsed, ParallelConfig) and parsed.sp_ring_degree == 2
    assert any(issubclass(w.category, pydantic.PydanticDeprecatedSince20) for w in caught)


def test_wrong_typed_field_names_the_field():
    with pytest.raises(pydantic.ValidationError, match="sp_ulysses_degree"):
        ParallelConfig(sp_ulysses_degree="four")
    with pytest.raises(pydantic.ValidationError, match=r"attention_config\.attn_impl"):
        ModelRuntimeConfig(attention_config={"attn_impl": "FLASH_ATTN"})
    with pytest.raises(pydantic.ValidationError, match="device_id"):
        ModelRuntimeConfig(device_id=0)  # a reference key the recipe does not have: refused, not ignored


def tiny_recipe() -> Recipe:
    """recipes/tiny.toml, written in Python with the reference design's names."""
    return Recipe(
        name="tiny",
        description="Tiny Wan2.1 T2V model set on the CPU (tests, demo)",
        target=Target(device=TargetDevice.CPU),
        layer1=Layer1(pipeline=PipelineType.WAN_T2V, torch_dtype=TorchDtype.FLOAT32, models=[
            ModelSpec(name="dit", role=ModelRole.DIT, class_=ModelClass.WAN_DIT, path="tiny/dit.safetensors",
                      arch={"num_heads": 2}),
            ModelSpec(name="vae", role=ModelRole.VAE, class_=ModelClass.WAN_VAE, path="tiny/vae.safetensors"),
            ModelSpec(name="text_encoder", role=ModelRole.TEXT_ENCODER, class_=ModelClass.UMT5_ENCODER,
                      path="tiny/text_encoder.safetensors", arch={"num_heads": 2}),
            ModelSpec(name="tokenizer", role=ModelRole.TOKENIZER, class_=ModelClass.UMT5_TOKENIZER,
                      path="tiny/tokenizer.json"),
        ]),
        layer2=Wan21VideoPipelineConfig(sample_solver=SampleSolver.UNIPC, num_inference_steps=4, num_frames=9, fps=8,
                                        cfg_scale=5.0, sigma_shift=5.0, text_len=64),
        layer3=Layer3(resolution=ResolutionParam(default=Resolution.P144, choices=[Resolution.P144, Resolution.P480]),
                      aspect_ratio=AspectRatioParam(default="16:9", choices=["16:9", "9:16", "1:1"])),
    )


def _without_timestamp(plan) -> dict:
    raw = plan.model_dump(mode="json", by_alias=True)
    raw.pop("timestamp")
    return raw


def test_python_recipe_compiles_to_the_toml_plan(monkeypatch):
    built = tiny_recipe()
    assert built == load_recipe(RECIPES / "tiny.toml").recipe
    from_toml = telefuser.compile(RECIPES / "tiny.toml")
    from_object = telefuser.compile(built, base_dir=RECIPES)
    assert from_object.plan_hash == from_toml.plan_hash
    assert _without_timestamp(from_object) == _without_timestamp(from_toml)
    assert from_object.recipe.path == str(RECIPES / "tiny.toml")
    monkeypatch.chdir(RECIPES)  # base_dir defaults to the current directory
    assert telefuser.compile(built).plan_hash == from_toml.plan_hash
    assert telefuser.compile(str(RECIPES / "tiny.toml"), inspect_weights=False).plan_hash == \
        telefuser.compile(built, inspect_weights=False).plan_hash
    # overrides apply to an object as to a file
    assert telefuser.compile(built, overrides=["layer2.num_inference_steps=2"]).layer2_inference_config.num_inference_steps == 2


def test_python_recipe_changes_change_the_hash():
    base = telefuser.compile(tiny_recipe(), base_dir=RECIPES, inspect_weights=False)
    changed = tiny_recipe()
    changed.layer2.models["dit"] = ModelRuntimeConfig(attention_config=AttentionConfig.dense_attention(AttnImplType.TORCH_SDPA))
    other = telefuser.compile(changed, base_dir=RECIPES, inspect_weights=False)
    assert other.plan_hash != base.plan_hash and other.recipe.source_sha256 != base.recipe.source_sha256


def test_in_memory_recipe_errors_name_it(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="already complete"):
        telefuser.compile(tiny_recipe().model_copy(update={"extends": "base.toml"}), base_dir=RECIPES)
    with pytest.raises(RecipeError, match="not a folder"):
        telefuser.compile(tiny_recipe(), base_dir=tmp_path / "missing")
    monkeypatch.delenv("TF_TEST_UNSET_ROOT", raising=False)
    unset = tiny_recipe()
    unset.layer1.models[0].path = "${TF_TEST_UNSET_ROOT}/dit.safetensors"
    with pytest.raises(RecipeError, match=r"recipe 'tiny' \(built in Python\).*TF_TEST_UNSET_ROOT"):
        telefuser.compile(unset, base_dir=RECIPES)
    with pytest.raises(TypeError, match="base_dir applies to a Recipe object"):
        telefuser.compile(RECIPES / "tiny.toml", base_dir=RECIPES)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_to_toml_round_trips_shipped_recipes(path, tmp_path):
    loaded = load_recipe(path)
    text = loaded.recipe.to_toml()
    assert Recipe.model_validate(tomllib.loads(text)) == loaded.recipe
    written = tmp_path / path.name
    written.write_text(text, encoding="utf-8")
    again = load_recipe(written)  # through the JSON Schema too
    assert again.recipe == loaded.recipe and again.source_sha256 == loaded.source_sha256


def test_to_toml_round_trips_every_kind_of_value(tmp_path):
    recipe = tiny_recipe()
    recipe.description = 'quotes " and \\ backslash,\nnewline, tab\t, unicode é, del \x7f'
    recipe.layer1.models[0].arch = {"num_heads": 2, "odd key.with dots": 1.5e-7}
    recipe.layer2.tile_size = [32, 30]
    recipe.layer2.models = {
        "dit": ModelRuntimeConfig(attention_config=AttentionConfig.radial_attention(decay_factor=0.5),
                                  lora_configs=[LoraConfig(path="a.safetensors"), LoraConfig(path="b", strength=0.3)]),
        "vae": ModelRuntimeConfig(),
    }
    recipe.layer2.parallel_config = ParallelConfig(device_ids=[0, 1], cfg_degree=2)
    recipe.target.num_devices = 2
    recipe.target.packages = []
    recipe = Recipe.model_validate(recipe.model_dump(by_alias=True))  # re-check the cross-field rules
    back = Recipe.model_validate(tomllib.loads(recipe.to_toml()))
    assert back == recipe
    (tmp_path / "tiny.toml").write_text(recipe.to_toml(), encoding="utf-8")
    assert load_recipe(tmp_path / "tiny.toml").recipe == recipe
