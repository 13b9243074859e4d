"""Words the generated corpora draw from (the scale corpus's questions and answers, the planted
benchmark questions).
"""
from __future__ import annotations

COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "India", "Norway", "Chile"]


ANIMALS = ["spider", "cat", "horse", "bird", "ant", "dog"]


FRUITS = ["banana", "tomato", "lemon", "cherry", "plum"]


SHAPES = ["rectangle", "square", "bar", "block"]


COLOURS = ["red", "green", "blue", "orange", "purple", "grey", "teal", "yellow"]
