"""Open-Sora 1.2 prompt preprocessing, string for string.

* ``clean_caption`` / ``basic_clean`` / ``text_preprocessing``: the caption cleaning used in
  training (``opensora/models/text_encoder/t5.py``, from PixArt/DeepFloyd): ftfy, HTML unescaping and
  stripping, lower-casing, removal of URLs, nicknames, CJK ideographs, ids, file names, ...
  ``text_preprocessing`` applies it twice, as the reference does.
* ``append_score_to_prompts``, ``split_prompt``, ``merge_prompt``, ``extract_prompts_loop``
  (``opensora/utils/inference_utils.py``).
* ``prepare_prompt``: the whole prompt path of ``scripts/inference.py``: split the ``|0|...|2|...``
  loop segments, append the scores to each segment, clean each segment, merge them back.
"""

from __future__ import annotations

import html
import re
import urllib.parse

import ftfy
from bs4 import BeautifulSoup
from bs4.exceptions import ParserRejectedMarkup

# Punctuation runs replaced by a space (the reference's BAD_PUNCT_REGEX).
BAD_PUNCT_REGEX = re.compile(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}")

# URLs: "http(s):..." or a domain with one of these endings (twice: the reference's second pass
# was meant for "www:" and matches the same domains again after the first removal).
_URL_PATTERNS = [
    re.compile(
        r"\b((?:" + scheme + r":(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)"
        r"[\w/-]*\b\/?(?!@)))"
    )
    for scheme in ("https?", "www")
]
# Runs of one kind of CJK characters that are removed: strokes, katakana phonetic extensions,
# enclosed letters, compatibility, ideograph extension A, Yijing hexagrams, unified ideographs.
_CJK_RANGES = ["\u31c0-\u31ef", "\u31f0-\u31ff", "\u3200-\u32ff", "\u3300-\u33ff", "\u3400-\u4dbf",
               "\u4dc0-\u4dff", "\u4e00-\u9fff"]
_DASHES = re.compile(
    r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
    r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+"
)
_HYPHEN_OR_UNDERSCORE = re.compile(r"(?:\-|\_)")

# (pattern, replacement) applied in order after the HTML / nickname / CJK / dash steps.
_SUBSTITUTIONS_BEFORE_BASIC_CLEAN: list[tuple[str, str]] = [
    (r"[`´«»“”¨]", '"'),  # quotes to one standard
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),  # "#123"
    (r"#\d{5,}\b", ""),  # "#12345.."
    (r"\b\d{6,}\b", ""),  # "123456.."
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", '"'),  # """AUSVERKAUFT"""
    (r"[\.]{2,}", " "),
]
_SUBSTITUTIONS_AFTER_BASIC_CLEAN: list[tuple[str, str]] = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes like 1920x1080
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),  # one pair of surrounding quotes
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
]


