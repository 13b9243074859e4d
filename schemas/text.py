"""Text helpers: script-based language detection.

VITA's corpora are Chinese and English; the language decides the TTS voice later, so a guess
must lean on the script actually used, not on a statistical model that needs downloading.
"""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"<(?:image|video|audio)>")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")


def detect_language(text: str) -> str:
    """ISO 639-1 code of the dominant script: zh, ja, ko, ru, en; 'und' when there is none.

    Latin script is reported as English: the corpora this tool targets use no other Latin
    language at scale, and a source config can state its language explicitly.
    """
    text = _PLACEHOLDER.sub(" ", text)
    han = len(_HAN.findall(text))
    kana = len(_KANA.findall(text))
    hangul = len(_HANGUL.findall(text))
    latin = len(_LATIN.findall(text))
    cyr = len(_CYRILLIC.findall(text))
    if kana and kana * 5 >= han:  # Japanese mixes kana with kanji; Chinese has no kana
        return "ja"
    # One CJK character carries about as much as a 3-4 letter word; weigh scripts that way.
    scores = {"zh": han * 3, "ko": hangul * 3, "en": latin, "ru": cyr}
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] > 0 else "und"


_CJK_ANY = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def estimate_text_tokens(text: str) -> int:
    """A tokenizer-free estimate for a Qwen2-style BPE: ~1 token per CJK character and ~4
    characters per token elsewhere; placeholders are counted by the media, not here."""
    text = _PLACEHOLDER.sub("", text)
    cjk = len(_CJK_ANY.findall(text))
    return cjk + (len(text) - cjk + 3) // 4
