"""Fake builtin ``network_lora``: LoRA / LoCon modules (up @ down, conv down k x k, up 1 x 1)."""

import network
import torch
import torch.nn.functional as F
from modules import devices

calc_log: list[tuple[str, str]] = []  # (network name, layer name) per calc_updown call: tests count re-merges


class ModuleTypeLora:
    def create_module(self, net, weights):
        if all(x in weights.w for x in ("lora_up.weight", "lora_down.weight")):
            return NetworkModuleLora(net, weights)
        return None


class NetworkModuleLora(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.up = weights.w["lora_up.weight"].to(devices.dtype)
        self.down = weights.w["lora_down.weight"].to(devices.dtype)
        self.dim = self.down.shape[0]
        if isinstance(self.sd_module, torch.nn.Conv2d):
            self.stride, self.padding = self.sd_module.stride, self.sd_module.padding
        else:
            self.stride = self.padding = None

    def calc_updown(self, orig_weight):
        calc_log.append((self.network.name, self.sd_key))
        up = self.up.to(orig_weight.device)
        down = self.down.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1)]
        if down.dim() == 4:
            output_shape += list(down.shape[2:])
            updown = (up.flatten(1) @ down.flatten(1)).reshape(output_shape)
        else:
            updown = up @ down
        return self.finalize_updown(updown, orig_weight, output_shape)

    def forward(self, x, y):
        if self.stride is not None:
            h = F.conv2d(x, self.down, stride=self.stride, padding=self.padding)
            h = F.conv2d(h, self.up)
        else:
            h = F.linear(F.linear(x, self.down), self.up)
        return y + h * self.multiplier() * self.calc_scale()
