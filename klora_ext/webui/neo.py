"""Forge Neo (the continuation of the ``backend/`` Forge line): what differs from upstream Forge in what the Forge
adapter touches. Found by reading both trees (upstream ``dfdcbab6`` against Neo, ``forge_version`` "neo"):

* ``backend.patcher.base.ModelPatcher`` (``lora_patches``, ``add_patches(filename=, patches=, strength_patch=,
  online_mode=)``, ``refresh_loras``), ``LoraLoader.loaded_hash``/``backup``, ``model_lora_keys_unet/clip`` and
  ``load_lora`` keep their signatures and meaning (Neo takes the key maps from its own ComfyUI copy and holds the
  model by weakref in the loader); ``networks.load_lora_state_dict``, ``forge_objects_after_applying_lora``,
  ``process_before_every_sampling`` and the denoiser's ``step``/``total_steps``/``steps`` are unchanged; so the
  Forge adapter serves Neo as it is.
* New in Neo: Nunchaku (SVDQuant) checkpoints. For those ``networks.load_lora_for_models`` hands each LoRA to the
  quantized model (``diffusion_model.loras``) and adds no patches; their weights are packed 4-bit. K-LoRA cannot
  switch single layers there: it says so (feature test on ``backend.args.dynamic_args["nunchaku"]``, which Neo's
  loader sets for the loaded checkpoint; upstream Forge never sets it).
"""

from __future__ import annotations

NUNCHAKU_MESSAGE = (
    "[K-LoRA] the loaded checkpoint is a Nunchaku (SVDQuant) model: Forge Neo applies LoRAs inside its 4-bit "
    "kernels, so K-LoRA cannot switch single layers. On Forge Neo K-LoRA supports fp32/fp16/bf16, fp8, GGUF and "
    "NF4/FP4 checkpoints (SD1.5, SDXL, Flux)"
)


def unsupported_model_reason() -> str | None:
    """A message when the loaded model is one K-LoRA cannot switch on this host, else None."""
    try:
        from backend.args import dynamic_args  # type: ignore[import-not-found]
    except ImportError:
        return None
    return NUNCHAKU_MESSAGE if dynamic_args.get("nunchaku", False) else None


__all__ = ["NUNCHAKU_MESSAGE", "unsupported_model_reason"]
