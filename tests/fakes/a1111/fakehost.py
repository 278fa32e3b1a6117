"""Builds a fake A1111 host around a tiny model of real torch layers and real LoRA files (tests, benchmarks)."""

import importlib.util
import os
from pathlib import Path

import extra_networks_lora
import network_lora
import networks
import torch
import xyz_grid
from modules import extra_networks, processing, script_callbacks, scripts, shared

from klora_ext import synthetic

REPO = Path(__file__).resolve().parents[3]


def _add(root, path, layer):
    parts = path.split(".")
    node = root
    for part in parts[:-1]:
        child = node._modules.get(part)
        if child is None:
            child = torch.nn.Module()
            node.add_module(part, child)
        node = child
    node.add_module(parts[-1], layer)


def make_layer(shape, dtype=torch.float32):
    if len(shape) == 4:
        layer = torch.nn.Conv2d(shape[1], shape[0], shape[2], padding=shape[2] // 2)
    else:
        layer = torch.nn.Linear(shape[1], shape[0])
    return layer.to(dtype)


def te2_layer_ids(blocks, width):
    """HF-style ids of an OpenCLIP (SDXL TE2) block set: what a kohya file names ``lora_te2_...``."""
    out = []
    for i in range(blocks):
        base = f"te2:text_model.encoder.layers.{i}"
        out += [(f"{base}.self_attn.{x}_proj", (width, width)) for x in ("q", "k", "v", "out")]
        out += [(f"{base}.mlp.fc1", (4 * width, width)), (f"{base}.mlp.fc2", (width, 4 * width))]
    return out


class _ResBlock(torch.nn.Module):
    """An OpenCLIP residual block's LoRA-bearing parts: a real ``nn.MultiheadAttention`` (fused in_proj) + MLP."""

    def __init__(self, width, dtype):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, 2, batch_first=True).to(dtype)
        torch.nn.init.normal_(self.attn.out_proj.bias)  # nonzero, so a bias mix-up would show
        self.mlp = torch.nn.Module()
        self.mlp.c_fc = make_layer((4 * width, width), dtype)
        self.mlp.c_proj = make_layer((width, 4 * width), dtype)


