// K-LoRA: tooltips for the accordion's controls (elem_ids "klora_<tab>_<field>").
// Every global identifier is prefixed KLORA so nothing collides with the WebUI or other extensions.

const KLORA_TOOLTIPS = {
    enabled: "Fuse a content LoRA and a style LoRA with K-LoRA: at every step each shared layer uses exactly one of the two.",
    content: "The subject/content LoRA. Do not also put it in the prompt: if you do, the prompt entry is ignored.",
    content_weight: "Strength of the content LoRA wherever it is applied.",
    style: "The style LoRA. Do not also put it in the prompt: if you do, the prompt entry is ignored.",
    style_weight: "Strength of the style LoRA wherever it is applied.",
    alpha: "Slope of the scale S(p) = alpha * p + beta. Larger: layers switch from content to style earlier.",
    beta: "Offset of the scale S(p) = alpha * p + beta. Larger: more layers use style from the first step.",
    gamma_mode: "Balance between the two LoRAs' magnitudes: auto-mean (reference code), auto-sum (paper Eq. 9) or manual.",
    gamma: "The balance factor used when gamma mode is manual.",
    schedule: "linear: S(p) = alpha * p + beta (each layer switches at most once). s*: the same, modulo alpha.",
    clock: "step: p = step / steps. reference: the reference code's per-layer-call counter.",
    scope: "all: every UNet layer both LoRAs patch. attention: only to_q/to_k/to_v/to_out (the reference code).",
    k_multiplier: "K = rank_content * rank_style times this factor (the number of largest elements compared).",
    method: "k-lora, or a baseline for comparison: fixed, random, content-only, style-only, merge (both everywhere).",
    te_policy: "Which LoRA's text-encoder layers apply (K-LoRA switches UNet layers only).",
    hires: "Hires pass: restart the schedule, continue by noise level (denoising strength), or keep the final choices.",
    show_map: "Add the selection map (which LoRA each layer uses at each step) to the gallery.",
    refresh: "Reload the LoRA list.",
    preview: "The plan for the current settings, before generating: which LoRA each layer uses at each step, and the content share per step.",
};

function KLORA_applyTooltips() {
    const app = gradioApp();
    for (const tab of ["txt2img", "img2img"]) {
        for (const [field, tip] of Object.entries(KLORA_TOOLTIPS)) {
            for (const id of [`klora_${tab}_${field}`, `klora_${tab}_${field}-checkbox`]) {
                const element = app.querySelector(`#${id}`);
                if (element && !element.title) {
                    element.title = tip;
                }
            }
        }
    }
}

onUiLoaded(KLORA_applyTooltips);
