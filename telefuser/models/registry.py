"""Model registry: the class names a plan may use, and how to build and load each.

A plan names a class from this table, never an import path, so a plan cannot
run arbitrary code. Each entry knows its model and config classes and its
checkpoint key layouts; modules are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class ModelEntry:
    name: str
    module: str  # where the model and config classes live
    model_attr: str
    config_attr: str
    keys_module: str  # detect_layout / to_wan_layout for the checkpoint layouts

    def _load(self, module: str, attr: str) -> Any:
        return getattr(importlib.import_module(module), attr)

    @property
    def model_class(self) -> type:
        return self._load(self.module, self.model_attr)

    @property
    def config_class(self) -> type:
        return self._load(self.module, self.config_attr)

    def detect_layout(self, keys: Iterable[str]) -> str:
        detect: Callable[[Iterable[str]], str] = self._load(self.keys_module, "detect_layout")
        return detect(keys)

    def describe(self, shapes: Mapping[str, Any]) -> dict[str, Any]:
        """The arch dict of a checkpoint from its tensor names and shapes (for the models whose keys module has
        `describe`; it raises ValueError saying why the file is not this model's)."""
        return self._load(self.keys_module, "describe")(shapes)

    def convert(self, state: Mapping[str, Any], layout: str) -> dict[str, Any]:
        """A state dict in `layout` -> the model's own (Wan) layout. Always through the keys module: even a
        file in Wan's layout may hold tensors the model does not use (CLIP's text tower), dropped there."""
        return self._load(self.keys_module, "to_wan_layout")(state)

    def own_name(self, key: str, layout: str) -> str:
        """One tensor name of `layout` -> its name in the model's own layout (a rename; for the models whose keys
        module has `from_layout`: the Wan DiT, whose LoRAs are matched this way)."""
        return next(iter(self._load(self.keys_module, "from_layout")({key: None}, layout)))

    def lora_rows(self, module: str, out: int) -> Optional[tuple[str, Any]]:
        """(the model module, rows) for a LoRA module whose output rows are a slice or reordering of a model
        tensor's, else None (for the models whose keys module has `lora_rows`: HunyuanVideo-1.5's DiT)."""
        keys = importlib.import_module(self.keys_module)
        return getattr(keys, "lora_rows", lambda *_: None)(module, out)


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry("WanDiT", "telefuser.models.wan.dit", "WanDiT", "WanDiTConfig", "telefuser.models.wan.dit_keys"),
        ModelEntry("WanVAE", "telefuser.models.wan.vae", "WanVAE", "WanVAEConfig", "telefuser.models.wan.vae_keys"),
        ModelEntry("Wan22VAE", "telefuser.models.wan.vae22", "Wan22VAE", "Wan22VAEConfig",
                   "telefuser.models.wan.vae22_keys"),
        ModelEntry("UMT5Encoder", "telefuser.models.t5.umt5", "UMT5Encoder", "UMT5Config", "telefuser.models.t5.umt5_keys"),
        ModelEntry("CLIPVision", "telefuser.models.clip.vision", "ClipVisionEncoder", "ClipVisionConfig",
                   "telefuser.models.clip.vision_keys"),
        ModelEntry("RIFE", "telefuser.models.rife.ifnet", "IFNet", "IFNetConfig", "telefuser.models.rife.keys"),
        ModelEntry("TAEHV", "telefuser.models.taehv.decoder", "TAEHV", "TAEHVConfig", "telefuser.models.taehv.keys"),
        ModelEntry("HunyuanVideo15DiT", "telefuser.models.hunyuan15.dit", "HunyuanVideo15DiT", "HunyuanVideo15DiTConfig",
                   "telefuser.models.hunyuan15.dit_keys"),
        ModelEntry("HunyuanVideo15VAE", "telefuser.models.hunyuan15.vae", "HunyuanVideo15VAE", "HunyuanVideo15VAEConfig",
                   "telefuser.models.hunyuan15.vae_keys"),
        ModelEntry("HunyuanVideo15SRUpsampler720p", "telefuser.models.hunyuan15.sr", "SRUpsampler720p",
                   "SRUpsampler720pConfig", "telefuser.models.hunyuan15.sr_keys"),
        ModelEntry("HunyuanVideo15SRUpsampler1080p", "telefuser.models.hunyuan15.sr", "SRUpsampler1080p",
                   "SRUpsampler1080pConfig", "telefuser.models.hunyuan15.sr_keys"),
        ModelEntry("Qwen25VLTextEncoder", "telefuser.models.hunyuan15.qwen_text", "Qwen25VLTextEncoder",
                   "Qwen25VLTextConfig", "telefuser.models.hunyuan15.qwen_text_keys"),
        ModelEntry("ByT5Encoder", "telefuser.models.t5.umt5", "UMT5Encoder", "UMT5Config",
                   "telefuser.models.hunyuan15.byt5_keys"),
        ModelEntry("SigLIPVision", "telefuser.models.hunyuan15.siglip", "SigLIPVisionEncoder", "SigLIPVisionConfig",
                   "telefuser.models.hunyuan15.siglip_keys"),
    )
}


def get(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no model class {name!r} in the registry; known: {', '.join(REGISTRY)}") from None


def detect_hunyuan15(shapes: Mapping[str, Any]) -> Any:
    """HunyuanVideo-1.5's weight detection (`hunyuan15.detect.detect`: pure functions of tensor names and shapes, no
    torch), for the compiler: a `Found` (class, layout, arch, notes, DiT role) or None. Run before Wan's detectors."""
    return importlib.import_module("telefuser.models.hunyuan15.detect").detect(dict(shapes))


def hunyuan15_used(found: Any, key: str) -> bool:
    """Whether the HunyuanVideo-1.5 model `found` loads this tensor of its file (`hunyuan15.detect.used`)."""
    return importlib.import_module("telefuser.models.hunyuan15.detect").used(found, key)
