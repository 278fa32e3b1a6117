"""Fake ``modules.processing`` with the order of events of A1111 v1.10 (research notes §2.3, §2.4):

process() -> per batch-count iteration: activate extra networks (-> after_extra_networks_activate) -> process_batch
-> setup_conds (text-encoder forward unless cached) -> sample: new sampler -> process_before_every_sampling -> per
denoiser call: interrupt check, cfg_denoiser callback, UNet forward (lazy merges) -> [hires: new sampler, activate,
hr conds, before_hr, process_before_every_sampling, img2img sampling] -> images + infotexts; then postprocess().
An exception during sampling propagates (postprocess is skipped); an interrupt ends sampling and postprocess runs.
"""

import torch

from modules import extra_networks, script_callbacks, shared
from modules.infotext_utils import quote
from modules.shared import state

SECOND_ORDER = ("Heun", "DPM2")
LEGACY_PARAMS = False  # True: v1.6/1.7 callback params (no .denoiser)
unet_forward_hooks: list = []  # hook(p, denoiser): after every UNet forward


class InterruptedException(BaseException):
    pass


class CFGDenoiser:
    def __init__(self, sampler):
        self.sampler = sampler
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.p = None

    def forward(self, x):
        if state.interrupted or state.skipped:
            raise InterruptedException
        if LEGACY_PARAMS:
            params = script_callbacks.CFGDenoiserParamsV16(x, None, None, state.sampling_step, state.sampling_steps,
                                                           None, None)
        else:
            params = script_callbacks.CFGDenoiserParams(x, None, None, state.sampling_step, state.sampling_steps,
                                                        None, None, self)
        script_callbacks.cfg_denoiser_callback(params)
        p = self.p
        fail = getattr(p, "fail_at", None)
        if fail is not None and fail == (p.pass_no, self.step):
            raise RuntimeError("CUDA out of memory (fake)")
        out = shared.sd_model.unet_forward(x)
        for hook in list(unet_forward_hooks):
            hook(p, self)
        self.step += 1
        return out


class Sampler:
    def __init__(self, name):
        self.name = name
        self.second_order = name in SECOND_ORDER
        self.model_wrap_cfg = CFGDenoiser(self)
        self.p = None

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = steps * 2 if self.second_order else steps
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last

    def _run(self, x, steps):
        self.last = x
        for i in range(steps):
            calls = 2 if self.second_order and i < steps - 1 else 1  # Heun: one call on the last step
            for _ in range(calls):
                x = self.model_wrap_cfg.forward(x)
                self.last = x
            state.sampling_step = i  # the public counter is updated after the step (it lags by one)
        return x

    def sample(self, p, x, steps):
        p.pass_no += 1
        self.initialize(p)
        return self.launch_sampling(steps, lambda: self._run(x, steps))

    def sample_img2img(self, p, x, steps):
        p.pass_no += 1
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        self.initialize(p)
        return self.launch_sampling(t_enc + 1, lambda: self._run(x, t_enc + 1))


def create_sampler(name):
    return Sampler(name)


class FakeImage:
    def __init__(self, tensor):
        self.tensor = tensor
        self.info = {}


class Processed:
    def __init__(self, p, images, infotexts):
        self.images = images
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""
        self.comments = "".join(f"{c}\n" for c in p.comments)
        self.seed = p.all_seeds[0] if p.all_seeds else p.seed
        self.extra_generation_params = dict(p.extra_generation_params)  # what v1.10's info JSON carries


