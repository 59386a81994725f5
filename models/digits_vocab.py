"""The digits world's words: its captions (data/digits.py writes them into shards) are also the corpus the tiny
models' tokenizer is trained on (models/tiny.py), so they live at the bottom layer, without heavy imports."""

DIGIT_WORDS: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

CAPTION_TEMPLATES: list[str] = [
    "a handwritten digit {word}",
    "a drawing of the number {word}",
    "the digit {word}, handwritten",
    "a scanned image of a handwritten {word}",
]
