"""A sample request and the file it becomes: checked before any model loads, written the same way whether this
process drew the picture or the daemon did. Imports no model library, and PIL only when a picture is made (a
`dopsd sample` that the daemon answers stays a light process: client.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .files import atomic_write, user_file_mode

if TYPE_CHECKING:
    from PIL import Image

    from .store import State


def image_tensor(im: Image.Image):
    """(3, H, W) float32 in [0, 1]: a picture as the models and the gate's judges take it."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255


def to_pil(img) -> Image.Image:
    """A (3, H, W) tensor in [0, 1] as an 8-bit picture."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    from PIL import Image

    cols = cols or min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet


OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def save_image(image: Image.Image, path: Path, meta: dict) -> None:
    """Encoded by the suffix (`encoded`), written with the user's usual file mode."""
    data = encoded(image, OUTPUT_FORMATS[Path(path).suffix.lower()], meta)
    atomic_write(Path(path), data, mode=user_file_mode())  # the user's picture: their usual mode


def encoded(image: Image.Image, fmt: str, meta: dict) -> bytes:
    """PNG with one text chunk per field; JPEG with the fields as a JSON comment; WebP as a JSON EXIF
    ImageDescription. Every format says what made it."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    buf = io.BytesIO()
    if fmt == "PNG":
        info = PngInfo()
        for k, v in meta.items():
            info.add_text(k, v if isinstance(v, str) else json.dumps(v))
        image.save(buf, format="PNG", pnginfo=info)
    elif fmt == "JPEG":
        image.save(buf, format="JPEG", quality=95, comment=json.dumps(meta).encode())
    else:
        exif = Image.Exif()
        exif[0x010E] = json.dumps(meta)  # ImageDescription
        image.save(buf, format="WEBP", quality=95, exif=exif)
    return buf.getvalue()


def output_path(out: Path | None, version: str, seed: int) -> Path:
    """Where `dopsd sample` writes: a file by its suffix (replaced if it exists: the user named it), or a default
    name, here or inside an existing folder, that never replaces a file: sample-v3-s0.png, then
    sample-v3-s0-2.png, -3 and so on (another prompt at the same version and seed is another picture)."""
    from .errors import UserError

    if out is None or Path(out).is_dir():
        folder = Path(out) if out is not None else Path()
        stem = f"sample-{version}-s{seed}"
        name, n = folder / f"{stem}.png", 1
        while os.path.lexists(name):
            n += 1
            name = folder / f"{stem}-{n}.png"
        return name
    out = Path(out)
    if not out.suffix and not os.path.lexists(out):  # `--out pics/`: a folder meant, not there
        raise UserError(f"--out {out}: no such folder (give an existing folder, or a file name ending in "
                        f"{', '.join(OUTPUT_FORMATS)})")
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--out {out}: the name must end in {', '.join(OUTPUT_FORMATS)} (or be an existing folder)")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    return out


def request(state: State, prompt: str, version: str | None, steps: int | None, seed: int, n: int) -> dict:
    """A sample request checked before any model loads: the version exists, steps and n make sense."""
    from .errors import UserError
    from .stack import get_version

    if not prompt.strip():
        raise UserError("the prompt is empty: say what to draw (an empty one is an unconditional picture, not asked for)")
    version = version or state.active_version
    get_version(state, version)  # an unknown id fails before the model loads
    steps = state.recipe["model"]["steps"] if steps is None else int(steps)
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if n < 1:
        raise UserError("-n must be at least 1")
    return {"prompt": prompt, "version": version, "steps": steps, "seed": int(seed), "n": int(n)}


def wrote_words(res: dict) -> str:
    """`dopsd sample`'s line for the file it wrote, whoever drew it: the full command and the light one."""
    return f"wrote {res['path']} ({res['version']}, {res['steps']} steps, {seeds_words(res['seed'], res['n'])})"


def seeds_words(seed: int, n: int) -> str:
    return f"seed {seed}" if n == 1 else f"a grid of {n}, seeds {seed}-{seed + n - 1}"