def basic_clean(text: str) -> str:
    """ftfy's mojibake/entity fixes, HTML unescaped twice, outer whitespace stripped."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def clean_caption(caption: str) -> str:
    """One pass of the reference caption cleaning (PixArt/DeepFloyd ``clean_caption``)."""
    caption = urllib.parse.unquote_plus(str(caption))
    caption = caption.strip().lower()
    caption = re.sub("<person>", "person", caption)
    for pattern in _URL_PATTERNS:
        caption = pattern.sub("", caption)
    try:
        caption = BeautifulSoup(caption, features="html.parser").text
    except ParserRejectedMarkup as e:  # the reference fails here too, with this bs4 exception
        raise ValueError(
            f"the prompt holds markup the HTML parser rejects ({str(e).splitlines()[0]}); "
            f"remove the '<!' / '<?' sequences from it: {caption!r}"
        ) from e
    caption = re.sub(r"@[\w\d]+\b", "", caption)  # @nickname
    for cjk in _CJK_RANGES:
        caption = re.sub(f"[{cjk}]+", "", caption)
    caption = _DASHES.sub("-", caption)
    for pattern, replacement in _SUBSTITUTIONS_BEFORE_BASIC_CLEAN:
        caption = re.sub(pattern, replacement, caption)
    caption = BAD_PUNCT_REGEX.sub(" ", caption)  # ***AUSVERKAUFT***, #AUSVERKAUFT
    caption = re.sub(r"\s+\.\s+", " ", caption)  # " . "
    # this-is-my-cute-cat / this_is_my_cute_cat: only when there are more than three
    if len(_HYPHEN_OR_UNDERSCORE.findall(caption)) > 3:
        caption = _HYPHEN_OR_UNDERSCORE.sub(" ", caption)
    caption = basic_clean(caption)
    for pattern, replacement in _SUBSTITUTIONS_AFTER_BASIC_CLEAN:
        caption = re.sub(pattern, replacement, caption)
    return caption.strip()


def text_preprocessing(text: str, use_text_preprocessing: bool = True) -> str:
    """The T5 prompt cleaning of Open-Sora: ``clean_caption`` twice (or just lower + strip)."""
    if not use_text_preprocessing:
        return text.lower().strip()
    return clean_caption(clean_caption(text))


def append_score_to_prompts(
    prompts: list[str],
    aes: float | None = None,
    flow: float | None = None,
    camera_motion: str | None = None,
) -> list[str]:
    """Append "aesthetic score: {aes:.1f}.", "motion score: {flow:.1f}.", "camera motion: {cm}."
    to each prompt, each only when given and not already present in the prompt."""
    result = []
    for prompt in prompts:
        new_prompt = prompt
        if aes is not None and "aesthetic score:" not in prompt:
            new_prompt = f"{new_prompt} aesthetic score: {aes:.1f}."
        if flow is not None and "motion score:" not in prompt:
            new_prompt = f"{new_prompt} motion score: {flow:.1f}."
        if camera_motion is not None and "camera motion:" not in prompt:
            new_prompt = f"{new_prompt} camera motion: {camera_motion}."
        result.append(new_prompt)
    return result


def _loop_segments(prompt: str) -> list[str]:
    parts = prompt.split("|")[1:]
    if len(parts) % 2:
        raise ValueError(
            f"malformed loop prompt {prompt!r}: expected '|<loop index>|<text>' pairs, "
            "e.g. '|0|a beautiful day|2|a rainy day'"
        )
    for index in parts[0::2]:
        if not index.strip().isdigit():
            raise ValueError(f"malformed loop prompt {prompt!r}: loop index {index!r} is not an integer")
    return parts


def split_prompt(prompt: str) -> tuple[list[str], list[int] | None]:
    """'|0| a |2| b' -> (['a', 'b'], [0, 2]); a plain prompt -> ([prompt], None)."""
    if not prompt.startswith("|0|"):
        return [prompt], None
    parts = _loop_segments(prompt)
    return [text.strip() for text in parts[1::2]], [int(i) for i in parts[0::2]]


def merge_prompt(texts: list[str], loop_indices: list[int] | None = None) -> str:
    """Inverse of ``split_prompt`` (segments joined as '|i|text' without spaces)."""
    if loop_indices is None:
        return texts[0]
    return "".join(f"|{index}|{text}" for index, text in zip(loop_indices, texts))


def extract_prompts_loop(prompts: list[str], loop_index: int) -> list[str]:
    """The prompt of each '|0|...' loop prompt that applies to loop ``loop_index``."""
    result = []
    for prompt in prompts:
        if prompt.startswith("|0|"):
            parts = _loop_segments(prompt)
            texts: list[str] = []
            for i in range(0, len(parts), 2):
                start = int(parts[i])
                end = int(parts[i + 2]) if i + 2 < len(parts) else loop_index + 1
                texts.extend([parts[i + 1]] * (end - start))
            prompt = texts[loop_index]
        result.append(prompt)
    return result


def prepare_prompt(
    prompt: str,
    aes: float | None = 6.5,
    flow: float | None = None,
    camera_motion: str | None = None,
    use_text_preprocessing: bool = True,
) -> str:
    """The scripts/inference.py prompt path for one prompt: split_prompt -> append_score_to_prompts
    -> text_preprocessing of each segment -> merge_prompt. Open-Sora 1.2's sample config uses
    aes=6.5 and no flow / camera motion."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
    segments, loop_indices = split_prompt(prompt)
    segments = append_score_to_prompts(segments, aes=aes, flow=flow, camera_motion=camera_motion)
    segments = [text_preprocessing(s, use_text_preprocessing) for s in segments]
    return merge_prompt(segments, loop_indices)