class FakeSDModel(torch.nn.Module):
    """``model.diffusion_model`` (UNet paths) and ``cond_stage_model.wrapped.transformer`` (SD1 CLIP paths).

    ``te2=(blocks, width)`` makes it SDXL-like: ``conditioner.embedders[0]`` holds the CLIP-L layers (names
    ``0_transformer_...``) and ``embedders[1]`` an OpenCLIP ``model.transformer.resblocks`` stack (names
    ``1_model_transformer_resblocks_N_attn`` for the attention module, ``..._mlp_c_fc``)."""

    def __init__(self, layers, dtype=torch.float32, seed=1234, te2=None):
        super().__init__()
        torch.manual_seed(seed)
        self.model = torch.nn.Module()
        self.model.diffusion_model = torch.nn.Module()
        self.is_sdxl = te2 is not None
        te_root = torch.nn.Module()
        te_root.wrapped = torch.nn.Module()
        te_root.wrapped.transformer = torch.nn.Module()
        self.attn_layers = []
        if self.is_sdxl:
            self.conditioner = torch.nn.Module()
            clip_g = torch.nn.Module()
            clip_g.wrapped = torch.nn.Module()
            clip_g.wrapped.model = torch.nn.Module()
            clip_g.wrapped.model.transformer = torch.nn.Module()
            blocks, width = te2
            resblocks = torch.nn.ModuleList([_ResBlock(width, dtype) for _ in range(blocks)])
            clip_g.wrapped.model.transformer.resblocks = resblocks
            self.conditioner.embedders = torch.nn.ModuleList([te_root, clip_g])
            self.attn_layers = [b.attn for b in resblocks]
        else:
            self.cond_stage_model = te_root
        for layer_id, shape in layers:
            component, path = layer_id.split(":", 1)
            root = self.model.diffusion_model if component == "unet" else te_root.wrapped.transformer
            _add(root, path, make_layer(shape, dtype))
        self.unet_layers = [
            m for m in self.model.diffusion_model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        ]
        te_parts = self.conditioner.embedders if self.is_sdxl else [te_root]
        # out_proj of an attention module is a Linear the attention never calls: not a layer of its own
        skip = {id(a.out_proj) for a in self.attn_layers}
        self.te_layers = [
            m
            for part in te_parts
            for m in part.wrapped.modules()
            if isinstance(m, torch.nn.Linear) and id(m) not in skip
        ]
        self.te_calls = 0

    @staticmethod
    def _call(layer):
        if isinstance(layer, torch.nn.Conv2d):
            x = torch.full((1, layer.in_channels, 4, 4), 0.1, dtype=layer.weight.dtype)
            return networks.network_Conv2d_forward(layer, x)
        x = torch.full((1, layer.in_features), 0.1, dtype=layer.weight.dtype)
        return networks.network_Linear_forward(layer, x)

    def unet_forward(self, x):
        with torch.no_grad():
            total = sum(float(self._call(layer).double().sum()) for layer in self.unet_layers)
        return x * 0.5 + total * 1e-3

    def te_forward(self, prompts):
        self.te_calls += 1
        with torch.no_grad():
            for layer in self.te_layers:
                self._call(layer)
            for attn in self.attn_layers:
                x = torch.full((1, 2, attn.embed_dim), 0.1, dtype=attn.in_proj_weight.dtype)
                networks.network_MultiheadAttention_forward(attn, x, x, x, need_weights=False)
            return self._te_weights()

    def _te_weights(self):
        out = {layer.network_layer_name: layer.weight.detach().clone() for layer in self.te_layers}
        for attn in self.attn_layers:
            out[attn.network_layer_name + ":in_proj"] = attn.in_proj_weight.detach().clone()
            out[attn.network_layer_name + ":out_proj"] = attn.out_proj.weight.detach().clone()
            out[attn.network_layer_name + ":out_bias"] = attn.out_proj.bias.detach().clone()
        return out

    def weights(self):
        out = {m.network_layer_name: m.weight.detach().clone() for m in self.unet_layers}
        out.update(self._te_weights())
        return out


def layer_specs(scope="all"):
    """Real SD1.5 layer ids with tiny dims (UNet attention, ff, proj, resnet convs) plus one CLIP layer block."""
    return synthetic.layer_shapes("tiny", scope, include_te=True)


def write_lora(path, layers, *, rank=2, alpha=1.0, seed=0, scale=1.0, alias=None):
    sd = synthetic.make_lora_state_dict(layers, rank, style="kohya", alpha=alpha, seed=seed, scale=scale, arch="sdxl")
    metadata = {"ss_output_name": alias} if alias else None
    return synthetic.save_lora(path, sd, metadata)


