"""Harness-only patch of a Forge TEST copy so it loads the reduced-depth random Flux of make_random_flux_checkpoint.py.

    python tests/integration/patch_forge_for_reduced_flux.py --forge-dir /work/forge           # apply (idempotent)
    python tests/integration/patch_forge_for_reduced_flux.py --forge-dir /work/forge --check   # exit 1 if not applied
    python tests/integration/patch_forge_for_reduced_flux.py --forge-dir /work/forge --revert  # put originals back

Forge (lllyasviel/stable-diffusion-webui-forge at dfdcbab6, huggingface_guess at 84826248) builds every Flux with
19 double + 38 single blocks (``huggingface_guess/detection.py`` hard-codes them) and every T5 with the 24 layers of
``text_encoder_2/config.json``; a smaller state dict would leave the other blocks uninitialised. The patch makes both
counts come from the checkpoint's own keys (a full-size Flux counts to 19/38/24 and is unchanged):

- ``repositories/huggingface_guess/huggingface_guess/detection.py``: ``depth`` / ``depth_single_blocks`` =
  ``count_blocks`` (that file's own helper) of ``double_blocks.N.`` / ``single_blocks.N.``;
- ``backend/loader.py``, T5 branch: ``config["num_layers"]`` = the number of ``transformer.encoder.block.N.`` in the
  state dict.

Only use it on a WebUI copy kept for tests; nothing of it is part of K-LoRA. Each edited file gets a
``.klora-orig`` copy of its original the first time (``--revert`` puts it back). Any Python 3 runs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

MARK = "K-LoRA test harness: reduced-depth"

DETECTION = "repositories/huggingface_guess/huggingface_guess/detection.py"
LOADER = "backend/loader.py"

# (file, original line (stripped), replacement body (indentation of the original line is kept))
EDITS = [
    (
        DETECTION,
        'dit_config["depth"] = 19',
        f"dit_config[\"depth\"] = count_blocks(state_dict_keys, '{{}}double_blocks.'.format(key_prefix) + '{{}}.')"
        f"  # {MARK} Flux",
    ),
    (
        DETECTION,
        'dit_config["depth_single_blocks"] = 38',
        f"dit_config[\"depth_single_blocks\"] = count_blocks(state_dict_keys, '{{}}single_blocks.'.format(key_prefix)"
        f" + '{{}}.')  # {MARK} Flux",
    ),
    (
        LOADER,
        "config = read_arbitrary_config(config_path)",
        "config = read_arbitrary_config(config_path)\n"
        "{indent}config['num_layers'] = len({k.split('.')[3] for k in state_dict if k.startswith("
        "'transformer.encoder.block.')}) or config['num_layers']  # " + MARK + " T5",
    ),
]


def _patched_text(text: str, path: str) -> str:
    lines = text.split("\n")
    for file, original, replacement in EDITS:
        if file != path:
            continue
        hits = [i for i, line in enumerate(lines) if line.strip() == original]
        if len(hits) != 1:
            msg = f"{path}: expected exactly one line '{original}', found {len(hits)}; another Forge version?"
            raise SystemExit(msg)
        i = hits[0]
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        lines[i] = indent + replacement.replace("{indent}", indent)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="patch a Forge test copy for the reduced-depth random Flux")
    ap.add_argument("--forge-dir", required=True)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only report; exit 1 if a file is not patched")
    mode.add_argument("--revert", action="store_true", help="restore the .klora-orig copies")
    args = ap.parse_args()

    missing = []
    for rel in sorted({e[0] for e in EDITS}):
        path = os.path.join(args.forge_dir, rel)
        if not os.path.isfile(path):
            raise SystemExit(f"{path} not found: is --forge-dir a Forge tree with repositories/huggingface_guess?")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        orig = path + ".klora-orig"
        if args.revert:
            if os.path.exists(orig):
                shutil.copy2(orig, path)
                os.remove(orig)
                print(f"reverted {path}")
            elif MARK in text:
                raise SystemExit(f"{path} is patched but {orig} is gone; restore it from the Forge source")
            continue
        if MARK in text:
            print(f"already patched: {path}")
            continue
        if args.check:
            missing.append(path)
            continue
        new = _patched_text(text, rel)
        shutil.copy2(path, orig)
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"patched {path} (original kept as {orig})")
    if missing:
        print("not patched: " + ", ".join(missing))
        sys.exit(1)


if __name__ == "__main__":
    main()