class StableDiffusionProcessing:
    cached_c = [None, None]
    cached_uc = [None, None]

    def __init__(self, prompt="", negative_prompt="", seed=1, steps=6, n_iter=1, batch_size=1, sampler_name="Euler",
                 width=64, height=64, denoising_strength=0.75, scripts=None, script_args=()):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.steps = steps
        self.n_iter = n_iter
        self.batch_size = batch_size
        self.sampler_name = sampler_name
        self.width = width
        self.height = height
        self.denoising_strength = denoising_strength
        self.scripts = scripts
        self.script_args = tuple(script_args)
        self.sd_model = shared.sd_model
        self.extra_generation_params = {}
        self.comments = {}
        self.override_settings = {}
        self.cached_c = StableDiffusionProcessing.cached_c
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.disable_extra_networks = False
        self.is_api = False
        self.iteration = 0
        self.sampler = None
        self.pass_no = 0
        self.fail_at = None
        self.outpath_samples = ""
        self.all_seeds = []
        self.conds_used = []

    def comment(self, text):
        self.comments[text] = 1

    def get_conds_with_caching(self, prompts, steps, caches, extra_network_data):
        key = (tuple(prompts), steps, repr(extra_network_data))
        for cache in caches:
            if cache[0] is not None and cache[0] == key:
                return cache[1]
        cache = caches[0]
        cache[1] = shared.sd_model.te_forward(prompts)
        cache[0] = key
        return cache[1]

    def setup_conds(self):
        self.c = self.get_conds_with_caching(self.prompts, self.steps, [self.cached_c], self.extra_network_data)
        self.uc = self.get_conds_with_caching(self.negative_prompts, self.steps, [self.cached_uc], {})
        self.conds_used.append(self.c)

    def sample(self, x):
        raise NotImplementedError


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_c = [None, None]
    cached_hr_uc = [None, None]

    def __init__(self, enable_hr=False, hr_second_pass_steps=0, hr_sampler_name=None, **kwargs):
        super().__init__(**kwargs)
        self.enable_hr = enable_hr
        self.hr_second_pass_steps = hr_second_pass_steps
        self.hr_sampler_name = hr_sampler_name
        self.is_hr_pass = False
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc

    def sample(self, x):
        self.sampler = create_sampler(self.sampler_name)
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=self.c, uc=self.uc)
        samples = self.sampler.sample(self, x, self.steps)
        if not self.enable_hr or state.interrupted:
            return samples
        return self.sample_hr_pass(samples)

    def sample_hr_pass(self, samples):
        self.is_hr_pass = True
        self.sampler = create_sampler(self.hr_sampler_name or self.sampler_name)
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.hr_extra_network_data)
        self.hr_c = self.get_conds_with_caching(self.prompts, self.steps, [self.cached_hr_c, self.cached_c],
                                                self.hr_extra_network_data)
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(self, x=samples, noise=samples, c=self.hr_c, uc=self.uc)
        samples = self.sampler.sample_img2img(self, samples, self.hr_second_pass_steps or self.steps)
        self.sampler = None
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_images=None, **kwargs):
        super().__init__(**kwargs)
        self.init_images = init_images or ["<init image>"]

    def sample(self, x):
        self.sampler = create_sampler(self.sampler_name)
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=self.c, uc=self.uc)
        return self.sampler.sample_img2img(self, x, self.steps)


def create_infotext(p, index):
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "Seed": p.all_seeds[index], "Size": f"{p.width}x{p.height}"}
    params.update(p.extra_generation_params)
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    return f"{p.all_prompts[index]}\nNegative prompt: {p.negative_prompt}\n{line}"


def process_images(p):
    total = p.n_iter * p.batch_size
    p.all_prompts = [p.prompt] * total
    p.all_negative_prompts = [p.negative_prompt] * total
    p.all_seeds = [int(p.seed) + i for i in range(total)]
    if p.scripts is not None:
        p.scripts.process(p)
    images, infotexts = [], []
    for n in range(p.n_iter):
        p.iteration = n
        if state.interrupted or state.stopping_generation:
            break
        window = slice(n * p.batch_size, (n + 1) * p.batch_size)
        p.prompts, p.extra_network_data = extra_networks.parse_prompts(p.all_prompts[window])
        p.negative_prompts = p.all_negative_prompts[window]
        p.seeds = p.all_seeds[window]
        p.subseeds = p.seeds
        p.hr_extra_network_data = p.extra_network_data
        if not p.disable_extra_networks:
            extra_networks.activate(p, p.extra_network_data)
        if p.scripts is not None:
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
        p.setup_conds()
        gen = torch.Generator().manual_seed(p.seeds[0])
        x = torch.randn(p.batch_size, 4, generator=gen, dtype=torch.float64)
        samples = p.sample(x)
        for i in range(p.batch_size):
            images.append(FakeImage(samples[i].clone()))
            infotexts.append(create_infotext(p, n * p.batch_size + i))
    if not infotexts:
        infotexts.append(create_infotext(p, 0))
    res = Processed(p, images, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