class FakeHost:
    """One fake WebUI: model, LoRA folder, txt2img/img2img script runners with the real K-LoRA Script."""

    def __init__(self, tmp_path, *, dtype=torch.float32, model_layers=None, te2=None):
        self.tmp = Path(tmp_path)
        self.lora_dir = self.tmp / "Lora"
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        shared.cmd_opts.lora_dir = str(self.lora_dir)
        specs = model_layers or layer_specs()
        self.model = FakeSDModel(specs, dtype=dtype, te2=te2)
        shared.sd_model = self.model
        networks.assign_network_names_to_compvis_modules(self.model)
        self.pristine = self.model.weights()
        extra_networks.register_extra_network(extra_networks_lora.ExtraNetworkLora())
        # Real LoRA files: content and style patch every layer (UNet + CLIP) with different magnitudes per layer;
        # "other" (a prompt LoRA) patches the attention layers.
        unet = [(i, s) for i, s in specs if i.startswith("unet:")]
        te = [(i, s) for i, s in specs if i.startswith("te1:")]
        if te2 is not None:
            te = te + te2_layer_ids(*te2)  # content and style both patch every TE2 q/k/v/out and MLP layer
        attention = [(i, s) for i, s in unet if ".attn" in i]
        self.paths = {
            "content": write_lora(
                self.lora_dir / "subject_v1.safetensors", unet + te, rank=2, alpha=1.0, seed=11, alias="subject"
            ),
            "style": write_lora(self.lora_dir / "painterly.safetensors", unet[:-2] + te, rank=4, alpha=2.0, seed=22),
            "other": write_lora(self.lora_dir / "other.safetensors", attention, rank=2, alpha=2.0, seed=33),
        }
        networks.list_available_networks()
        self.module = self._load_entry()
        self.Script = self.module.Script
        scripts.scripts_data[:] = [
            scripts.ScriptClassData(self.Script, str(REPO / "scripts" / "klora.py"), str(REPO), self.module),
            scripts.ScriptClassData(xyz_grid.Script, "/webui/scripts/xyz_grid.py", "/webui", xyz_grid),
        ]
        script_callbacks.ui_settings_callback()
        script_callbacks.before_ui_callback()
        self.txt2img_runner, self.txt2img_script = self._runner(False)
        self.img2img_runner, self.img2img_script = self._runner(True)
        self.records = []
        processing.unet_forward_hooks[:] = [self._record]
        network_lora.calc_log.clear()
        networks.merge_log.clear()

    def _load_entry(self):
        spec = importlib.util.spec_from_file_location("klora.py", REPO / "scripts" / "klora.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def _runner(self, is_img2img):
        runner = scripts.ScriptRunner(is_img2img=is_img2img)
        script = self.Script()
        script.filename = str(REPO / "scripts" / "klora.py")
        runner.add_script(script)
        return runner, script

    # ---- recording ----------------------------------------------------------------------------------------------
    def _record(self, p, denoiser):
        self.records.append(
            {
                "p": p,
                "pass": p.pass_no,
                "hires": bool(getattr(p, "is_hr_pass", False)),
                "call": denoiser.step,
                "steps": denoiser.steps,
                "total": denoiser.total_steps,
                "weights": self.model.weights(),
                "merged": list(networks.merge_log),
                "calc": list(network_lora.calc_log),
            }
        )
        networks.merge_log.clear()
        network_lora.calc_log.clear()

    # ---- generations --------------------------------------------------------------------------------------------
    def script_args(self, args, *, img2img=False):
        """Like the API: start from the UI defaults, overwrite the script's slice with the given values."""
        runner = self.img2img_runner if img2img else self.txt2img_runner
        script = self.img2img_script if img2img else self.txt2img_script
        values = runner.default_args()
        if args is not None:
            args = list(args) if not isinstance(args, dict) else [args]
            for i in range(min(len(args), script.args_to - script.args_from)):
                values[script.args_from + i] = args[i]
        return tuple(values)

    def make_p(self, args=None, *, img2img=False, **kwargs):
        cls = processing.StableDiffusionProcessingImg2Img if img2img else processing.StableDiffusionProcessingTxt2Img
        runner = self.img2img_runner if img2img else self.txt2img_runner
        return cls(scripts=runner, script_args=self.script_args(args, img2img=img2img), **kwargs)

    def run(self, p):
        shared.state.begin()
        self.records.clear()
        networks.merge_log.clear()
        network_lora.calc_log.clear()
        return processing.process_images(p)

    def generate(self, args=None, **kwargs):
        p = self.make_p(
            args, **{k: v for k, v in kwargs.items() if k != "img2img"}, img2img=kwargs.get("img2img", False)
        )
        return p, self.run(p)

    @property
    def adapter(self):
        return self.module_state().adapter

    def module_state(self):
        from klora_ext.webui import script

        return script.STATE

    def settle(self):
        """One UNet + text-encoder forward with whatever is loaded now (what the next generation would see first)."""
        self.model.unet_forward(torch.zeros(1))
        self.model.te_forward([""])

    def files(self):
        return {k: os.fspath(v) for k, v in self.paths.items()}
