"""Real photographs for the released model (``assets/photos``, public domain / CC0), each with a
question a user might ask about it: what notebooks and widgets show when there is no tiny world."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

PHOTO_DIR = Path(__file__).resolve().parents[1] / "assets" / "photos"
PHOTOS: dict[str, str] = {  # name -> a question about it
    "astronaut": "What is the person in the picture wearing?",
    "coffee": "What is in the cup?",
    "chelsea": "What animal is in the picture?",
    "rocket": "What is happening in this picture?",
}


def photo_names() -> list[str]:
    """The shipped photographs' names."""
    return list(PHOTOS)


def photo_path(name: str) -> Path:
    """The file of photograph ``name``."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; the shipped ones are {photo_names()}")
    return PHOTO_DIR / f"{name}.jpg"


def load_photo(name: str) -> Image.Image:
    """Photograph ``name`` as an RGB PIL image."""
    with Image.open(photo_path(name)) as im:
        return im.convert("RGB")
