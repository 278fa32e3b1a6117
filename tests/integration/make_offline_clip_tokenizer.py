"""Build an offline stand-in for the Hugging Face repo ``openai/clip-vit-large-patch14`` (tokenizer + config only).

The SD1.x text encoder of the WebUI calls ``CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")`` and
``CLIPTextModel.from_pretrained(...)`` (weights come from the checkpoint; only ``config.json`` is read). Without
network access these files must already be in the Hugging Face cache. This script derives ``vocab.json`` and
``merges.txt`` from the CLIP BPE table that the ``open_clip_torch`` package ships (``bpe_simple_vocab_16e6.txt.gz``,
the same BPE as OpenAI CLIP), writes the tokenizer configs and a ``config.json`` with CLIP ViT-L/14 hyperparameters,
and lays them out as a cache snapshot (``models--openai--clip-vit-large-patch14/{refs/main,snapshots/<rev>/}``).

Run inside the WebUI venv (needs ``open_clip`` installed):  python make_offline_clip_tokenizer.py [--hub-dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

REPO = "openai/clip-vit-large-patch14"
REVISION = "0" * 40  # any 40-hex id; refs/main points at it

TEXT_CONFIG = {
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
VISION_CONFIG = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}
CONFIG = {
    "_name_or_path": REPO,
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
    "initializer_factor": 1.0,
    "torch_dtype": "float32",
    "text_config": TEXT_CONFIG,
    "vision_config": VISION_CONFIG,
}
SPECIAL = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
TOKENIZER_CONFIG = {
    **SPECIAL,
    "add_prefix_space": False,
    "errors": "replace",
    "do_lower_case": True,
    "model_max_length": 77,
    "tokenizer_class": "CLIPTokenizer",
    "name_or_path": REPO,
}


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte -> printable unicode table."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build(out: Path) -> None:
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # same slice as CLIP's SimpleTokenizer
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL, indent=2))
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))


def main() -> None:
    default_hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hub-dir", default=default_hub, help="Hugging Face hub cache dir (default: %(default)s)")
    args = ap.parse_args()
    root = Path(args.hub_dir) / ("models--" + REPO.replace("/", "--"))
    build(root / "snapshots" / REVISION)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    print(f"wrote {root}")


if __name__ == "__main__":
    main()
