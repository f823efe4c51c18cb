"""Constants of the synthetic world: shapes, colours, sizes, grid positions, backgrounds, words.

Everything a scene, a task or a dialogue can mention is listed here, so tests and evaluations
can check generated text against one closed vocabulary. All words are plain ASCII English that
espeak-ng pronounces well (no digits, no symbols).
"""

from __future__ import annotations

# Shapes drawn by ``scenes.render`` (every shape of ``WorldConfig.heldout_pairs`` is here).
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "diamond",
    "hexagon",
)
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "heart": "hearts",
    "cross": "crosses",
    "diamond": "diamonds",
    "hexagon": "hexagons",
}

# Object colours (saturated or extreme, so they stand apart from the muted backgrounds).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (20, 150, 45),
    "blue": (25, 70, 225),
    "yellow": (250, 215, 0),
    "purple": (135, 40, 175),
    "orange": (250, 130, 0),
    "pink": (250, 120, 200),
    "brown": (115, 65, 20),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# Sizes, as fractions of a grid cell's side (min, max) for the drawn box of the object.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.40, 0.50),
    "large": (0.70, 0.84),
}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)

# The 3x3 grid: (row, col) -> short name, and the phrase used in a sentence.
GRID = 3
POSITION_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "centre",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
CELLS: tuple[tuple[int, int], ...] = tuple(POSITION_NAMES)

# Backgrounds: name -> the adjective used in captions ("on a striped background").
# Tones are muted mid-greys so every object colour (black and white included) stays visible.
BACKGROUNDS: dict[str, str] = {
    "grey": "plain grey",
    "beige": "plain beige",
    "dark": "plain dark grey",
    "gradient": "shaded",
    "striped": "striped",
    "dotted": "dotted",
    "checked": "checked",
    "noisy": "noisy",
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

# Short English words for OCR; none is a shape, colour, size or number word.
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "cake", "book", "door",
    "frog", "lamp", "milk", "rain", "ship", "boat", "road", "rock", "rose", "sand",
    "snow", "wind", "wolf", "bear", "bell", "coat", "duck", "farm", "gold", "hill",
    "kite", "leaf", "lion", "nest", "park", "ring", "river", "apple", "bread", "chair",
    "cloud", "horse", "house", "music", "piano", "plant", "queen", "sheep", "smile", "train",
    "water", "zebra", "tiger", "lemon", "hat", "cup", "key", "bus", "egg", "map",
)  # fmt: skip

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip


def number_word(n: int) -> str:
    """Spell a number from zero to twenty as an English word."""
    if not 0 <= n < len(NUMBER_WORDS):
        raise ValueError(f"number_word: {n} is outside zero..twenty")
    return NUMBER_WORDS[n]
