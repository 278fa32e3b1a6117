saved: list = []


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, p=None, suffix="", **kw):
    saved.append({"image": image, "path": path, "suffix": suffix, "info": info})
    return None, None
