"""Fake builtin Lora ``network`` module: NetworkOnDisk, Network, NetworkModule (multiplier / scale / finalize)."""

import hashlib
import json
import os
import struct

import torch


def _safetensors_metadata(filename):
    try:
        with open(filename, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        return dict(header.get("__metadata__") or {})
    except (OSError, ValueError, struct.error):
        return {}


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        self.metadata = _safetensors_metadata(filename) if self.is_safetensors else {}
        self.alias = self.metadata.get("ss_output_name", self.name)
        self.hash = None
        self.shorthash = None

    def set_hash(self, v):
        import networks

        self.hash = v
        self.shorthash = self.hash[0:12]
        if self.shorthash:
            networks.available_network_hash_lookup[self.shorthash] = self

    def read_hash(self):
        if not self.hash:
            with open(self.filename, "rb") as handle:
                self.set_hash(hashlib.sha256(handle.read()).hexdigest())

    def get_alias(self):
        import networks

        if self.alias.lower() in networks.forbidden_network_aliases:
            return self.name
        return self.alias


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.bundle_embeddings = {}
        self.mtime = None
        self.mentioned_name = None


class NetworkWeights:
    def __init__(self, network_key, sd_key, w, sd_module):
        self.network_key = network_key
        self.sd_key = sd_key
        self.w = w
        self.sd_module = sd_module


class NetworkModule:
    def __init__(self, net, weights):
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module
        if isinstance(self.sd_module, torch.nn.MultiheadAttention):
            self.shape = self.sd_module.out_proj.weight.shape  # the builtin assumes q/k/v/out are all this shape
        else:
            self.shape = self.sd_module.weight.shape
        self.dim = None
        self.bias = weights.w.get("bias")
        self.alpha = weights.w["alpha"].item() if "alpha" in weights.w else None
        self.scale = weights.w["scale"].item() if "scale" in weights.w else None
        # DoRA (LyCORIS dora_scale): the builtin normalises over every axis but the input one (v1.10 network.py)
        self.dora_scale = weights.w.get("dora_scale")
        self.dora_norm_dims = len(self.shape) - 1

    def multiplier(self):
        # text-encoder keys carry "transformer" in their first 20 characters; UNet keys start "diffusion_model_"
        if "transformer" in self.sd_key[:20]:
            return self.network.te_multiplier
        return self.network.unet_multiplier

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def apply_weight_decompose(self, updown, orig_weight):
        """(W + dW) * m / ||W + dW|| - W, the norm taken per input column (over output rows and kernel)."""
        w = orig_weight.to(updown.dtype)
        merged = updown.to(w.device) + w
        cols = merged.shape[1]
        norm = merged.transpose(0, 1).reshape(cols, -1).norm(dim=1).reshape(1, cols, *[1] * (merged.dim() - 2))
        m = self.dora_scale.to(device=w.device, dtype=updown.dtype)
        return merged * (m / norm) - w

    def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
        if self.bias is not None:
            updown = updown.reshape(self.bias.shape) + self.bias.to(orig_weight.device, dtype=updown.dtype)
            updown = updown.reshape(output_shape)
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        if orig_weight.size().numel() == updown.size().numel():
            updown = updown.reshape(orig_weight.shape)
        if ex_bias is not None:
            ex_bias = ex_bias * self.multiplier()
        updown = updown * self.calc_scale()
        if self.dora_scale is not None:
            updown = self.apply_weight_decompose(updown, orig_weight)
        return updown * self.multiplier(), ex_bias

    def calc_updown(self, target):
        raise NotImplementedError

    def forward(self, x, y):
        raise NotImplementedError
